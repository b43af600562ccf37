"""One run in process: metrics by the paper's definitions, stored rows, hashes, failures."""

from __future__ import annotations

import dataclasses
import threading

import pytest
import torch

from flexgen_lab.config import ConfigError, RunConfig
from flexgen_lab.engine.engine import Callbacks
from flexgen_lab.hardware.profile import HardwareProfile
from flexgen_lab.models.spec import ModelSpec
from flexgen_lab.planner.job import Job
from flexgen_lab.planner.memory_model import peak_bytes
from flexgen_lab.planner.search import search
from flexgen_lab.results.store import ResultStore
from flexgen_lab.runner import RunFailed, config_hash, run, to_policy


def tiny_config(tmp_path, **workload) -> RunConfig:
    cfg = RunConfig()
    cfg.model.name = "opt-tiny"
    cfg.workload = dataclasses.replace(cfg.workload, prompt_len=16, gen_len=8, **workload)
    cfg.policy.gpu_batch_size = 3
    cfg.policy.num_gpu_batches = 2
    cfg.store.path = str(tmp_path / "r.sqlite")
    return cfg


def test_metrics_follow_the_paper_definitions(tmp_path):
    result = run(tiny_config(tmp_path))
    r = result.row
    n, s, g = 6, 16, 8
    assert r["num_prompts"] == n and r["dtype"] == "float32" and r["device"] == "cpu"
    assert r["prefill_s"] > 0 and r["decode_s"] > 0
    assert r["latency_s"] == pytest.approx(r["prefill_s"] + r["decode_s"])
    assert r["prefill_throughput"] == pytest.approx(n * s / r["prefill_s"])
    assert r["decode_throughput"] == pytest.approx(n * (g - 1) / r["decode_s"])
    assert r["generation_throughput"] == pytest.approx(n * g / r["latency_s"])
    assert r["peak_rss_bytes"] >= 0 and r["peak_cuda_bytes"] is None
    stored = ResultStore(tmp_path / "r.sqlite")
    row = stored.runs().iloc[0]
    assert row.status == "ok" and row.w_gpu == 1.0 and row.w_disk == 0.0
    tokens = stored.tokens(int(row.run_id))
    assert [out for _, _, out in tokens] == result.generation.output_ids.tolist()
    assert all(len(prompt) == s for _, prompt, _ in tokens)


def test_config_hash_ignores_the_store_but_not_the_run(tmp_path):
    a, b = tiny_config(tmp_path), tiny_config(tmp_path)
    b.store.path, b.engine.offload_dir = "elsewhere.sqlite", "/elsewhere"
    b.hardware.source = "a note"
    assert config_hash(a, "float32", "cpu") == config_hash(b, "float32", "cpu")
    b.seed = 1
    assert config_hash(a, "float32", "cpu") != config_hash(b, "float32", "cpu")
    assert config_hash(a, "float32", "cpu") != config_hash(a, "bfloat16", "cpu")
    assert config_hash(a, "float32", "cpu") != config_hash(a, "float32", "cuda:0 NVIDIA T4")


def test_trace_records_every_compute_step(tmp_path):
    cfg = tiny_config(tmp_path)
    cfg.trace = True
    run_id = run(cfg).run_id
    trace = ResultStore(cfg.store.path).trace(run_id)
    computes = trace[trace.op == "compute"]
    assert len(computes) == 8 * (2 + 2) * 2  # tokens x (layers + embed + head) x GPU batches
    assert (trace.end_s >= trace.start_s).all()


class Interrupt(Callbacks):
    def on_step(self, step, start_s, end_s):
        if step.token == 2:
            raise KeyboardInterrupt


def test_interrupted_run_is_stored_as_error_after_earlier_rows(tmp_path):
    cfg = tiny_config(tmp_path)
    run(cfg)
    with pytest.raises(RunFailed) as err:
        run(cfg, callbacks=Interrupt())
    assert err.value.status == "error" and err.value.run_id == 2
    runs = ResultStore(cfg.store.path).runs()
    assert list(runs.status) == ["ok", "error"] and "KeyboardInterrupt" in runs.error[1]


def test_sampling_is_seeded_and_differs_from_greedy(tmp_path):
    greedy = run(tiny_config(tmp_path)).generation.output_ids
    sampled = [run(tiny_config(tmp_path, temperature=1.5)).generation.output_ids
               for _ in range(2)]
    assert torch.equal(sampled[0], sampled[1])
    assert not torch.equal(sampled[0], greedy)


def test_stop_token_pads_the_rest_of_the_sequence(tmp_path):
    free = run(tiny_config(tmp_path)).generation.output_ids
    stop = int(free[0, 2])
    stopped = run(tiny_config(tmp_path, stop_token=stop)).generation.output_ids
    first = int((free[0] == stop).nonzero()[0])
    assert torch.equal(stopped[0, :first + 1], free[0, :first + 1])
    assert (stopped[0, first + 1:] == 1).all()  # opt's pad id


def test_hf_system_gives_the_engines_tokens(tmp_path):
    ours = tiny_config(tmp_path, varied_lengths=True)
    theirs = tiny_config(tmp_path, varied_lengths=True)
    theirs.system.name = "hf"
    theirs.policy.num_gpu_batches = 1
    theirs.workload = dataclasses.replace(theirs.workload, num_prompts=6)
    assert torch.equal(run(ours).generation.output_ids, run(theirs).generation.output_ids)


def test_over_budget_run_is_stored_as_oom_and_leaves_no_scratch(tmp_path):
    cfg = tiny_config(tmp_path)
    cfg.hardware.gpu_mem = "64KiB"
    cfg.policy.cache.gpu, cfg.policy.cache.cpu = 0.0, 0.0
    cfg.engine.offload_dir = str(tmp_path / "offload")
    with pytest.raises(RunFailed) as err:
        run(cfg)
    assert err.value.status == "oom" and "gpu tier" in str(err.value)
    row = ResultStore(cfg.store.path).runs().iloc[0]
    assert row.status == "oom" and "BudgetExceeded" in row.error
    offload = tmp_path / "offload"
    assert not offload.exists() or not [p for p in offload.iterdir() if p.name.startswith("run-")]


def test_offloaded_run_stores_links_peaks_and_placement(tmp_path):
    import json

    cfg = tiny_config(tmp_path)
    cfg.policy.weights.gpu, cfg.policy.weights.cpu = 0.25, 0.5
    cfg.policy.cache.gpu, cfg.policy.cache.cpu = 0.0, 1.0
    cfg.policy.cpu_delegation = True
    cfg.engine.offload_dir = str(tmp_path / "offload")
    resident = run(tiny_config(tmp_path)).generation.output_ids
    result = run(cfg)
    assert torch.equal(result.generation.output_ids, resident)
    row = ResultStore(cfg.store.path).runs().iloc[-1]
    assert row.bytes_cpu_to_gpu > 0 and row.bytes_disk_to_cpu > 0 and row.bytes_cpu_to_disk == 0
    assert row.peak_gpu_bytes > 0 and row.peak_cpu_bytes > 0 and row.peak_disk_bytes > 0
    placement = json.loads(row.placement_json)
    weights = placement["weights"]
    total = sum(t["achieved"] for t in weights.values())
    for tier in ("gpu", "cpu", "disk"):
        assert abs(weights[tier]["achieved"] - weights[tier]["asked"]) < 0.02 * total
    assert json.loads(row.link_bytes_json)["decode"]["cpu_to_gpu"] > 0


SPEEDS = (("bw_cpu_to_gpu", "8GB/s"), ("bw_gpu_to_cpu_cache", "8GB/s"),
                      ("bw_gpu_to_cpu_hidden", "8GB/s"), ("bw_disk_to_cpu", "1.8GB/s"),
                      ("bw_cpu_to_disk_cache_prefill", "1GB/s"),
                      ("bw_cpu_to_disk_hidden_prefill", "1GB/s"),
                      ("bw_cpu_to_disk_decode", "1GB/s"), ("mm_flops_prefill", "100GFLOP/s"),
                      ("mm_flops_decode", "50GFLOP/s"), ("bmm_flops_prefill", "50GFLOP/s"),
                      ("bmm_flops_decode", "10GFLOP/s"), ("cpu_flops", "10GFLOP/s"))


def test_a_profile_with_speeds_stores_the_cost_models_prediction(tmp_path):
    cfg = tiny_config(tmp_path)
    assert run(cfg).row.get("predicted_generation_throughput") is None  # local: no speeds
    for key, rate in SPEEDS:
        setattr(cfg.hardware, key, rate)
    run(cfg)
    row = ResultStore(cfg.store.path).runs().iloc[-1]
    assert row.predicted_generation_throughput > 0
    assert row.predicted_prefill_s > 0 and row.predicted_decode_s > 0


def test_policy_search_runs_the_searched_policy_and_keeps_the_requested_hash(tmp_path):
    cfg = tiny_config(tmp_path)
    cfg.policy.name, cfg.policy.cpu_delegation = "search", None
    with pytest.raises(ConfigError, match="no speeds"):
        run(cfg)  # hardware=local has capacities but no speeds
    for key, rate in SPEEDS:
        setattr(cfg.hardware, key, rate)
    cfg.hardware.gpu_mem = "0.9MiB"  # the requested block of 3 x 2, resident, needs more
    spec, budget = ModelSpec.from_name("opt-tiny"), 0.9 * 2**20
    assert peak_bytes(Job(spec, to_policy(cfg), "zigzag", None, 16, 8, 4))["gpu"] > budget
    cfg.engine.offload_dir = str(tmp_path / "offload")
    asked = config_hash(cfg, "float32", "cpu")
    result = run(cfg)
    row = ResultStore(cfg.store.path).runs().iloc[-1]
    assert row.status == "ok" and row.config_hash == asked
    expected = search(spec, HardwareProfile.from_config(cfg.hardware), 16, 8, 4, to_policy(cfg),
                      delegation=None, rerank_top=cfg.search.rerank_top).policy
    assert (row.gpu_batch_size, row.num_gpu_batches) == (expected.gpu_batch_size,
                                                         expected.num_gpu_batches)
    assert (row.w_gpu, row.c_gpu, row.a_gpu) == pytest.approx(
        (expected.weights.gpu, expected.cache.gpu, expected.activations.gpu))
    assert row.predicted_generation_throughput > 0 and row.peak_gpu_bytes <= budget
    assert result.generation.output_ids.shape[0] == row.num_prompts


def test_cost_model_variant_selects_the_original_formulas(tmp_path):
    cfg = tiny_config(tmp_path)
    for key, rate in SPEEDS:
        setattr(cfg.hardware, key, rate)
    ours = run(cfg).row["predicted_generation_throughput"]
    cfg.cost_model.variant = "flexgen-original"
    original = run(cfg).row["predicted_generation_throughput"]
    assert ours > 0 and original > 0 and original != pytest.approx(ours)
    cfg.cost_model.variant = "roofline"
    with pytest.raises(ConfigError, match="cost_model.variant='roofline'"):
        run(cfg)


class ThreadNames(Callbacks):
    """The threads the engine's loads and stores ran on (on_op is called on them)."""

    def __init__(self):
        self.names = set()

    def on_op(self, record):
        if record["op"] != "compute":
            self.names.add(threading.current_thread().name)


@pytest.mark.parametrize("engine,hardware,expected", [(None, None, 2), (None, 3, 3), (1, 3, 1)])
def test_io_workers_come_from_the_engine_the_profile_or_the_device(tmp_path, engine, hardware,
                                                                   expected):
    """engine.io_workers, else hardware.io_workers, else the device's default (2 on the CPU):
    the engine's I/O runs on that many threads, and the prediction uses as many."""
    from flexgen_lab.runner import io_workers, run_profile

    cfg = tiny_config(tmp_path)
    cfg.engine.io_workers, cfg.hardware.io_workers = engine, hardware
    cfg.engine.offload_dir = str(tmp_path / "offload")
    cfg.policy.weights.gpu, cfg.policy.weights.cpu = 0.0, 0.5  # loads on cpu and disk
    cfg.policy.cache.gpu, cfg.policy.cache.cpu = 0.0, 1.0
    cpu = torch.device("cpu")
    assert io_workers(cfg, cpu) == run_profile(cfg, cpu).workers() == expected
    names = ThreadNames()
    run(cfg, names)
    assert names.names and len(names.names) <= expected
    assert all(name.startswith("io") for name in names.names)
