"""Simulated pipeline runs through the runner: one runs row with num_stages, a stages row per
stage, and the profile's network keys required before any work."""

from __future__ import annotations

import pytest

from flexgen_lab.compose import compose_run_config
from flexgen_lab.config import ConfigError
from flexgen_lab.results.store import ResultStore
from flexgen_lab.runner import run

SMALL = ["backend=simulated", "model=opt-125m", "workload.prompt_len=64", "workload.gen_len=4",
         "dtype=float16", "policy.gpu_batch_size=4", "policy.num_gpu_batches=2"]


def test_a_simulated_pipeline_stores_its_stages(tmp_path):
    db = tmp_path / "r.sqlite"
    cfg = compose_run_config([*SMALL, "hardware=t4-paper-x4", "distributed=pipeline",
                              "distributed.stages=4", "trace=true", f"store.path={db}"])
    result = run(cfg)
    plain = run(compose_run_config([*SMALL, "hardware=t4-paper-x4", f"store.path={db}"]))
    store = ResultStore(db)
    runs = store.runs()
    assert list(runs.num_stages) == [4, 1]
    assert list(runs.num_prompts) == [4 * 8, 8]  # micro_blocks (= stages) x block, one block
    stages = store.stages(result.run_id)
    assert list(stages.stage) == [0, 1, 2, 3] and list(stages.layers) == [
        "0-2", "3-5", "6-8", "9-11"]
    assert (stages.bytes_network > 0).all() and stages.peak_rss_bytes.isna().all()
    assert runs.predicted_generation_throughput[0] > 0
    assert store.stages(plain.run_id).empty
    trace = store.trace(result.run_id)  # a step per (stage, token, micro-block)
    assert len(trace) == 4 * 4 * 4 and sorted(set(trace["rank"])) == [0, 1, 2, 3]


def test_a_profile_without_a_network_is_refused_naming_the_keys(tmp_path):
    cfg = compose_run_config([*SMALL, "hardware=t4-paper-sourced", "distributed=pipeline",
                              "distributed.stages=2", f"store.path={tmp_path / 'r.sqlite'}"])
    with pytest.raises(ConfigError, match="bw_network or network_latency_s"):
        run(cfg)
    assert not (tmp_path / "r.sqlite").exists()


def test_prompts_must_fill_whole_rounds_of_micro_blocks(tmp_path):
    cfg = compose_run_config([*SMALL, "hardware=t4-paper-x4", "distributed=pipeline",
                              "distributed.stages=2", "workload.num_prompts=8"])
    with pytest.raises(ConfigError, match="micro_blocks x block = 16"):
        run(cfg)
    row_by_row = compose_run_config([*SMALL, "hardware=t4-paper-x4", "distributed=pipeline",
                                     "schedule=row_by_row"])
    with pytest.raises(ConfigError, match="allowed: schedule=zigzag"):
        run(row_by_row)


@pytest.mark.parametrize("key,value,match", [
    ("network_latency_s", 2, "seconds per message in \\[0, 1\\)"),
    ("bw_network", "fast", "hardware.bw_network='fast'")])
def test_bad_network_keys_are_named(key, value, match):
    cfg = compose_run_config(["hardware=t4-paper-x4", f"hardware.{key}={value}"])
    with pytest.raises(ConfigError, match=match):
        run(cfg)
