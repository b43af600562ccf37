"""Operator time tables (hardware/op_table.py) and per-copy latencies: measured at a model's own
shapes, looked up with interpolation, and what the cost model and the simulator then use."""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flexgen_lab.engine import schedule as schedules
from flexgen_lab.engine.policy import Placement, Policy
from flexgen_lab.engine.transfer import LINKS, phase_of
from flexgen_lab.hardware.op_table import (
    COMPRESSION_OPS,
    OPS,
    OpTable,
    measure_table,
    shape_key,
)
from flexgen_lab.models.spec import ModelSpec
from flexgen_lab.planner.cost_model import predict
from flexgen_lab.planner.job import Job
from flexgen_lab.planner.traffic import OpTraffic, window_bytes
from flexgen_lab.sim.simulator import simulate
from tests.planner.test_cost_model import profile
from tests.strategies import policies


def table(scale: float = 1.0) -> OpTable:
    """A hand-made table: 1 ms fixed cost, then 1 us per unit of size."""
    points = tuple((float(s), scale * (1e-3 + 1e-6 * s)) for s in (1, 16, 256, 4096))
    return OpTable(dict.fromkeys(OPS, points))


@given(st.lists(st.tuples(st.integers(1, 10**6), st.floats(1e-6, 1.0)), min_size=1,
                max_size=8, unique_by=lambda p: p[0]), st.floats(0.0, 2e6))
def test_lookup_is_exact_on_the_grid_linear_between_and_proportional_beyond(points, size):
    points = sorted((float(s), t) for s, t in points)
    t = OpTable(dict.fromkeys(OPS, tuple(points)))
    for s, seconds in points:
        assert t.seconds("dense", s) == pytest.approx(seconds)
    got = t.seconds("dense", size)
    if size <= 0:
        assert got == 0
    elif size <= points[0][0]:
        assert got == points[0][1]  # a call's fixed cost: never less than the smallest one
    elif size > points[-1][0]:
        assert got == pytest.approx(points[-1][1] * size / points[-1][0])
    else:
        below = max(p for p in points if p[0] <= size)
        above = min(p for p in points if p[0] >= size)
        assert min(below[1], above[1]) - 1e-12 <= got <= max(below[1], above[1]) + 1e-12


def test_a_measured_table_covers_every_operator_at_the_models_shapes():
    spec = ModelSpec.from_name("llama-tiny")
    measured = measure_table(spec, torch.float32, torch.device("cpu"), quick=True)
    # float32 attends a decoded cache in float32: attention_decode is that time
    assert set(measured.points) == set(OPS) | set(COMPRESSION_OPS) - {"attention_decode_decoded"}
    for op, points in measured.points.items():
        sizes = [s for s, _ in points]
        assert sizes == sorted(sizes) and all(s & (s - 1) == 0 for s in map(int, sizes)), op
        assert all(t > 0 for _, t in points), op
    assert OpTable.from_json(measured.to_json()) == measured
    assert shape_key(spec, 4) != shape_key(spec, 2) != shape_key(ModelSpec.from_name(
        "opt-tiny"), 2)


def test_the_cost_model_reads_the_table_of_the_models_shapes():
    spec, hw = ModelSpec.from_name("opt-125m"), profile("t4-paper")
    resident = Policy(gpu_batch_size=8)
    with_table = hw.replace(op_tables={shape_key(spec, 2): table()})
    slower = hw.replace(op_tables={shape_key(spec, 2): table(2.0)})
    job = Job(spec, resident, "zigzag", hw, 64, 8)
    flops = predict(job)
    once = predict(job.replace(profile=with_table))
    twice = predict(job.replace(profile=slower))
    assert once.decode_s != pytest.approx(flops.decode_s, rel=0.01)  # the table, not FLOP/s
    # resident, no overhead and no dequantisation: every compute second comes from the table
    assert twice.decode_s == pytest.approx(2 * once.decode_s)
    # decode layer step: 8 sequences -> dense(8) + attention(8 x mean keys), per layer
    layer = (1e-3 + 8e-6) + (1e-3 + 1e-6 * 8 * (64 + 8 / 2))
    assert once.terms["decode"]["matmul"] + once.terms["decode"]["attention"] == pytest.approx(
        7 * (spec.num_layers * layer + (1e-3 + 8e-6) + (1e-3 + 8e-6)), rel=0.02)
    # another dtype's table is not this one's
    assert predict(job.replace(profile=hw.replace(
        op_tables={shape_key(spec, 4): table()}))).decode_s == flops.decode_s


def test_a_half_precision_table_on_a_cpu_times_attention_over_a_decoded_cache():
    """bfloat16 on a CPU: a compressed cache decodes into float32 and attends there
    (cache_homes.decoded_dtype), so the table holds that time beside attention_decode."""
    measured = measure_table(ModelSpec.from_name("llama-tiny"), torch.bfloat16,
                             torch.device("cpu"), quick=True)
    assert measured.has("attention_decode_decoded")
    assert all(t > 0 for _, t in measured.points["attention_decode_decoded"])


def test_a_compressed_cache_is_attended_at_the_decoded_dtypes_time():
    """Decode attention reads attention_decode_decoded where the cache is compressed and the
    table has it; an uncompressed cache, prefill and a table without it read attention_decode."""
    spec, hw = ModelSpec.from_name("opt-125m"), profile("t4-paper")
    halved = tuple((s, t / 2) for s, t in table().points["attention_decode"])
    both = OpTable({**table().points, "attention_decode_decoded": halved})
    policy = Policy(gpu_batch_size=8, compress_cache=True)
    job = Job(spec, policy, "zigzag", hw.replace(op_tables={shape_key(spec, 2): both}), 64, 8)
    plain = job.replace(profile=hw.replace(op_tables={shape_key(spec, 2): table()}))
    compressed, reference = predict(job).terms, predict(plain).terms
    assert compressed["decode"]["attention"] == pytest.approx(
        reference["decode"]["attention"] / 2)
    assert compressed["prefill"]["attention"] == reference["prefill"]["attention"]
    uncompressed = dataclasses.replace(policy, compress_cache=False)
    assert predict(job.with_policy(uncompressed)).terms["decode"]["attention"] == \
        reference["decode"]["attention"]


def test_dequantisation_is_read_from_the_table_where_it_has_it():
    """Compressed weights and cache cost the table's dequant times at the model's shapes
    (one layer's matrices per (token, layer) in zig-zag; past keys and values per decode
    step; the stored keys and values quantised per step and GPU batch); a table stored
    before those operators existed falls back to dequant_rate."""
    spec, hw = ModelSpec.from_name("opt-125m"), profile("t4-paper")
    old = OpTable.from_json({op: [[1, 1e-3]] for op in OPS})
    assert not old.has("dequant_layer")
    layer_s, per_row_key = 0.25, 1e-6
    dequant = {"dequant_layer": ((1.0, layer_s),), "dequant_embed": ((1.0, 0.5),),
               "dequant_head": ((1.0, 0.75),),
               "dequant_cache": ((1.0, per_row_key), (2.0**20, 2.0**20 * per_row_key)),
               "quant_cache": ((1.0, 1e-3), (64.0, 4e-3))}
    new = OpTable({**old.points, **dequant})
    policy = Policy(gpu_batch_size=4, num_gpu_batches=2, weights=Placement(0, 1),
                    compress_weight=True, compress_cache=True)
    s, n = 16, 3
    job = Job(spec, policy, "zigzag", hw, s, n)
    terms = predict(job.replace(profile=hw.replace(op_tables={shape_key(spec, 2): new}))).terms
    stores = spec.num_layers * 2  # every (layer, GPU batch) quantises what it stores
    assert terms["prefill"]["dequant"] == pytest.approx(  # weights once per part: 1st batch
        spec.num_layers * layer_s + 0.5 + 0.75 + stores * 4e-3)  # 4 x 16 rows: 64
    mean_keys = s + (n - 1) / 2  # decode steps see s .. s + n - 2 past positions
    cache = spec.num_layers * 2 * (n - 1) * 4 * (mean_keys - 0.5) * per_row_key
    quant = stores * (n - 1) * (1e-3 + 3 * 3e-3 / 63)  # 4 rows, between the grid points
    assert terms["decode"]["dequant"] == pytest.approx(
        (n - 1) * (spec.num_layers * layer_s + 0.5 + 0.75) + cache + quant, rel=0.02)
    fallback = predict(job.replace(profile=hw.replace(
        op_tables={shape_key(spec, 2): old}))).terms
    without = predict(job.replace(profile=hw.replace(
        op_tables={shape_key(spec, 2): old}, dequant_rate=None))).terms
    assert fallback["decode"]["dequant"] > 0 == without["decode"]["dequant"]


@settings(max_examples=25, deadline=None)
@given(policies(max_batch_size=4, max_batches=3), st.sampled_from(("zigzag", "row_by_row")))
def test_copies_per_window_are_the_ops_that_move_bytes(policy, schedule):
    spec, s, n = ModelSpec.from_name("opt-tiny"), 5, 4
    job = Job(spec, policy, schedule, None, s, n, 4)
    copies, traffic = window_bytes(job, requests=True), OpTraffic(job)
    counted = {"prefill": Counter(), "decode": Counter()}
    for op in schedules.ops(schedule, n, spec.num_layers + 2, policy.num_gpu_batches):
        for link, nbytes in traffic(op).items():
            counted[phase_of(op.token)][link] += 1 if nbytes else 0
    for phase, windows in copies.items():
        assert {link: sum(w[link] for w in windows.values()) for link in LINKS} == {
            link: counted[phase][link] for link in LINKS}, phase


@pytest.mark.parametrize("schedule", ["zigzag", "row_by_row"])
def test_latency_and_tables_keep_the_simulator_equal_to_the_cost_models_sum(schedule):
    spec = ModelSpec.from_name("opt-1.3b")
    hw = profile("t4-paper").replace(op_tables={shape_key(spec, 2): table()},
                                     io_latency_s={"cpu_to_gpu": 2e-5, "gpu_to_cpu": 3e-5,
                                                   "disk_to_cpu": 1e-4, "cpu_to_disk": 2e-4})
    policy = Policy(gpu_batch_size=4, num_gpu_batches=3, weights=Placement(0.3, 0.4),
                    cache=Placement(0.2, 0.5), activations=Placement(0.3, 0.3), overlap=False)
    job = Job(spec, policy, schedule, hw, 64, 6, 2, 2 * policy.block_size)
    sim, pred = simulate(job), predict(job)
    assert sim.prefill_s + sim.decode_s == pytest.approx(pred.prefill_s + pred.decode_s,
                                                          rel=1e-9)
    no_latency = predict(job.replace(profile=dataclasses.replace(hw, io_latency_s={})))
    assert pred.decode_s > no_latency.decode_s
