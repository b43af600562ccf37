"""The per-step workspace the gpu tier reserves covers what one decoder step really allocates
(torch's profiler, allocation by allocation), for OPT and Llama, so budgets never undercount."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

from flexgen_lab.engine.workspace import step_workspace_bytes
from flexgen_lab.models import families, ops
from flexgen_lab.models.spec import ModelSpec
from flexgen_lab.models.weights import DummyWeights


def allocated_peak(spec: ModelSpec, b: int, t: int) -> int:
    """Peak bytes allocated (and not yet freed) during one prefill decoder step."""
    fam, w = families.get(spec.family), DummyWeights(spec, 0).part("layer", 0, torch.float32)
    x = torch.randn(b, t, spec.hidden)
    positions = torch.arange(t)[None].expand(b, t)
    mask = ops.attention_mask(torch.ones(b, t, dtype=torch.bool), 0, t)

    def step():
        q, k, v = fam.attention_inputs(spec, w, x, positions)
        attn = ops.attention(q, k, v, mask, families.score_scale(spec))
        return fam.mlp(spec, w, fam.attention_output(spec, w, attn, x))

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU],
                                         profile_memory=True) as prof:
        step()
    changes = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events()
                     if e.self_cpu_memory_usage)
    live = peak = 0
    for _, delta in changes:
        live += delta
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("family,kv_heads", [("opt", 16), ("llama", 16), ("llama", 4)])
@pytest.mark.parametrize("b,t", [(8, 512), (4, 256), (16, 128)])
def test_workspace_covers_a_steps_real_allocations(family, kv_heads, b, t):
    spec = ModelSpec(name="mid", family=family, num_layers=1, hidden=1024, num_heads=16,
                     num_kv_heads=kv_heads, ffn=4096, vocab=512, max_positions=2048)
    real = allocated_peak(spec, b, t)
    accounted = step_workspace_bytes(spec, b, t, t, torch.float32) - b * spec.vocab * 4
    assert real > 0
    assert real <= accounted, f"a step allocates {real} bytes, the budget holds {accounted}"
    assert real >= 0.5 * accounted  # and the reservation is not wildly timid


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_workspace_covers_sdpa_math_path(family):
    """SDPA's math path materialises scores and probabilities (CUDA takes it with a mask
    before sm80): attention in query chunks keeps them within the reservation. At b=8,
    t=512 the scores of one call would be 128 MiB: two chunks of 64 MiB are taken."""
    spec = ModelSpec(name="mid", family=family, num_layers=1, hidden=1024, num_heads=16,
                     num_kv_heads=16, ffn=4096, vocab=512, max_positions=2048)
    assert ops.query_chunk(8, 16, 512, 512, 4) == 256
    with sdpa_kernel(SDPBackend.MATH):
        real = allocated_peak(spec, 8, 512)
    accounted = step_workspace_bytes(spec, 8, 512, 512, torch.float32) - 8 * spec.vocab * 4
    assert 0.5 * accounted <= real <= accounted
