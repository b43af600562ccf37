"""Pipeline parallel runs launched for real: torchrun, one process per stage, gloo.

Four launches (each a few seconds of start-up): OPT over 3 stages and Llama (GQA) over 2,
offloaded, give the single-process engine's tokens and one row with its stages; a stage over
its budget stores one oom row and every rank exits within the timeout; a launch whose world
size differs from distributed.stages is refused on every rank with exit 2.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from flexgen_lab.compose import compose_run_config
from flexgen_lab.pipeline.stages import stage_layers
from flexgen_lab.results.store import ResultStore
from flexgen_lab.results.timeline import plot_run
from flexgen_lab.runner import run

TIMEOUT_S = 10  # distributed.timeout_s of every launch


def torchrun(nproc: int, overrides: list[str], cwd) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", "-m", "flexgen_lab", "run", "distributed=pipeline",
           f"distributed.timeout_s={TIMEOUT_S}", *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=cwd)


def single_process_tokens(overrides: list[str], store: str) -> list:
    cfg = compose_run_config([*overrides, f"store.path={store}"])
    result = run(cfg)
    return ResultStore(store).tokens(result.run_id)


def only_run(store: str):
    runs = ResultStore(store).runs()
    assert len(runs) == 1, runs[["status", "error"]]
    row = runs.iloc[0]
    row.run_id = int(row.run_id)
    return row


def overlapping(trace) -> int:
    """(stage s + 1, micro-block m) compute spans that overlap (stage s, m + 1)'s."""
    c = trace[trace.op == "compute"]
    spans = c.groupby(["stage", "token", "batch"]).agg(a=("start_s", "min"), b=("end_s", "max"))
    count = 0
    for (stage, token, batch), row in spans.iterrows():
        key = (stage - 1, token, batch + 1)
        if stage and key in spans.index:
            o = spans.loc[key]
            count += bool(row.a < o.b and o.a < row.b)
    return count


def test_opt_over_three_stages_is_the_single_process_run(hf_checkpoint, tmp_path):
    path, _ = hf_checkpoint("opt-odd")  # 3 layers, tied head: the last stage holds its own
    policy = ["model=local", f"model.path={path}", "workload.prompt_len=12",
              "workload.gen_len=5", "policy.gpu_batch_size=2", "policy.num_gpu_batches=2",
              "policy.weights.gpu=0.5", "policy.weights.cpu=0.5", "policy.cache.gpu=0.5",
              "policy.cache.cpu=0.25", f"engine.offload_dir={tmp_path}/offload",
              "workload.num_prompts=16"]
    store = f"{tmp_path}/r.sqlite"
    out = torchrun(3, [*policy, "distributed.stages=3", "distributed.micro_blocks=2",
                       "trace=true", f"store.path={store}"], tmp_path)
    assert out.returncode == 0, out.stderr[-4000:]
    row = only_run(store)
    assert row.status == "ok" and row.num_stages == 3 and row.num_prompts == 16
    s = ResultStore(store)
    assert s.tokens(row.run_id) == single_process_tokens(policy, f"{tmp_path}/one.sqlite")
    stages = s.stages(row.run_id)
    assert list(stages.layers) == ["0-0", "1-1", "2-2"] and list(stages["rank"]) == [0, 1, 2]
    # activations go on whole: 16 prompts x (12 + 4 x 1 tokens) x hidden 72 x 4 bytes; the
    # last stage sends each prompt's tokens 0..3 back (int64)
    assert list(stages.bytes_network) == [16 * 16 * 72 * 4] * 2 + [16 * 4 * 8]
    assert (stages.bytes_cpu_to_gpu > 0).all() and (stages.peak_rss_bytes > 0).all()
    trace = s.trace(row.run_id)
    assert set(trace["rank"]) == {0, 1, 2} and set(trace.batch) == set(range(8))
    assert overlapping(trace) > 0  # stage s + 1 on micro-block m while s is on m + 1
    drawn = plot_run(s, row.run_id, tmp_path / "plots")  # `plot run_id=N` draws it
    assert [p.suffix for p in drawn] == [".png", ".svg"] and drawn[0].stat().st_size > 0
    logs = list(tmp_path.glob("results/hydra/pipeline/*/rank*/*.log"))
    assert len(logs) == 3 and all("stage" in log.read_text() for log in logs)
    assert not [p for p in (tmp_path / "offload").rglob("*") if p.is_file()]  # scratch gone


def test_llama_over_two_stages_with_cache_on_disk_sampled(hf_checkpoint, tmp_path):
    path, _ = hf_checkpoint("llama-gqa")  # sampled: each block draws from its own stream
    assert list(stage_layers(3, 2, 0)) == [0, 1]  # stage 0 takes the odd layer
    policy = ["model=local", f"model.path={path}", "workload.prompt_len=10",
              "workload.gen_len=4", "policy.gpu_batch_size=3", "policy.num_gpu_batches=1",
              "policy.cache.gpu=0", "policy.cache.cpu=0", "policy.activations.gpu=0",
              "policy.activations.cpu=1", "workload.temperature=0.8",
              f"engine.offload_dir={tmp_path}/offload"]
    store = f"{tmp_path}/r.sqlite"
    out = torchrun(2, [*policy, "distributed.stages=2", f"store.path={store}"], tmp_path)
    assert out.returncode == 0, out.stderr[-4000:]
    row = only_run(store)
    assert row.num_prompts == 6  # micro_blocks (= stages) x block
    assert row.bytes_cpu_to_disk > 0
    one = single_process_tokens([*policy, "workload.num_prompts=6"], f"{tmp_path}/one.sqlite")
    assert ResultStore(store).tokens(row.run_id) == one


def test_a_stage_over_budget_stores_one_oom_row_and_every_rank_exits(hf_checkpoint, tmp_path):
    path, _ = hf_checkpoint("opt-odd")
    store = f"{tmp_path}/r.sqlite"
    # stage 0 holds the embedding and 2 layers, stage 1 one layer and the head: a gpu tier
    # of 420 kB fits the second, not the first
    out = torchrun(2, ["model=local", f"model.path={path}", "distributed.stages=2",
                       "hardware.gpu_mem=420000", "workload.prompt_len=8",
                       "workload.gen_len=3", f"store.path={store}",
                       f"engine.offload_dir={tmp_path}/offload"], tmp_path)
    assert out.returncode != 0
    row = only_run(store)
    assert row.status == "oom" and row.error.startswith("stage 0: BudgetExceeded")
    assert "stored by another stage" in out.stderr + out.stdout
    assert not [p for p in (tmp_path / "offload").rglob("*") if p.is_file()]


def test_a_launch_of_the_wrong_size_is_refused_on_every_rank(tmp_path):
    out = torchrun(2, ["model=opt-125m", "distributed.stages=3",
                       f"store.path={tmp_path}/r.sqlite"], tmp_path)
    assert out.returncode != 0
    # each rank refuses before any work; torchrun may stop the second before it prints
    assert "distributed.stages=3: torchrun started 2 processes" in out.stderr
    assert "exitcode  : 2" in out.stderr
    assert not (tmp_path / "r.sqlite").exists() or ResultStore(f"{tmp_path}/r.sqlite").runs().empty


@pytest.mark.parametrize("stages", [1])
def test_one_stage_runs_without_a_launcher(tmp_path, stages):
    cfg = compose_run_config(["model=opt-tiny", "distributed=pipeline",
                              f"distributed.stages={stages}", f"store.path={tmp_path}/r.sqlite",
                              "workload.gen_len=3"])
    result = run(cfg)
    assert result.row["num_stages"] == 1 and result.row["num_prompts"] == 4
