"""The simulator: exact timing of hand-built op streams, and agreement with the cost model."""

from __future__ import annotations

import dataclasses

import pytest

from flexgen_lab.engine.policy import Placement, Policy
from flexgen_lab.engine.schedule import Op
from flexgen_lab.models.spec import ModelSpec
from flexgen_lab.planner.cost_model import predict
from flexgen_lab.planner.job import Job
from flexgen_lab.sim.simulator import Cost, run_stream, simulate
from tests.planner.test_cost_model import profile

MIX = Placement(0.3, 0.4)


def costs(table: dict) -> callable:
    """cost_of for a hand-built stream: (kind, layer) -> Cost."""
    return lambda op: table[(op.kind, op.layer)]


def test_a_hand_built_stream_overlaps_exactly_as_its_dependencies_allow():
    # two layers, one batch, one token: the second layer's weights queue behind the first's
    # on the cpu->gpu link, its hidden input waits for the store that writes it, and then
    # queues on the same link behind those weights
    ops = [Op("load_weight", 0, 0, 0), Op("load_weight", 0, 1, 0), Op("compute", 0, 0, 0),
           Op("store_hidden", 0, 0, 0), Op("load_hidden", 0, 1, 0), Op("compute", 0, 1, 0)]
    table = {("load_weight", 0): Cost(links=(("cpu_to_gpu", 1.0),)),
             ("load_weight", 1): Cost(links=(("cpu_to_gpu", 3.0),)),
             ("compute", 0): Cost(compute_s=2.0),
             ("store_hidden", 0): Cost(links=(("gpu_to_cpu", 0.5),)),
             ("load_hidden", 1): Cost(links=(("cpu_to_gpu", 0.25),)),
             ("compute", 1): Cost(compute_s=1.0)}
    phase, end, records = run_stream(ops, costs(table), overlap=True)
    # w0 0-1, w1 1-4, compute0 1-3, store 3-3.5, load_hidden 4-4.25, compute1 4.25-5.25
    assert end == pytest.approx(5.25) and phase == pytest.approx([5.25, 0.0])
    parts = [c.compute_s + sum(s for _, s in c.links) for c in table.values()]
    assert end not in (pytest.approx(sum(parts)), pytest.approx(max(parts)))
    assert [(r["op"], r["start_s"], r["end_s"]) for r in records][-2:] == [
        ("load_hidden", 4.0, 4.25), ("compute", 4.25, 5.25)]
    phase, end, _ = run_stream(ops, costs(table), overlap=False)
    assert end == pytest.approx(sum(parts))  # no overlap: one op after the other


@pytest.mark.parametrize("workers,expected", [(1, 5.5), (2, 3.5), (3, 2.5)])
def test_io_workers_bound_the_loads_in_flight(workers, expected):
    # three loads on three different links, issued together: with two workers the third
    # starts when the first ends, with one they run one after the other, with three at once
    ops = [Op("load_weight", 0, 1, 0), Op("load_cache", 1, 1, 0), Op("load_hidden", 1, 1, 0),
           Op("compute", 1, 1, 0)]
    table = {("load_weight", 1): Cost(links=(("disk_to_cpu", 1.0),)),
             ("load_cache", 1): Cost(links=(("cpu_to_gpu", 2.0),)),
             ("load_hidden", 1): Cost(links=(("gpu_to_cpu", 2.0),)),
             ("compute", 1): Cost(compute_s=0.5)}
    _, end, _ = run_stream(ops, costs(table), overlap=True, workers=workers)
    assert end == pytest.approx(expected)


def test_the_profiles_io_workers_reach_the_simulator_and_the_cost_model():
    # every kind on the cpu tier: a window's transfers share the workers, so one worker is
    # slower than two, by both the simulator and the cost model
    spec = ModelSpec.from_name("opt-1.3b")
    policy = Policy(gpu_batch_size=8, num_gpu_batches=2, weights=Placement(0, 1),
                    cache=Placement(0, 1), activations=Placement(0, 1))
    t4 = profile("t4-paper")
    one, three = t4.replace(io_workers=1), t4.replace(io_workers=None)
    assert (one.workers(), three.workers(), t4.workers()) == (1, 2, 3)  # None: IO_THREADS
    for model in (simulate, predict):
        slow = model(Job(spec, policy, "zigzag", one, 128, 8)).generation_throughput
        fast = model(Job(spec, policy, "zigzag", three, 128, 8)).generation_throughput
        assert slow < fast, model.__name__


POLICIES = [
    (Policy(gpu_batch_size=4, num_gpu_batches=3, weights=MIX, cache=Placement(0.2, 0.5),
            activations=Placement(0.3, 0.3)), "zigzag"),
    (Policy(gpu_batch_size=4, num_gpu_batches=3, weights=MIX, cache=Placement(0.2, 0.5),
            activations=Placement(0.3, 0.3)), "row_by_row"),
    (Policy(gpu_batch_size=8, num_gpu_batches=2, weights=Placement(0, 0.5), cache=MIX,
            cpu_delegation=True, compress_weight=True, compress_cache=True), "zigzag"),
    (Policy(gpu_batch_size=8, weights=Placement(0.5, 0.5), attn_sparsity=0.5,
            cache=Placement(0, 1)), "zigzag"),
]


@pytest.mark.parametrize("policy,schedule", POLICIES)
def test_without_overlap_the_simulation_is_the_cost_models_sum(policy, schedule):
    spec, hw = ModelSpec.from_name("opt-1.3b"), profile("t4-paper")
    serial = dataclasses.replace(policy, overlap=False)
    job = Job(spec, serial, schedule, hw, 64, 6, 2, 2 * policy.block_size)
    sim, pred = simulate(job), predict(job)
    assert sim.prefill_s + sim.decode_s == pytest.approx(pred.prefill_s + pred.decode_s,
                                                          rel=1e-9)


@pytest.mark.parametrize("policy,schedule", POLICIES[:2])
def test_with_overlap_it_lies_between_the_busiest_resource_and_the_sum(policy, schedule):
    spec, hw = ModelSpec.from_name("opt-1.3b"), profile("t4-paper")
    job = Job(spec, policy, schedule, hw, 64, 6)
    sim = simulate(job)
    pred = predict(job)  # phase by phase: the busiest resource
    serial = predict(job.with_policy(dataclasses.replace(policy, overlap=False)))
    total = sim.prefill_s + sim.decode_s
    assert pred.prefill_s + pred.decode_s < total < serial.prefill_s + serial.decode_s


def test_opt_175b_on_the_papers_t4_simulates_without_weights():
    spec, hw = ModelSpec.from_name("opt-175b"), profile("t4-paper")
    policy = Policy(gpu_batch_size=32, num_gpu_batches=8, weights=Placement(0, 0.5),
                    cache=Placement(0, 0), activations=Placement(0, 1), cpu_delegation=True)
    sim = simulate(Job(spec, policy, "zigzag", hw, 512, 32))
    # every decode step streams the disk half of 350 GB of weights through the cpu
    assert sim.link_bytes["decode"]["disk_to_cpu"] > 31 * 0.5 * spec.weight_bytes(2)
    assert 0.05 < sim.generation_throughput < 5
    assert {r["op"] for r in sim.trace} == {"load_weight", "load_cache", "load_hidden",
                                            "compute", "store_cache", "store_hidden"}


@pytest.mark.parametrize("contention", [0.0, 0.5, 1.0])
def test_copies_beside_a_compute_slow_it_by_the_profiles_contention(contention):
    # the first stream again: compute0 (1-3) and w1 (1-4) run side by side for 2 s, so each
    # takes 2c longer (compute0 ends at 3 + 2c, w1 at 4 + 2c); the hidden load queues behind
    # w1 and waits for the store, and compute1 then runs beside nothing
    ops = [Op("load_weight", 0, 0, 0), Op("load_weight", 0, 1, 0), Op("compute", 0, 0, 0),
           Op("store_hidden", 0, 0, 0), Op("load_hidden", 0, 1, 0), Op("compute", 0, 1, 0)]
    table = {("load_weight", 0): Cost(links=(("cpu_to_gpu", 1.0),)),
             ("load_weight", 1): Cost(links=(("cpu_to_gpu", 3.0),)),
             ("compute", 0): Cost(compute_s=2.0),
             ("store_hidden", 0): Cost(links=(("gpu_to_cpu", 0.5),)),
             ("load_hidden", 1): Cost(links=(("cpu_to_gpu", 0.25),)),
             ("compute", 1): Cost(compute_s=1.0)}
    _, end, records = run_stream(ops, costs(table), overlap=True, contention=contention)
    compute0 = next(r for r in records if r["op"] == "compute" and r["layer"] == 0)
    assert compute0["end_s"] == pytest.approx(3.0 + 2.0 * contention)
    store_end = 3.0 + 2.0 * contention + 0.5
    assert end == pytest.approx(max(4.0 + 2.0 * contention, store_end) + 0.25 + 1.0)
    _, serial, _ = run_stream(ops, costs(table), overlap=False, contention=contention)
    assert serial == pytest.approx(7.75)  # nothing runs beside a compute without overlap


def test_contention_slows_the_cost_model_and_the_simulator_alike():
    """Weights streamed from the cpu tier on a T4 with compute slowed 10x, so copies and
    compute take about as long: with contention 1 (they take turns) overlap gains nothing,
    by the cost model exactly and by the simulator within 10 %; 0.5 lies between; without
    overlap nothing changes."""
    spec = ModelSpec.from_name("opt-1.3b")
    policy = Policy(gpu_batch_size=8, num_gpu_batches=2, weights=Placement(0.2, 0.8))
    serial_policy = dataclasses.replace(policy, overlap=False)
    t4 = profile("t4-paper")
    hw = t4.replace(mm_flops_decode=t4.mm_flops_decode / 10,
                    mm_flops_prefill=t4.mm_flops_prefill / 10)
    job = Job(spec, policy, "zigzag", hw, 128, 8)
    serial_job = job.with_policy(serial_policy)
    for model in (simulate, predict):
        rate = {c: model(job.replace(profile=hw.replace(overlap_contention=c))
                         ).generation_throughput for c in (0.0, 0.5, 1.0)}
        serial = model(serial_job).generation_throughput
        assert serial < 0.95 * rate[0.0], model.__name__  # overlap pays without contention
        assert rate[1.0] < rate[0.5] < rate[0.0], model.__name__
        assert rate[1.0] == pytest.approx(serial, rel=1e-9 if model is predict else 0.1)
        assert model(serial_job.replace(profile=hw.replace(overlap_contention=1.0))
                     ).generation_throughput == serial
    terms = predict(job.replace(profile=hw.replace(overlap_contention=1.0))).terms
    assert terms["decode"]["contention"] > 0
