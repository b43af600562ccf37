"""The cost model's and the simulator's bytes per link equal the engine's own counters."""

from __future__ import annotations

import pytest

from flexgen_lab.engine.engine import Engine
from flexgen_lab.engine.policy import Placement, Policy
from flexgen_lab.models.spec import ModelSpec
from flexgen_lab.models.weights import DummyWeights
from flexgen_lab.planner.job import Job
from flexgen_lab.planner.traffic import link_bytes
from flexgen_lab.sim.simulator import simulate
from flexgen_lab.workload import synthetic_prompts
from tests.engine.test_offload import CASES, PLACES
from tests.planner.test_cost_model import profile

S, N, B = 10, 5, 3
DEV = profile("t4-paper")

EXTRA = [  # compression and sparsity, beside the pairwise grid
    dict(weights="mix", cache="mix", compress_weight=True, compress_cache=True),
    dict(cache="disk", compress_cache=True, cpu_delegation=True),
    dict(cache="cpu", attn_sparsity=0.5),  # (a disk cache reads a data-dependent union)
    dict(cache="cpu", attn_sparsity=0.4, compress_cache=True, cpu_delegation=True),
]


def policy_of(case: dict) -> tuple[Policy, str]:
    fields = {k: v for k, v in case.items() if k != "schedule"}
    for kind in ("weights", "cache", "activations"):
        fields[kind] = PLACES[fields.get(kind, "gpu")]
    fields.setdefault("num_gpu_batches", 2)
    return Policy(gpu_batch_size=B, **fields), case.get("schedule", "zigzag")


@pytest.mark.parametrize("model", ["opt-tiny", "llama-tiny"])
@pytest.mark.parametrize("case", CASES + EXTRA, ids=lambda c: "-".join(map(str, c.values())))
def test_predicted_bytes_equal_counted_bytes(model, case, tmp_path):
    spec = ModelSpec.from_name(model)
    policy, schedule = policy_of(case)
    ids, mask = synthetic_prompts(spec, 2 * policy.block_size, S, seed=0)
    with Engine(spec, DummyWeights(spec, 0), policy, schedule, offload_dir=tmp_path) as engine:
        counted = engine.generate(ids, mask, N).link_bytes
    job = Job(spec, policy, schedule, DEV, S, N, 4, 2 * policy.block_size)
    assert link_bytes(job) == counted
    simulated = simulate(job)
    assert simulated.link_bytes == counted  # op by op, summed


def test_a_different_policy_predicts_different_bytes():
    spec = ModelSpec.from_name("opt-tiny")
    a = link_bytes(Job(spec, Policy(weights=Placement(0, 1)), "zigzag", None, S, N, 4))
    b = link_bytes(Job(spec, Policy(weights=Placement(0.5, 0.5)), "zigzag", None, S, N, 4))
    assert a["decode"]["cpu_to_gpu"] > b["decode"]["cpu_to_gpu"] > 0
