"""Llama decoder layers as functions: RMSNorm, RoPE, SwiGLU MLP, grouped-query attention.

Same math as transformers' Llama modelling code (which the tests compare against). Shapes:
b batch, t new tokens, h hidden, nh query heads, nkv key/value heads, d head_dim, f ffn.
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

import torch

from flexgen_lab.models import ops

if TYPE_CHECKING:  # type hints only: spec imports families, which imports this module
    from flexgen_lab.models.spec import ModelSpec


def layer_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    h, f, q, kv = spec.hidden, spec.ffn, spec.q_dim, spec.kv_dim
    shapes: dict[str, tuple[int, ...]] = {
        "input_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h), "self_attn.o_proj.weight": (h, q),
        "post_attention_layernorm.weight": (h,),
        "mlp.gate_proj.weight": (f, h), "mlp.up_proj.weight": (f, h),
        "mlp.down_proj.weight": (h, f),
    }
    if spec.attention_bias:
        shapes |= {"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,),
                   "self_attn.v_proj.bias": (kv,), "self_attn.o_proj.bias": (h,)}
    if spec.mlp_bias:
        shapes |= {"mlp.gate_proj.bias": (f,), "mlp.up_proj.bias": (f,), "mlp.down_proj.bias": (h,)}
    return shapes


def embedding_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    return {"embed_tokens.weight": (spec.vocab, spec.hidden)}


def head_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    shapes = {"norm.weight": (spec.hidden,)}
    if not spec.tie_embeddings:
        shapes["lm_head.weight"] = (spec.vocab, spec.hidden)
    return shapes


def embed(spec: ModelSpec, w: dict, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """ids (b, t) -> hidden (b, t, h); positions enter later, through RoPE."""
    return torch.nn.functional.embedding(ids, w["embed_tokens.weight"])


@lru_cache(maxsize=16)
def _inv_freq(spec: ModelSpec) -> torch.Tensor:
    scaling = dict(spec.rope_scaling) if spec.rope_scaling else None
    return ops.rope_inv_freq(spec.head_dim, spec.rope_theta, scaling)


def attention_inputs(spec: ModelSpec, w: dict, x: torch.Tensor, positions: torch.Tensor):
    """x (b, t, h) -> q (b, nh, t, d), k and v (b, nkv, t, d), with RoPE applied to q and k."""
    y = ops.rms_norm(x, w["input_layernorm.weight"], spec.norm_eps)
    q = ops.linear(y, w["self_attn.q_proj.weight"], w.get("self_attn.q_proj.bias"))
    k = ops.linear(y, w["self_attn.k_proj.weight"], w.get("self_attn.k_proj.bias"))
    v = ops.linear(y, w["self_attn.v_proj.weight"], w.get("self_attn.v_proj.bias"))
    q, k = ops.split_heads(q, spec.num_heads), ops.split_heads(k, spec.num_kv_heads)
    cos, sin = ops.rope_cos_sin(positions, _inv_freq(spec), x.dtype)
    return ops.apply_rope(q, cos, sin), ops.apply_rope(k, cos, sin), ops.split_heads(
        v, spec.num_kv_heads)


def attention_scale(spec: ModelSpec) -> float:
    return spec.head_dim**-0.5


SCORE_SCALE = None  # use attention_scale(spec) inside the dot product, as Llama does


def attention_output(spec: ModelSpec, w: dict, attn: torch.Tensor, residual: torch.Tensor):
    """attn (b, t, nh*d) -> hidden (b, t, h) after the output projection and residual."""
    return residual + ops.linear(attn, w["self_attn.o_proj.weight"], w.get("self_attn.o_proj.bias"))


def mlp(spec: ModelSpec, w: dict, x: torch.Tensor) -> torch.Tensor:
    """x (b, t, h) -> x + down(silu(gate(y)) * up(y)), y = RMSNorm(x)"""
    y = ops.rms_norm(x, w["post_attention_layernorm.weight"], spec.norm_eps)
    # in place, so two ffn-wide tensors are alive, not four
    gate = torch.nn.functional.silu(
        ops.linear(y, w["mlp.gate_proj.weight"], w.get("mlp.gate_proj.bias")), inplace=True)
    gate *= ops.linear(y, w["mlp.up_proj.weight"], w.get("mlp.up_proj.bias"))
    return x + ops.linear(gate, w["mlp.down_proj.weight"], w.get("mlp.down_proj.bias"))


def head(spec: ModelSpec, w: dict, x: torch.Tensor) -> torch.Tensor:
    """x (b, t, h) -> logits (b, t, v): final RMSNorm, then the output projection."""
    y = ops.rms_norm(x, w["norm.weight"], spec.norm_eps)
    return ops.linear(y, w.get("lm_head.weight", w.get("embed_tokens.weight")))


def hf_key(name: str, part: str, layer: int | None = None) -> str:
    """Our per-part name -> the key in a LlamaForCausalLM checkpoint."""
    if part == "layer":
        return f"model.layers.{layer}.{name}"
    if name == "lm_head.weight":
        return name
    return f"model.{name}"
