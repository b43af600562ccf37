"""Intermediates of one compute step, sized from shapes: the gpu tier reserves them per step.

torch allocates these inside the ops, so the engine cannot count them as it copies; it holds
their size on the compute tier for the step instead. The estimate counts the tensors alive at
the widest point of a decoder layer, plus the head's logits.
"""

from __future__ import annotations

import torch

from flexgen_lab.models.spec import ModelSpec


def step_workspace_bytes(spec: ModelSpec, batch: int, tokens: int, keys: int,
                         dtype: torch.dtype) -> int:
    """Bytes of one layer step's intermediates for `batch` sequences of `tokens` new tokens
    attending over `keys` positions.

    hidden in and out (2 b t h); q, k, v (b t (q + 2 kv)); attention output (b t q); attention
    scores if materialised (b nh t s); MLP hidden: 2 b t ffn for OPT (fc1 and its ReLU), 4 for
    Llama (gate, up, silu(gate) and their product are alive together: torch's profiler showed
    a Llama step allocating up to 1.4x the 2-tensor estimate at short prompts); logits of the
    last position in fp32 (b v 4 bytes).
    """
    item = dtype.itemsize
    b, t, s = batch, tokens, keys
    mlp_tensors = 4 if spec.family == "llama" else 2
    elements = (2 * b * t * spec.hidden + b * t * (2 * spec.q_dim + 2 * spec.kv_dim)
                + b * spec.num_heads * t * s + mlp_tensors * b * t * spec.ffn)
    return elements * item + b * spec.vocab * 4
