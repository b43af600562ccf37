"""Attention in chunks of queries equals attention in one call (each query's softmax is its
own), for any shapes, grouped-query heads and padding masks."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flexgen_lab.models import ops


@settings(max_examples=25, deadline=None, derandomize=True)
@given(b=st.integers(1, 3), kv_heads=st.sampled_from([1, 2, 4]), group=st.integers(1, 3),
       t=st.integers(1, 17), past=st.integers(0, 9), pad=st.integers(0, 4),
       block=st.integers(1, 4000))
def test_chunked_attention_equals_one_call(b, kv_heads, group, t, past, pad,
                                           block):
    torch.manual_seed(b * 1000 + t * 10 + past)
    nh, s, d = kv_heads * group, past + t, 8
    q = torch.randn(b, nh, t, d)
    k, v = torch.randn(b, kv_heads, s, d), torch.randn(b, kv_heads, s, d)
    key_mask = torch.ones(b, s, dtype=torch.bool)
    key_mask[0, :min(pad, s - 1)] = False  # a left-padded first row
    mask = ops.attention_mask(key_mask, past, t)
    whole = ops.attention(q, k, v, mask, 0.3)
    with pytest.MonkeyPatch.context() as patch:  # bytes: down to one query a call
        patch.setattr(ops, "SCORE_BLOCK_BYTES", block)
        chunked = ops.attention(q, k, v, mask, 0.3)
        chunk = ops.query_chunk(b, nh, t, s, 4)
    assert chunk == max(1, min(t, block // (b * nh * s * 4)))
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-6)
