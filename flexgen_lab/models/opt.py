"""OPT decoder layers as functions: learned positions, pre-LayerNorm, ReLU MLP, biases.

Same math as transformers' OPT modelling code (which the tests compare against); weights come
in as a dict named like the HF checkpoint's keys inside one layer. Shapes: b batch, t new
tokens, h hidden, nh heads, d head_dim, f ffn, v vocab.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from flexgen_lab.models import ops

if TYPE_CHECKING:  # type hints only: spec imports families, which imports this module
    from flexgen_lab.models.spec import ModelSpec

POSITION_OFFSET = 2  # OPT's learned position table starts at index 2 (a fairseq leftover)


def layer_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    h, f = spec.hidden, spec.ffn
    shapes: dict[str, tuple[int, ...]] = {}
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        shapes[f"self_attn.{proj}.weight"] = (h, h)
        shapes[f"self_attn.{proj}.bias"] = (h,)
    shapes |= {
        "self_attn_layer_norm.weight": (h,), "self_attn_layer_norm.bias": (h,),
        "fc1.weight": (f, h), "fc1.bias": (f,), "fc2.weight": (h, f), "fc2.bias": (h,),
        "final_layer_norm.weight": (h,), "final_layer_norm.bias": (h,),
    }
    return shapes


def embedding_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    return {
        "embed_tokens.weight": (spec.vocab, spec.hidden),
        "embed_positions.weight": (spec.max_positions + POSITION_OFFSET, spec.hidden),
    }


def head_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    shapes = {"final_layer_norm.weight": (spec.hidden,), "final_layer_norm.bias": (spec.hidden,)}
    if not spec.tie_embeddings:
        shapes["lm_head.weight"] = (spec.vocab, spec.hidden)
    return shapes


def embed(spec: ModelSpec, w: dict, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """ids, positions (b, t) -> hidden (b, t, h); padding positions (-1) map to table row 1."""
    tokens = torch.nn.functional.embedding(ids, w["embed_tokens.weight"])
    return tokens + torch.nn.functional.embedding(positions + POSITION_OFFSET,
                                                  w["embed_positions.weight"])


def attention_inputs(spec: ModelSpec, w: dict, x: torch.Tensor, positions: torch.Tensor):
    """x (b, t, h) -> q (b, nh, t, d) pre-scaled by 1/sqrt(d) as OPT does, k and v (b, nh, t, d)."""
    y = ops.layer_norm(x, w["self_attn_layer_norm.weight"], w["self_attn_layer_norm.bias"],
                       spec.norm_eps)
    q = ops.linear(y, w["self_attn.q_proj.weight"], w["self_attn.q_proj.bias"])
    q = q * attention_scale(spec)
    k = ops.linear(y, w["self_attn.k_proj.weight"], w["self_attn.k_proj.bias"])
    v = ops.linear(y, w["self_attn.v_proj.weight"], w["self_attn.v_proj.bias"])
    return (ops.split_heads(q, spec.num_heads), ops.split_heads(k, spec.num_kv_heads),
            ops.split_heads(v, spec.num_kv_heads))


def attention_scale(spec: ModelSpec) -> float:
    return spec.head_dim**-0.5


# OPT scales q before the dot product, so attention itself runs with scale 1.
SCORE_SCALE = 1.0


def attention_output(spec: ModelSpec, w: dict, attn: torch.Tensor, residual: torch.Tensor):
    """attn (b, t, nh*d) -> hidden (b, t, h) after the output projection and residual."""
    return residual + ops.linear(attn, w["self_attn.out_proj.weight"], w["self_attn.out_proj.bias"])


def mlp(spec: ModelSpec, w: dict, x: torch.Tensor) -> torch.Tensor:
    """x (b, t, h) -> x + fc2(relu(fc1(LN(x))))"""
    y = ops.layer_norm(x, w["final_layer_norm.weight"], w["final_layer_norm.bias"], spec.norm_eps)
    y = torch.relu_(ops.linear(y, w["fc1.weight"], w["fc1.bias"]))  # in place: one ffn-wide
    return x + ops.linear(y, w["fc2.weight"], w["fc2.bias"])


def head(spec: ModelSpec, w: dict, x: torch.Tensor) -> torch.Tensor:
    """x (b, t, h) -> logits (b, t, v): final LayerNorm, then the (tied) output projection."""
    y = ops.layer_norm(x, w["final_layer_norm.weight"], w["final_layer_norm.bias"], spec.norm_eps)
    return ops.linear(y, w.get("lm_head.weight", w.get("embed_tokens.weight")))


def hf_key(name: str, part: str, layer: int | None = None) -> str:
    """Our per-part name -> the key in an OPTForCausalLM checkpoint."""
    if part == "layer":
        return f"model.decoder.layers.{layer}.{name}"
    if name == "lm_head.weight":
        return name
    return f"model.decoder.{name}"
