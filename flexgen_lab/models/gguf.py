"""GGUF weights (llama.cpp's single-file format): shapes from the metadata, tensors dequantised.

`model.path` may name a `.gguf` file. The `gguf` package parses the file and dequantises its
quantised types (Q4_1, Q8_0, ...) with its own routines; what llama.cpp's converter changed is
undone here: tensor names (`blk.3.attn_q.weight` -> layer 3's `self_attn.q_proj.weight`) and
the row permutation it applies to Q and K (llama.cpp's RoPE rotates adjacent pairs, Hugging
Face's rotates the two halves of each head). Transformers is never imported for weights: it is
the reference the tests compare with (loaded with `gguf_file=`), and the tokenizer reader.

    >>> w = GGUFWeights("SmolLM2-135M-Instruct.Q4_1.gguf")
    >>> w.spec.num_kv_heads, w.part("layer", 0, torch.float32)["self_attn.k_proj.weight"].shape
"""

from __future__ import annotations

import json
from functools import cached_property, lru_cache
from pathlib import Path

import numpy as np
import torch

from flexgen_lab.models.spec import ModelSpec

SUFFIX = ".gguf"
ARCHITECTURES = ("llama",)  # llama.cpp's name for the Llama family (SmolLM2 is one)

# Our per-part names (models/llama.py) -> llama.cpp's; layer names take a `blk.{j}.` prefix.
LLAMA_NAMES = {
    "embed_tokens.weight": "token_embd.weight",
    "norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight", "self_attn.o_proj.bias": "attn_output.bias",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.gate_proj.bias": "ffn_gate.bias",
    "mlp.up_proj.weight": "ffn_up.weight", "mlp.up_proj.bias": "ffn_up.bias",
    "mlp.down_proj.weight": "ffn_down.weight", "mlp.down_proj.bias": "ffn_down.bias",
}


def is_gguf(path: str | Path | None) -> bool:
    return path is not None and str(path).endswith(SUFFIX)


def gguf_key(name: str, part: str, layer: int | None) -> str:
    """Our per-part parameter name -> the tensor's name in a llama.cpp GGUF file."""
    return f"blk.{layer}.{LLAMA_NAMES[name]}" if part == "layer" else LLAMA_NAMES[name]


def unpermute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's converter's `permute` of a Q or K projection (weight or bias).

    Per head, it interleaved the rows of the two rotary halves (row i of the first half and
    row i of the second become rows 2i and 2i+1): (n_head, 2, d/2) -> (n_head, d/2, 2).
    """
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(
        w.shape)


def open_reader(path: str | Path):
    """A GGUFReader on `path`; ValueError naming the file and model.path when it is missing,
    corrupt or truncated (every tensor's bytes must lie inside the file). Parsing the
    metadata takes seconds (a vocabulary's strings), and a run's checks, spec and weights all
    ask: the reader is kept per (file, size, mtime)."""
    file = Path(path)
    fix = "fetch or copy it again; allowed: a llama.cpp .gguf file of a Llama-family model"
    if not file.is_file():
        raise ValueError(f"model.path={str(path)!r}: no such file; {fix}")
    st = file.stat()
    return _open_reader(str(file.resolve()), st.st_size, st.st_mtime_ns, str(path), fix)


@lru_cache(maxsize=2)
def _open_reader(file_name: str, size: int, mtime_ns: int, path: str, fix: str):
    import gguf

    file = Path(file_name)
    try:
        reader = gguf.GGUFReader(file)
    except (ValueError, KeyError, IndexError, OSError, UnicodeDecodeError) as err:
        raise ValueError(f"model.path={str(path)!r}: {file.name} is not a valid GGUF file, "
                         f"or is truncated ({type(err).__name__}: {err}); {fix}") from None
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
            raise ValueError(f"model.path={str(path)!r}: {file.name} is truncated (tensor "
                             f"{t.name} ends at byte {t.data_offset + t.n_bytes}, the file has "
                             f"{size}); {fix}")
    return reader


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def spec_from_reader(reader, name: str, path: str | Path) -> ModelSpec:
    """A ModelSpec from a GGUF file's metadata (the keys llama.cpp's converter writes)."""
    arch = _field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"model.path={str(path)!r}: general.architecture={arch!r} is not "
                         f"supported; allowed: {list(ARCHITECTURES)}")
    scaling = _field(reader, f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", None):
        raise ValueError(f"model.path={str(path)!r}: {arch}.rope.scaling.type={scaling!r} is "
                         "not supported; allowed: none")
    get = lambda key, default=None: _field(reader, f"{arch}.{key}", default)  # noqa: E731
    hidden, heads = get("embedding_length"), get("attention.head_count")
    vocab = get("vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    key_length = get("attention.key_length")
    tensors = {t.name for t in reader.tensors}
    return ModelSpec(
        name=name, family="llama", num_layers=get("block_count"), hidden=hidden,
        num_heads=heads, num_kv_heads=get("attention.head_count_kv") or heads,
        ffn=get("feed_forward_length"), vocab=vocab, max_positions=get("context_length"),
        norm_eps=float(get("attention.layer_norm_rms_epsilon")),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        tie_embeddings="output.weight" not in tensors,
        attention_bias="blk.0.attn_q.bias" in tensors,
        mlp_bias="blk.0.ffn_up.bias" in tensors,
        head_dim_override=key_length if key_length and key_length != hidden // heads else None,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id", 0),
    )


def spec_from_gguf(path: str | Path, name: str | None = None) -> ModelSpec:
    return spec_from_reader(open_reader(path), name or Path(path).stem, path)


class GGUFWeights:
    """A weight source (see models/weights.py) over one `.gguf` file, read lazily per part."""

    def __init__(self, path: str | Path, name: str | None = None):
        self.path = Path(path)
        self._reader = open_reader(path)
        self.spec = spec_from_reader(self._reader, name or self.path.stem, path)
        self._tensors = {t.name: t for t in self._reader.tensors}

    def identity(self) -> str:
        """Changes whenever the file changes (as LocalWeights' directory identity)."""
        st = self.path.stat()
        stats = [(self.path.name, st.st_size, st.st_mtime_ns)]
        return f"gguf:{self.path.resolve()}:{json.dumps(stats)}"

    def part(self, part: str, layer: int | None, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        tensors = {}
        shapes = {"embed": self.spec.embedding_param_shapes, "layer": self.spec.layer_param_shapes,
                  "head": self.spec.head_param_shapes}[part]()  # as weights.part_shapes
        for name, shape in shapes.items():
            key = gguf_key(name, part, layer)
            tensor = self._read(key)
            if name.startswith("self_attn.q_proj"):
                tensor = unpermute_rows(tensor, self.spec.num_heads)
            elif name.startswith("self_attn.k_proj"):
                tensor = unpermute_rows(tensor, self.spec.num_kv_heads)
            if tuple(tensor.shape) != tuple(shape):
                raise ValueError(f"model.path={str(self.path)!r}: {key} has shape "
                                 f"{tuple(tensor.shape)}, expected {shape}")
            tensors[name] = tensor.to(dtype)
        return tensors

    def _read(self, key: str) -> torch.Tensor:
        from gguf.quants import dequantize

        if key not in self._tensors:
            raise ValueError(f"model.path={str(self.path)!r}: tensor {key!r} is missing")
        t = self._tensors[key]
        # numpy order: the last axis is GGUF's first (ne0); a matrix comes out (rows, cols)
        array = dequantize(t.data, t.tensor_type)
        return torch.from_numpy(np.array(array, dtype=np.float32))  # a copy: the map is read-only

    @cached_property
    def tokenizer(self):
        return load_tokenizer(self.path)


def load_tokenizer(path: str | Path):
    """The tokenizer embedded in the file, through transformers' own GGUF reader (seconds:
    kept per (file, size, mtime), as a reproduce's rows each ask for it)."""
    file = Path(path).resolve()
    st = file.stat()
    return _load_tokenizer(str(file), st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=2)
def _load_tokenizer(file_name: str, size: int, mtime_ns: int):
    from transformers import AutoTokenizer

    file = Path(file_name)
    return AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)
