"""One run in process: metrics by the paper's definitions, stored rows, hashes, failures."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from flexgen_lab.config import RunConfig
from flexgen_lab.engine.engine import Callbacks
from flexgen_lab.results.store import ResultStore
from flexgen_lab.runner import RunFailed, config_hash, run


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
    b.store.path = "elsewhere.sqlite"
    assert config_hash(a, "float32") == config_hash(b, "float32")
    b.seed = 1
    assert config_hash(a, "float32") != config_hash(b, "float32")
    assert config_hash(a, "float32") != config_hash(a, "bfloat16")


def test_trace_records_every_compute_step(tmp_path):
    cfg = tiny_config(tmp_path)
    cfg.trace = True
    run_id = run(cfg).run_id
    trace = ResultStore(cfg.store.path).trace(run_id)
    assert len(trace) == 8 * (2 + 2) * 2  # tokens x (layers + embed + head) x GPU batches
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
