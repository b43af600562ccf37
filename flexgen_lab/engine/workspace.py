"""Intermediates of one compute step, sized from shapes: the gpu tier reserves them per step.

torch allocates these inside the ops, so the engine cannot count them as it copies; it holds
their size on the compute tier for the step instead. The estimate counts the tensors alive at
the widest point of a decoder layer, plus the head's logits.
"""

from __future__ import annotations

import torch

from flexgen_lab.models.ops import query_chunk
from flexgen_lab.models.spec import ModelSpec


def step_workspace_bytes(spec: ModelSpec, batch: int, tokens: int, keys: int,
                         dtype: torch.dtype) -> int:
    """Bytes of one layer step's intermediates for `batch` sequences of `tokens` new tokens
    attending over `keys` positions.

    hidden in, normed and out (3 b t h); q, k, v (b t (q + 2 kv)); attention output (b t q);
    attention scores and probabilities of one chunk of queries, where SDPA materialises them
    (its math path: 2 b nh chunk s, models/ops.py query_chunk);
    MLP hidden: b t ffn for OPT (fc1, ReLU in place), 2 for Llama (gate with SiLU and the
    product in place, up); logits of the last position in fp32 (b v 4 bytes).
    """
    item = dtype.itemsize
    b, t, s = batch, tokens, keys
    mlp_tensors = 2 if spec.family == "llama" else 1
    chunk = query_chunk(b, spec.num_heads, t, s, item)
    elements = (3 * b * t * spec.hidden + b * t * (2 * spec.q_dim + 2 * spec.kv_dim)
                + 2 * b * spec.num_heads * chunk * s + mlp_tensors * b * t * spec.ffn)
    return elements * item + b * spec.vocab * 4
