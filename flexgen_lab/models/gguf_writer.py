"""Write a Llama-family model as a llama.cpp GGUF file (the inverse of models/gguf.py's reader).

llama.cpp runs only GGUF files, and it has no OPT. So the llama.cpp baseline runs the engine's
own weights (dummy or local) after this module writes them the way llama.cpp's converter
(convert_hf_to_gguf.py) would: its tensor names (`blk.3.attn_q.weight`), the Q and K rows
permuted per head for its RoPE (adjacent pairs rotate, where Hugging Face rotates halves),
the hyperparameters its loader reads, and a synthetic vocabulary of placeholder tokens (the
runs feed token ids, so no text is ever tokenized; the vocabulary only has to load, in
llama.cpp and in transformers' `gguf_file=` reader, which the tests use as an independent
check of this writer).

Tensors are written part by part (one layer in memory at a time), 2-D ones in the file's
precision and 1-D ones (norms, biases) in F32 as the converter does.

    >>> write_gguf(DummyWeights(spec, 0), spec, torch.float32, "llama-tiny.f32.gguf")
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from flexgen_lab.models.gguf import gguf_key
from flexgen_lab.models.spec import ModelSpec
from flexgen_lab.models.weights import part_names

# torch dtype -> (ggml tensor type name, llama.cpp's file type name)
PRECISIONS = {torch.float32: ("F32", "ALL_F32"), torch.float16: ("F16", "MOSTLY_F16"),
              torch.bfloat16: ("BF16", "MOSTLY_BF16")}
FAMILIES = ("llama",)  # what llama.cpp's "llama" architecture runs among our families
N_BYTE_TOKENS = 256


class NoGGUFForm(ValueError):
    """The model (or its precision) has no GGUF form this writer can produce."""


def check_writable(spec: ModelSpec, dtype: torch.dtype) -> None:
    """Refuse, naming the value and what is allowed, what llama.cpp could not run."""
    if spec.family not in FAMILIES:
        raise NoGGUFForm(f"model={spec.name} is of the {spec.family} family, which llama.cpp "
                         f"does not run (no GGUF form); allowed: families {list(FAMILIES)} "
                         "(e.g. model=llama-tiny|smollm2-135m|tinyllama-1.1b)")
    if spec.rope_scaling:
        raise NoGGUFForm(f"model={spec.name} uses rope scaling {dict(spec.rope_scaling)}, "
                         "which this GGUF writer does not write; allowed: no rope scaling")
    if dtype not in PRECISIONS:
        raise NoGGUFForm(f"dtype={str(dtype).removeprefix('torch.')} has no GGUF tensor type "
                         "here; allowed: float32, float16, bfloat16")


def permute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's converter's `permute` of a Q or K projection (weight or bias): per head,
    row i of the first rotary half and row i of the second become rows 2i and 2i+1,
    (n_head, 2, d/2) -> (n_head, d/2, 2). models/gguf.unpermute_rows is its inverse."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(
        w.shape)


def synthetic_vocab(spec: ModelSpec) -> tuple[list[str], list[float], list[int]]:
    """(tokens, scores, types): control tokens at the spec's bos/eos ids, <unk> at 0 when free,
    the 256 byte tokens llama.cpp's SentencePiece vocabulary expects where there is room, and
    unique placeholders for the rest (the ids are what matters: prompts are ids)."""
    from gguf import TokenType

    tokens = [f"<t{i}>" for i in range(spec.vocab)]
    types = [int(TokenType.NORMAL)] * spec.vocab
    scores = [-float(i) for i in range(spec.vocab)]  # placeholders: lower for rarer, as SPM
    specials = {spec.bos_token_id: "<s>", spec.eos_token_id: "</s>"}
    specials = {i: t for i, t in specials.items() if i is not None and 0 <= i < spec.vocab}
    if 0 not in specials:
        specials[0] = "<unk>"
    for i, token in specials.items():
        tokens[i], scores[i] = token, 0.0
        types[i] = int(TokenType.UNKNOWN if token == "<unk>" else TokenType.CONTROL)
    free = [i for i in range(spec.vocab) if i not in specials]
    if len(free) >= N_BYTE_TOKENS:
        for byte, i in enumerate(free[:N_BYTE_TOKENS]):
            tokens[i], scores[i], types[i] = f"<0x{byte:02X}>", 0.0, int(TokenType.BYTE)
    return tokens, scores, types


def _metadata(writer, spec: ModelSpec, dtype: torch.dtype) -> None:
    import gguf

    writer.add_name(spec.name)
    writer.add_file_type(int(gguf.LlamaFileType[PRECISIONS[dtype][1]]))
    writer.add_vocab_size(spec.vocab)
    writer.add_context_length(spec.max_positions)
    writer.add_embedding_length(spec.hidden)
    writer.add_block_count(spec.num_layers)
    writer.add_feed_forward_length(spec.ffn)
    writer.add_head_count(spec.num_heads)
    writer.add_head_count_kv(spec.num_kv_heads)
    writer.add_rope_dimension_count(spec.head_dim)
    if spec.head_dim != spec.hidden // spec.num_heads:
        writer.add_key_length(spec.head_dim)
        writer.add_value_length(spec.head_dim)
    writer.add_rope_freq_base(float(spec.rope_theta))
    writer.add_layer_norm_rms_eps(float(spec.norm_eps))
    tokens, scores, types = synthetic_vocab(spec)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(0 if tokens[0] == "<unk>" else spec.bos_token_id or 0)
    for add, token_id in ((writer.add_bos_token_id, spec.bos_token_id),
                          (writer.add_eos_token_id, spec.eos_token_id),
                          (writer.add_pad_token_id, spec.pad_token_id)):
        if token_id is not None:
            add(token_id)
    writer.add_add_bos_token(False)  # prompts are ids, given whole
    writer.add_add_eos_token(False)


NUMPY = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}  # BF16 as its raw bits


def _target(dtype: torch.dtype, ndim: int) -> str:
    """A tensor's ggml type: 2-D ones in the file's precision, 1-D (norms, biases) in F32 as
    the converter writes them."""
    return PRECISIONS[dtype if ndim > 1 else torch.float32][0]


def tensor_infos(spec: ModelSpec, dtype: torch.dtype):
    """(our name, part, layer, llama.cpp name, numpy shape, ggml type) of every tensor, in the
    file's order, from the spec's shapes alone."""
    for part, layer in part_names(spec):
        shapes = {"embed": spec.embedding_param_shapes, "layer": spec.layer_param_shapes,
                  "head": spec.head_param_shapes}[part]()
        for name, shape in shapes.items():
            yield name, part, layer, gguf_key(name, part, layer), tuple(shape), _target(
                dtype, len(shape))


def gguf_array(tensor: torch.Tensor, name: str, spec: ModelSpec, kind: str) -> np.ndarray:
    """One of our tensors as the file holds it: Q/K rows permuted, cast to `kind`."""
    if name.startswith("self_attn.q_proj"):
        tensor = permute_rows(tensor, spec.num_heads)
    elif name.startswith("self_attn.k_proj"):
        tensor = permute_rows(tensor, spec.num_kv_heads)
    if kind == "BF16":
        return tensor.to(torch.bfloat16).contiguous().view(torch.uint16).numpy()
    return tensor.to(torch.float32).contiguous().numpy().astype(NUMPY[kind], copy=False)


def write_gguf(weights, spec: ModelSpec, dtype: torch.dtype, path: str | Path) -> Path:
    """Write `weights` (any weight source) as a llama.cpp GGUF file at `path`.

    GGUF lists every tensor before any data: the list comes from the spec's shapes (no tensor
    made), then the data streams part by part in the same order."""
    import gguf

    check_writable(spec, dtype)
    path = Path(path)
    infos = list(tensor_infos(spec, dtype))
    writer = gguf.GGUFWriter(path, "llama")
    try:
        _metadata(writer, spec, dtype)
        for _, _, _, key, shape, kind in infos:
            raw = gguf.GGMLQuantizationType.BF16 if kind == "BF16" else None
            nbytes = int(np.prod(shape)) * np.dtype(NUMPY[kind]).itemsize
            writer.add_tensor_info(key, shape, np.dtype(NUMPY[kind]), nbytes, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        tensors, loaded = {}, None
        for name, part, layer, _, _, kind in infos:
            if loaded != (part, layer):  # one part in memory at a time
                tensors, loaded = weights.part(part, layer, torch.float32), (part, layer)
            writer.write_tensor_data(gguf_array(tensors[name], name, spec, kind))
    finally:
        writer.close()
    return path
