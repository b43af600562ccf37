"""Model shapes: one `ModelSpec` per architecture, a preset table, and byte arithmetic.

The engine, the cost model and the tests all size tensors through these methods, so they never
disagree about how many bytes a layer, a KV cache or an activation takes.

    >>> spec = ModelSpec.from_name("opt-1.3b")
    >>> spec.weight_bytes(dtype_bytes=2) / 2**30   # fp16 GiB
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

from flexgen_lab.models import families

FAMILIES = ("opt", "llama")


@dataclass(frozen=True)
class ModelSpec:
    """Shapes of a decoder-only transformer (OPT or Llama family).

    family: "opt" (learned positions, LayerNorm, ReLU MLP, biases) or
            "llama" (RoPE, RMSNorm, SwiGLU MLP, grouped-query attention, usually no biases).
    """

    name: str
    family: str
    num_layers: int
    hidden: int
    num_heads: int
    num_kv_heads: int
    ffn: int
    vocab: int
    max_positions: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, float], ...] | None = None  # llama3-style, as sorted items
    tie_embeddings: bool = True
    attention_bias: bool = False  # llama only; OPT always has biases
    mlp_bias: bool = False  # llama only
    head_dim_override: int | None = None
    bos_token_id: int | None = 2
    eos_token_id: int | None = 2
    pad_token_id: int = 1

    @property
    def head_dim(self) -> int:
        return self.head_dim_override or self.hidden // self.num_heads

    @property
    def kv_dim(self) -> int:
        """Width of one K (or V) row: num_kv_heads x head_dim."""
        return self.num_kv_heads * self.head_dim

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @staticmethod
    def from_name(name: str) -> ModelSpec:
        if name not in PRESETS:
            raise ValueError(f"model.name={name!r} is not a preset; allowed: {sorted(PRESETS)}")
        return PRESETS[name]

    @staticmethod
    def from_hf_config(path: str | Path) -> ModelSpec:
        """Read a Hugging Face `config.json` (OPT or Llama architecture) from a local directory."""
        config_file = Path(path) / "config.json"
        if not config_file.is_file():
            raise ValueError(f"model.path={str(path)!r} has no config.json")
        return spec_from_hf_dict(json.loads(config_file.read_text()), name=Path(path).name)

    # --- byte arithmetic (dtype_bytes: 4 fp32, 2 fp16/bf16) ---------------------------------

    def layer_param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Parameter name -> shape for one decoder layer (names as in the HF checkpoints)."""
        return families.get(self.family).layer_shapes(self)

    def embedding_param_shapes(self) -> dict[str, tuple[int, ...]]:
        return families.get(self.family).embedding_shapes(self)

    def head_param_shapes(self) -> dict[str, tuple[int, ...]]:
        return families.get(self.family).head_shapes(self)

    def layer_weight_bytes(self, dtype_bytes: int) -> int:
        return sum(math.prod(s) for s in self.layer_param_shapes().values()) * dtype_bytes

    def weight_bytes(self, dtype_bytes: int) -> int:
        """All weights: embeddings, every layer, final norm and (untied) output head."""
        outer = {**self.embedding_param_shapes(), **self.head_param_shapes()}
        outer_bytes = sum(math.prod(s) for s in outer.values()) * dtype_bytes
        return outer_bytes + self.num_layers * self.layer_weight_bytes(dtype_bytes)

    def kv_cache_bytes(self, batch: int, seq: int, dtype_bytes: int) -> int:
        """K and V for every layer: 2 x layers x batch x seq x kv_dim elements."""
        return 2 * self.num_layers * batch * seq * self.kv_dim * dtype_bytes

    def hidden_bytes(self, batch: int, seq: int, dtype_bytes: int) -> int:
        """One activation tensor (batch, seq, hidden) between two layers."""
        return batch * seq * self.hidden * dtype_bytes

    def num_params(self) -> int:
        return self.weight_bytes(1)


def spec_from_hf_dict(cfg: dict, name: str) -> ModelSpec:
    """Map a HF config dict to a ModelSpec; unsupported variants fail with a clear message."""
    model_type = cfg.get("model_type")
    if model_type == "opt":
        return _opt_from_hf(cfg, name)
    if model_type in ("llama", "mistral") or "LlamaForCausalLM" in cfg.get("architectures", []):
        return _llama_from_hf(cfg, name)
    raise ValueError(
        f"config.json model_type={model_type!r} is not supported; allowed: opt, llama"
    )


def _opt_from_hf(cfg: dict, name: str) -> ModelSpec:
    hidden = cfg["hidden_size"]
    post_norm = not cfg.get("do_layer_norm_before", True)
    if cfg.get("word_embed_proj_dim", hidden) != hidden or post_norm:
        raise ValueError(
            "OPT variants with word_embed_proj_dim != hidden_size or post-LayerNorm (opt-350m) "
            "are not supported"
        )
    if cfg.get("activation_function", "relu") != "relu":
        raise ValueError(f"OPT activation_function={cfg['activation_function']!r}; allowed: relu")
    return ModelSpec(
        name=name, family="opt", num_layers=cfg["num_hidden_layers"], hidden=hidden,
        num_heads=cfg["num_attention_heads"], num_kv_heads=cfg["num_attention_heads"],
        ffn=cfg["ffn_dim"], vocab=cfg["vocab_size"],
        max_positions=cfg["max_position_embeddings"], norm_eps=1e-5,
        tie_embeddings=cfg.get("tie_word_embeddings", True),
        bos_token_id=cfg.get("bos_token_id"), eos_token_id=cfg.get("eos_token_id"),
        pad_token_id=cfg.get("pad_token_id") or 1,
    )


def _llama_from_hf(cfg: dict, name: str) -> ModelSpec:
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"llama hidden_act={cfg['hidden_act']!r}; allowed: silu")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise ValueError(f"rope type {rope_type!r} is not supported; allowed: default, llama3")
    theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    scaling = None
    if rope_type == "llama3":
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        scaling = tuple((k, float(rope[k])) for k in keys)
    eos = cfg.get("eos_token_id")
    return ModelSpec(
        name=name, family="llama", num_layers=cfg["num_hidden_layers"],
        hidden=cfg["hidden_size"], num_heads=cfg["num_attention_heads"],
        num_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
        ffn=cfg["intermediate_size"], vocab=cfg["vocab_size"],
        max_positions=cfg["max_position_embeddings"], norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta), rope_scaling=scaling,
        tie_embeddings=cfg.get("tie_word_embeddings", False),
        attention_bias=cfg.get("attention_bias", False), mlp_bias=cfg.get("mlp_bias", False),
        head_dim_override=cfg.get("head_dim"),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_id=eos[0] if isinstance(eos, list) else eos,
        pad_token_id=cfg.get("pad_token_id") or 0,
    )


def _opt(name: str, layers: int, hidden: int, heads: int) -> ModelSpec:
    return ModelSpec(name=name, family="opt", num_layers=layers, hidden=hidden, num_heads=heads,
                     num_kv_heads=heads, ffn=4 * hidden, vocab=50272, max_positions=2048)


def _llama(name: str, layers: int, hidden: int, heads: int, kv_heads: int, ffn: int, vocab: int,
           max_pos: int, theta: float, tie: bool, bos: int, eos: int, pad: int = 0) -> ModelSpec:
    return ModelSpec(name=name, family="llama", num_layers=layers, hidden=hidden, num_heads=heads,
                     num_kv_heads=kv_heads, ffn=ffn, vocab=vocab, max_positions=max_pos,
                     rope_theta=theta, tie_embeddings=tie, bos_token_id=bos, eos_token_id=eos,
                     pad_token_id=pad)


# Sources: OPT shapes from the OPT paper / FlexGen's opt_config.py (facts §9); Llama shapes from
# the models' published config.json files. The tiny presets (small vocabulary too) exist for
# tests and quick runs.
PRESETS: dict[str, ModelSpec] = {
    s.name: s
    for s in [
        replace(_opt("opt-tiny", 2, 64, 4), vocab=512, max_positions=512),
        _opt("opt-125m", 12, 768, 12),
        _opt("opt-1.3b", 24, 2048, 32),
        _opt("opt-2.7b", 32, 2560, 32),
        _opt("opt-6.7b", 32, 4096, 32),
        _opt("opt-13b", 40, 5120, 40),
        _opt("opt-30b", 48, 7168, 56),
        _opt("opt-66b", 64, 9216, 72),
        _opt("opt-175b", 96, 12288, 96),
        #       name            L   h     heads kv ffn    vocab   maxpos theta    tie    bos eos
        _llama("llama-tiny", 2, 64, 4, 2, 160, 512, 512, 10000.0, False, 1, 2),
        _llama("smollm2-135m", 30, 576, 9, 3, 1536, 49152, 8192, 100000.0, True, 1, 2, 2),
        _llama("tinyllama-1.1b", 22, 2048, 32, 4, 5632, 32000, 2048, 10000.0, False, 1, 2),
        _llama("llama-2-7b", 32, 4096, 32, 32, 11008, 32000, 4096, 10000.0, False, 1, 2),
        _llama("llama-3-8b", 32, 4096, 32, 8, 14336, 128256, 8192, 500000.0, False,
               128000, 128001),
    ]
}
