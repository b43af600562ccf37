"""calibrate fit=true: least squares recovers known speeds and reports on held-out runs."""

from __future__ import annotations

import math

import pytest

from flexgen_lab.engine.policy import Placement, Policy
from flexgen_lab.models.spec import ModelSpec
from flexgen_lab.planner.cost_model import predict
from flexgen_lab.planner.fit import Observation, errors, fit, split
from flexgen_lab.planner.job import Job
from tests.planner.test_cost_model import profile

CPU, DISK = Placement(0, 1), Placement(0, 0)
POLICIES = [Policy(gpu_batch_size=1), Policy(gpu_batch_size=8),
            Policy(gpu_batch_size=4, weights=CPU),
            Policy(gpu_batch_size=4, weights=DISK, overlap=False),
            Policy(gpu_batch_size=8, cache=CPU, overlap=False),
            Policy(gpu_batch_size=8, cache=CPU, cpu_delegation=True, overlap=False),
            Policy(gpu_batch_size=4, num_gpu_batches=2, activations=CPU, overlap=False),
            Policy(gpu_batch_size=8, weights=CPU, compress_weight=True)]


def observed(truth, spec, policies) -> list[Observation]:
    """Runs 'measured' on a machine whose speeds are `truth` (its cost-model times)."""
    out = []
    for n, policy in enumerate(policies):
        pred = predict(Job(spec, policy, "zigzag", truth, 64, 8, 2))
        out.append(Observation(spec, policy, "zigzag", 64, 8, policy.block_size, 2,
                               pred.prefill_s, pred.decode_s, n))
    return out


def test_the_fit_recovers_the_speeds_that_produced_the_runs():
    spec, base = ModelSpec.from_name("opt-1.3b"), profile("t4-paper")
    truth = base.replace(mm_flops_decode=base.mm_flops_decode * 0.3,
                         bw_cpu_to_gpu=base.bw_cpu_to_gpu * 0.5,
                         cpu_flops=base.cpu_flops * 0.02, step_overhead_s=2e-4)
    train = observed(truth, spec, POLICIES)
    assert max(abs(e) for e in errors(base, train)) > 0.3  # the base profile is far off
    fitted, report = fit(base, train)
    assert report.median_error < 0.02
    assert report.factors["bw_cpu_to_gpu"] == pytest.approx(0.5, rel=0.05)
    assert report.factors["cpu_flops"] == pytest.approx(0.02, rel=0.1)
    assert fitted.step_overhead_s == pytest.approx(2e-4, rel=0.2)
    held = observed(truth, spec, [Policy(gpu_batch_size=16, weights=Placement(0.5, 0.5)),
                                  Policy(gpu_batch_size=2, cache=CPU, cpu_delegation=True)])
    assert max(abs(e) for e in errors(fitted, held)) < 0.05  # never fitted on


def test_speeds_the_runs_never_exercise_keep_their_measured_value():
    spec, base = ModelSpec.from_name("opt-1.3b"), profile("t4-paper")
    train = observed(base.replace(bw_cpu_to_gpu=base.bw_cpu_to_gpu / 3), spec,
                     [Policy(gpu_batch_size=4, weights=CPU), Policy(gpu_batch_size=8)])
    fitted, report = fit(base, train)
    assert "bw_disk_to_cpu" not in report.factors and "cpu_flops" not in report.factors
    assert fitted.bw_disk_to_cpu == base.bw_disk_to_cpu
    assert math.isclose(report.factors["bw_cpu_to_gpu"], 1 / 3, rel_tol=0.1)


def test_every_kth_run_is_held_out():
    train, held = split(list(range(10)), 0.25)
    assert held == [3, 7] and len(train) == 8
    with pytest.raises(ValueError, match="holdout"):
        split(list(range(10)), 1.5)
