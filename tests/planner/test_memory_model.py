"""The memory model's peak per tier against the engine's own accounting, policy by policy."""

from __future__ import annotations

import pytest

from flexgen_lab.engine.engine import Engine
from flexgen_lab.engine.policy import Placement, Policy
from flexgen_lab.engine.tiers import Tiers
from flexgen_lab.models.spec import ModelSpec
from flexgen_lab.models.weights import DummyWeights
from flexgen_lab.planner.job import Job
from flexgen_lab.planner.memory_model import memory_terms, peak_bytes, placing_terms
from flexgen_lab.workload import synthetic_prompts

SPEC = ModelSpec(name="mid", family="opt", num_layers=3, hidden=256, num_heads=4,
                 num_kv_heads=4, ffn=1024, vocab=2048, max_positions=256)
QUARTERS = Placement(0.25, 0.5)  # splits 4 or 8 sequences exactly
POLICIES = {
    "resident": Policy(gpu_batch_size=4),
    "weights offloaded": Policy(gpu_batch_size=4, weights=QUARTERS),
    "cache offloaded": Policy(gpu_batch_size=4, num_gpu_batches=2, cache=QUARTERS),
    "delegated": Policy(gpu_batch_size=4, num_gpu_batches=2, cache=QUARTERS,
                        cpu_delegation=True),
    "everything off": Policy(gpu_batch_size=4, num_gpu_batches=2, weights=QUARTERS,
                             cache=Placement(0, 0.5), activations=QUARTERS),
    "compressed": Policy(gpu_batch_size=4, weights=QUARTERS, cache=QUARTERS,
                         compress_weight=True, compress_cache=True),
}


@pytest.mark.parametrize("name", POLICIES)
def test_modelled_peaks_match_the_engines_accounting(name, tmp_path):
    policy, s, n = POLICIES[name], 48, 6
    tiers = Tiers(1 << 40, 1 << 40, 1 << 40, "cpu")
    ids, mask = synthetic_prompts(SPEC, policy.block_size, s, seed=0)
    with Engine(SPEC, DummyWeights(SPEC, 0), policy, tiers=tiers,
                offload_dir=tmp_path) as engine:
        engine.generate(ids, mask, n)
    job = Job(SPEC, policy, "zigzag", None, s, n, 4)
    linear = memory_terms(job, not policy.weights.all_gpu, not policy.cache.all_gpu,
                          not policy.activations.all_gpu)
    linear_peaks = {tier: term.at(policy) for tier, term in linear.items()}
    placing = placing_terms(job, not policy.weights.all_gpu)
    linear_peaks["cpu"] = max(linear_peaks["cpu"], placing.at(policy))
    exact = peak_bytes(job)
    for tier, peak in tiers.peaks().items():
        assert exact[tier] == peak, tier
        assert linear_peaks[tier] == pytest.approx(peak, rel=0.10), tier
