"""The cost model: the original's own predictions reproduced, and ours moving the right way."""

from __future__ import annotations

import pytest

from flexgen_lab.compose import load_profile
from flexgen_lab.config import ConfigError
from flexgen_lab.engine.policy import Placement, Policy
from flexgen_lab.hardware.profile import HardwareProfile, parse_rate
from flexgen_lab.models.spec import ModelSpec
from flexgen_lab.planner.cost_model import predict
from flexgen_lab.planner.job import Job
from flexgen_lab.planner.original_cost_model import flexgen_original, flexgen_original_memory


def profile(name: str) -> HardwareProfile:
    return load_profile(name)


PAPER_512 = {  # facts §4: the s = 512 policies, and the original model's own predictions
    "opt-6.7b": (Policy(gpu_batch_size=2), 60.85),
    "opt-30b": (Policy(gpu_batch_size=48, num_gpu_batches=3, weights=Placement(0.2, 0.8),
                       cache=Placement(0, 1), activations=Placement(0, 1),
                       cpu_delegation=True), 7.14),
    "opt-175b": (Policy(gpu_batch_size=32, num_gpu_batches=8, weights=Placement(0, 0.5),
                        cache=Placement(0, 0), activations=Placement(0, 1),
                        cpu_delegation=True), 0.154),
}


@pytest.mark.parametrize("model", PAPER_512)
def test_original_variant_reproduces_its_own_predictions(model):
    policy, expected = PAPER_512[model]
    got = flexgen_original(Job(ModelSpec.from_name(model), policy, "zigzag",
                               profile("t4-paper-fitted"), 512, 32)).generation_throughput
    assert got == pytest.approx(expected, rel=0.01)


def test_original_memory_model_rejects_the_papers_own_policies():
    """Facts: under its own memory model (x 0.8) the original rejects all three s = 512
    policies; the over-budget terms are the ones the closing note explains."""
    hw = profile("t4-paper-fitted")
    capacity = {"gpu": hw.gpu_mem, "cpu": hw.cpu_mem, "disk": hw.disk_mem}
    over = {}
    for model, (policy, _) in PAPER_512.items():
        memory = flexgen_original_memory(ModelSpec.from_name(model), policy, 512, 32)
        over[model] = [name for name, terms in memory.items()
                       if sum(terms.values()) > 0.8 * capacity[name.split()[0]]]
    assert all(over.values())  # every policy breaks at least one of its constraints
    assert "gpu prefill" in over["opt-30b"] and "cpu decode" in over["opt-175b"]
    weights = flexgen_original_memory(ModelSpec.from_name("opt-6.7b"), PAPER_512["opt-6.7b"][0],
                                      512, 32)["gpu prefill"]["weights home"]
    assert weights == pytest.approx(0.8 * hw.gpu_mem, rel=0.01)  # 6.7B's weights fill 0.8 x 15


def test_paper_profile_presets_have_every_speed():
    for name in ("t4-paper", "t4-paper-fitted", "t4-paper-sourced", "a100-datasheet",
                 "h100-datasheet"):
        assert profile(name).missing_speeds() == []
    with pytest.raises(ConfigError, match="no speeds"):
        predict(Job(ModelSpec.from_name("opt-tiny"), Policy(), "zigzag", profile("local"), 8,
                    4))


def test_rates_parse_with_units():
    assert parse_rate("12.89GiB/s", "x") == pytest.approx(12.89 * 2**30)
    assert parse_rate("21.24TFLOP/s", "x") == pytest.approx(21.24e12)
    assert parse_rate(5e9, "x") == 5e9
    with pytest.raises(ConfigError, match="hardware.bw_cpu_to_gpu='fast'"):
        parse_rate("fast", "bw_cpu_to_gpu")


def test_our_model_moves_the_right_way():
    spec, hw = ModelSpec.from_name("opt-30b"), profile("t4-paper")
    base = dict(gpu_batch_size=48, num_gpu_batches=3, cache=Placement(0, 1),
                activations=Placement(0, 1), cpu_delegation=True)

    def tput(schedule="zigzag", **changes):
        policy = Policy(**{**base, "weights": Placement(0.2, 0.8), **changes})
        return predict(Job(spec, policy, schedule, hw, 512, 32)).generation_throughput

    assert tput(weights=Placement(0.4, 0.6)) > tput()  # more weights on the GPU: faster
    assert tput(overlap=False) < tput()
    assert tput("row_by_row") < tput()  # weights stream once per batch, not per block
    assert tput(weights=Placement(0.2, 0.3)) < tput()  # half the CPU share on disk: slower
    assert tput(cpu_delegation=False) < tput()  # at s = 512 the cache transfer dominates


def test_decode_reads_every_weight_each_step_so_batching_pays_when_resident():
    spec, hw = ModelSpec.from_name("opt-6.7b"), profile("t4-paper")
    small, large = (predict(Job(spec, Policy(gpu_batch_size=b), "zigzag", hw, 512, 32))
                    for b in (1, 8))
    assert large.generation_throughput > 4 * small.generation_throughput
    without = hw.replace(gpu_mem_bw=None)  # the original had no such term: batching is flat
    a, b = (predict(Job(spec, Policy(gpu_batch_size=g), "zigzag", without, 512, 32))
            for g in (1, 8))
    assert b.generation_throughput == pytest.approx(a.generation_throughput, rel=0.05)


def test_dequantisation_costs_time_when_the_profile_knows_its_rate():
    spec, hw = ModelSpec.from_name("opt-1.3b"), profile("t4-paper")
    plain = Policy(gpu_batch_size=8, weights=Placement(0, 1))
    packed = Policy(gpu_batch_size=8, weights=Placement(0, 1), compress_weight=True)
    fast = hw.replace(dequant_rate=None)
    assert (predict(Job(spec, packed, "zigzag", fast, 128, 8)).generation_throughput
            > predict(Job(spec, plain, "zigzag", fast, 128, 8)).generation_throughput)
    slow = hw.replace(dequant_rate=1e9)  # 1 GB/s of unpacked weights
    pred = predict(Job(spec, packed, "zigzag", slow, 128, 8))
    # every matrix is unpacked once per step (the tied head unpacks the embedding again)
    matrices = [s for shapes in (spec.embedding_param_shapes(), spec.head_param_shapes(),
                                 *[spec.layer_param_shapes()] * spec.num_layers)
                for s in shapes.values() if len(s) == 2]
    unpacked = 2 * (sum(r * c for r, c in matrices) + spec.vocab * spec.hidden)
    assert spec.tie_embeddings
    assert pred.terms["decode"]["dequant"] == pytest.approx(7 * unpacked / 1e9)
    assert pred.generation_throughput < predict(Job(spec, plain, "zigzag", slow, 128,
                                                    8)).generation_throughput
