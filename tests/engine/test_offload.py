"""Offloaded placements give the resident engine's tokens and logits, for a pairwise grid.

Factors: schedule x overlap x weights / cache / activations placement x CPU delegation x
number of GPU batches (1 or 3, odd gpu_batch_size 3). A greedy pairwise-covering set keeps
the suite short while every pair of factor levels meets at least once; OPT and Llama both.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from flexgen_lab.engine.engine import Callbacks, Engine
from flexgen_lab.engine.policy import Placement, Policy
from flexgen_lab.models.spec import ModelSpec
from flexgen_lab.models.weights import DummyWeights
from flexgen_lab.workload import synthetic_prompts

PLACES = {"gpu": Placement(1, 0), "cpu": Placement(0, 1), "disk": Placement(0, 0),
          "mix": Placement(0.3, 0.4)}
FACTORS = {
    "schedule": ["zigzag", "row_by_row"],
    "overlap": [True, False],
    "weights": ["gpu", "cpu", "disk", "mix"],
    "cache": ["gpu", "cpu", "disk", "mix"],
    "activations": ["gpu", "cpu", "disk"],
    "cpu_delegation": [False, True],
    "num_gpu_batches": [1, 3],
}
GEN_LEN, PROMPT_LEN, GPU_BATCH = 6, 10, 3


def pairwise_cases(factors: dict[str, list]) -> list[dict]:
    """A small set of full assignments covering every pair of levels of every two factors."""
    names = list(factors)
    uncovered = {(a, va, b, vb) for a, b in itertools.combinations(names, 2)
                 for va in factors[a] for vb in factors[b]}
    cases = []
    while uncovered:
        best, best_gain = None, -1
        for combo in itertools.product(*factors.values()):
            case = dict(zip(names, combo, strict=True))
            gain = sum((a, case[a], b, case[b]) in uncovered
                       for a, b in itertools.combinations(names, 2))
            if gain > best_gain:
                best, best_gain = case, gain
        cases.append(best)
        uncovered -= {(a, best[a], b, best[b]) for a, b in itertools.combinations(names, 2)}
    return cases


CASES = pairwise_cases(FACTORS)


class Logits(Callbacks):
    def __init__(self):
        self.seen = {}

    def on_logits(self, token, batch, logits):
        self.seen[(token, batch)] = logits.clone()


def generate(spec, policy: Policy, schedule: str, offload_dir):
    weights = DummyWeights(spec, seed=5)
    ids, mask = synthetic_prompts(spec, policy.block_size, PROMPT_LEN, seed=2,
                                  varied_lengths=True)
    logits = Logits()
    with Engine(spec, weights, policy, schedule, callbacks=logits,
                offload_dir=offload_dir) as engine:
        out = engine.generate(ids, mask, GEN_LEN)
    return out, logits.seen


def test_the_grid_covers_every_pair():
    assert len(CASES) < 40
    for a, b in itertools.combinations(FACTORS, 2):
        seen = {(c[a], c[b]) for c in CASES}
        assert seen == set(itertools.product(FACTORS[a], FACTORS[b]))


@pytest.mark.parametrize("model", ["opt-tiny", "llama-tiny"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_offloaded_equals_resident(model, case, tmp_path):
    spec = ModelSpec.from_name(model)
    policy = Policy(gpu_batch_size=GPU_BATCH, num_gpu_batches=case["num_gpu_batches"],
                    weights=PLACES[case["weights"]], cache=PLACES[case["cache"]],
                    activations=PLACES[case["activations"]], overlap=case["overlap"],
                    cpu_delegation=case["cpu_delegation"])
    resident = Policy(gpu_batch_size=GPU_BATCH, num_gpu_batches=case["num_gpu_batches"])
    ref, ref_logits = generate(spec, resident, "zigzag", tmp_path)
    out, logits = generate(spec, policy, case["schedule"], tmp_path)
    assert torch.equal(out.output_ids, ref.output_ids)
    for key, value in ref_logits.items():
        torch.testing.assert_close(logits[key], value, atol=1e-4, rtol=0)
    assert [p for p in tmp_path.iterdir() if p.name.startswith("run-")] == [], "scratch left"
