"""Tests for flexgen_lab/results/store.py (and the small tables built on it).

Run: PYTHONPATH=. .venv/bin/python -m pytest tests/results -q
"""

from __future__ import annotations

import multiprocessing
import sqlite3

import pandas as pd
import pytest

from flexgen_lab.results import store as store_module
from flexgen_lab.results.schema import (
    RUN_COLUMNS,
    RUN_COLUMNS_V1,
    RUN_COLUMNS_V2_ADDED,
    RUN_COLUMNS_V4_ADDED,
)
from flexgen_lab.results.store import ResultStore, SchemaTooNewError
from flexgen_lab.results.tables import RECENT_COLUMNS, format_table, recent_runs

# The contract, copied from docs/architecture.md on purpose: a change to the schema must change this too.
CONTRACT_COLUMNS = [
    "run_id", "created_at", "status", "error", "config_hash", "config_json", "system", "backend",
    "device", "hardware", "dtype", "seed", "model", "schedule", "compress", "compress_bits",
    "compress_group", "prompt_len", "gen_len", "num_prompts", "gpu_batch_size", "num_gpu_batches",
    "w_gpu", "w_cpu", "w_disk", "c_gpu", "c_cpu", "c_disk", "a_gpu", "a_cpu", "a_disk",
    "cpu_delegation", "overlap", "attn_sparsity", "gpu_budget_bytes", "cpu_budget_bytes",
    "disk_budget_bytes", "prefill_s", "decode_s", "prefill_throughput", "decode_throughput",
    "generation_throughput", "latency_s", "bytes_cpu_to_gpu", "bytes_gpu_to_cpu",
    "bytes_disk_to_cpu", "bytes_cpu_to_disk", "peak_gpu_bytes", "peak_cpu_bytes",
    "peak_disk_bytes", "peak_rss_bytes", "peak_cuda_bytes", "predicted_generation_throughput",
    "predicted_prefill_s", "predicted_decode_s", "version", "git_commit",
]  # fmt: skip

WRITERS = 4
RUNS_PER_WRITER = 25


def _table_columns(path, table: str) -> list[tuple[str, str]]:
    with sqlite3.connect(path) as conn:
        return [(row[1], row[2]) for row in conn.execute(f"PRAGMA table_info({table})")]


def _row(**overrides) -> dict:
    row = {
        "status": "ok", "config_hash": "abc123", "system": "flexgen_lab", "backend": "measured",
        "device": "cpu", "model": "opt-125m", "dtype": "float32", "seed": 0,
        "prompt_len": 8, "gen_len": 4, "gpu_batch_size": 2, "num_gpu_batches": 1,
        "w_gpu": 0.25, "w_cpu": 0.75, "w_disk": 0.0, "overlap": True, "cpu_delegation": False,
        "decode_s": 1.5, "generation_throughput": 5.333, "peak_gpu_bytes": 3 * 2**30,
    }  # fmt: skip
    row.update(overrides)
    return row


def test_runs_columns_match_the_contract(tmp_path):
    path = tmp_path / "results.sqlite"
    ResultStore(path)
    assert [name for name, _ in RUN_COLUMNS_V1] == CONTRACT_COLUMNS
    assert _table_columns(path, "runs") == RUN_COLUMNS
    token_columns = [name for name, _ in _table_columns(path, "tokens")]
    assert token_columns == ["run_id", "prompt_index", "prompt_ids", "output_ids"]
    assert [name for name, _ in _table_columns(path, "trace")] == [
        "run_id", "rank", "stage", "device", "op", "token", "layer", "batch", "link", "bytes",
        "start_s", "end_s",
    ]  # fmt: skip


def test_record_and_read_back(tmp_path):
    store = ResultStore(tmp_path / "sub" / "dir" / "results.sqlite")  # parents are created
    tokens = [(0, [2, 7, 9], [11, 12, 13, 14]), (1, [2, 5], [21, 22, 23, 24])]
    trace = [
        {"rank": 0, "op": "load_weight", "token": 0, "layer": 1, "batch": 0,
         "link": "cpu_to_gpu", "bytes": 4096, "start_s": 0.0, "end_s": 0.002},
        {"rank": 0, "op": "compute", "token": 0, "layer": 1, "batch": 0,
         "start_s": 0.002, "end_s": 0.01},
    ]  # fmt: skip
    run_id = store.record_run(_row(config_json={"model": "opt-125m"}), tokens, trace)

    runs = store.runs()
    assert list(runs["run_id"]) == [run_id]
    row = runs.iloc[0]
    assert row["status"] == "ok" and row["model"] == "opt-125m"
    assert row["overlap"] == 1 and row["cpu_delegation"] == 0  # booleans stored as 0/1
    assert row["w_gpu"] == pytest.approx(0.25)
    assert row["peak_gpu_bytes"] == 3 * 2**30
    assert row["config_json"] == '{"model": "opt-125m"}'
    assert row["created_at"].endswith("+00:00")  # filled in, UTC
    assert store.tokens(run_id) == tokens
    got_trace = store.trace(run_id)
    assert list(got_trace["op"]) == ["load_weight", "compute"]
    assert list(got_trace["bytes"].fillna(-1)) == [4096, -1]
    assert store.tokens(run_id + 1) == []
    assert store.runs("model = ?", ("opt-30b",)).empty


def test_unknown_keys_are_rejected_by_name(tmp_path):
    store = ResultStore(tmp_path / "results.sqlite")
    with pytest.raises(ValueError, match="decode_time"):
        store.record_run(_row(decode_time=1.0))
    with pytest.raises(ValueError, match="run_id"):
        store.record_run(_row(run_id=7))
    with pytest.raises(ValueError, match="duration"):
        store.record_run(_row(), trace=[{"op": "compute", "duration": 1.0}])
    assert store.runs().empty


def test_status_check_rejects_bogus_and_keeps_earlier_rows(tmp_path):
    store = ResultStore(tmp_path / "results.sqlite")
    first = store.record_run(_row(), tokens=[(0, [1, 2], [3])])
    with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
        store.record_run(_row(status="bogus"), tokens=[(0, [4], [5])])
    with pytest.raises(sqlite3.IntegrityError):
        store.record_run(_row(status=None))
    runs = store.runs()
    assert list(runs["run_id"]) == [first]
    assert runs.iloc[0]["status"] == "ok"
    assert store.tokens(first) == [(0, [1, 2], [3])]
    # The next good run gets the next id: failed inserts left nothing behind.
    assert store.record_run(_row(status="oom", error="BudgetExceeded")) == first + 1


def test_a_failing_part_stores_nothing_of_the_run(tmp_path):
    store = ResultStore(tmp_path / "results.sqlite")
    duplicate_prompt = [(0, [1], [2]), (0, [3], [4])]
    with pytest.raises(sqlite3.IntegrityError):
        store.record_run(_row(), tokens=duplicate_prompt)
    assert store.runs().empty
    with sqlite3.connect(store.path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM tokens").fetchone() == (0,)


def test_has_ok(tmp_path):
    store = ResultStore(tmp_path / "results.sqlite")
    store.record_run(_row(config_hash="failed", status="error", error="boom"))
    store.record_run(_row(config_hash="done", status="ok"))
    assert store.has_ok("done")
    assert not store.has_ok("failed")
    assert not store.has_ok("never-ran")


def test_version_zero_file_is_migrated_in_place(tmp_path):
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as conn:  # a file from before the meta table existed
        conn.execute(
            "CREATE TABLE runs (run_id INTEGER PRIMARY KEY AUTOINCREMENT, created_at TEXT,"
            " status TEXT, model TEXT, decode_s REAL)"
        )
        conn.execute("INSERT INTO runs VALUES (1, '2024-01-01T00:00:00+00:00', 'ok', 'a', 2.0)")
        conn.execute("INSERT INTO runs VALUES (2, '2024-01-02T00:00:00+00:00', 'oom', 'b', NULL)")
    store = ResultStore(path)
    assert store.schema_version() == store_module.SCHEMA_VERSION
    assert {name for name, _ in _table_columns(path, "runs")} == {name for name, _ in RUN_COLUMNS}
    runs = store.runs()
    assert list(runs["run_id"]) == [1, 2]
    assert list(runs["model"]) == ["a", "b"]
    assert runs.iloc[0]["decode_s"] == 2.0
    new_id = store.record_run(_row(), tokens=[(0, [1], [2])])
    assert new_id == 3 and store.tokens(new_id) == [(0, [1], [2])]
    ResultStore(path)  # reopening a current file changes nothing
    assert len(ResultStore(path).runs()) == 3


def test_registered_migration_runs_once_and_atomically(tmp_path, monkeypatch):
    path = tmp_path / "results.sqlite"
    run_id = ResultStore(path).record_run(_row())

    def broken(conn):
        conn.execute("ALTER TABLE runs ADD COLUMN half_done REAL")
        raise RuntimeError("migration bug")

    monkeypatch.setattr(store_module, "MIGRATIONS", [*store_module.MIGRATIONS, broken])
    with pytest.raises(RuntimeError, match="migration bug"):
        ResultStore(path)
    monkeypatch.undo()
    current = store_module.SCHEMA_VERSION
    assert ResultStore(path).schema_version() == current  # rolled back: still current
    assert "half_done" not in {name for name, _ in _table_columns(path, "runs")}

    def add_energy(conn):
        conn.execute("ALTER TABLE runs ADD COLUMN energy_j REAL")

    monkeypatch.setattr(store_module, "MIGRATIONS", [*store_module.MIGRATIONS, add_energy])
    store = ResultStore(path)
    assert store.schema_version() == current + 1
    runs = store.runs()
    assert "energy_j" in runs.columns
    assert list(runs["run_id"]) == [run_id] and runs.iloc[0]["model"] == "opt-125m"
    ResultStore(path)  # at current + 1 already: add_energy must not run again (it would fail)


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "results.sqlite"
    ResultStore(path).record_run(_row())
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(SchemaTooNewError, match=f"schema_version 99.*up to {store_module.SCHEMA_VERSION}"):
        ResultStore(path)


def test_closed_store_refuses_use(tmp_path):
    with ResultStore(tmp_path / "results.sqlite") as store:
        store.record_run(_row())
    with pytest.raises(ValueError, match="closed"):
        store.runs()


def _write_runs(path: str, writer: int, barrier) -> None:
    """Worker process: open the (maybe not yet created) store and record runs as fast as it can."""
    barrier.wait()  # start together, so the writers really contend
    store = ResultStore(path)
    for i in range(RUNS_PER_WRITER):
        store.record_run(
            _row(config_hash=f"w{writer}-{i}", seed=i),
            tokens=[(0, [writer, i], [i, writer])],
            trace=[{"rank": writer, "op": "compute", "token": i, "start_s": 0.0, "end_s": 1.0}],
        )


def test_concurrent_writers_lose_nothing(tmp_path):
    path = str(tmp_path / "shared.sqlite")
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(WRITERS)
    workers = [
        context.Process(target=_write_runs, args=(path, writer, barrier))
        for writer in range(WRITERS)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    assert [worker.exitcode for worker in workers] == [0] * WRITERS

    store = ResultStore(path)
    runs = store.runs()
    assert len(runs) == WRITERS * RUNS_PER_WRITER
    assert runs["run_id"].is_unique
    assert set(runs["config_hash"]) == {
        f"w{w}-{i}" for w in range(WRITERS) for i in range(RUNS_PER_WRITER)
    }
    for _, run in runs.iterrows():
        writer, i = (int(part) for part in run["config_hash"][1:].split("-"))
        assert store.tokens(int(run["run_id"])) == [(0, [writer, i], [i, writer])]
    assert store.schema_version() == store_module.SCHEMA_VERSION


def test_version_1_file_gains_the_version_2_columns_and_keeps_its_rows(tmp_path, monkeypatch):
    path = tmp_path / "results.sqlite"
    monkeypatch.setattr(store_module, "MIGRATIONS", store_module.MIGRATIONS[:1])
    run_id = ResultStore(path).record_run(_row())
    assert ResultStore(path).schema_version() == 1
    monkeypatch.undo()
    store = ResultStore(path)
    assert store.schema_version() == store_module.SCHEMA_VERSION
    names = {name for name, _ in _table_columns(path, "runs")}
    assert {name for name, _ in RUN_COLUMNS_V2_ADDED} <= names
    assert list(store.runs()["run_id"]) == [run_id]
    new_id = store.record_run({**_row(), "placement_json": "{}"})
    assert store.runs().set_index("run_id").loc[new_id, "placement_json"] == "{}"


def test_version_2_file_gains_evals_and_an_eval_is_one_transaction(tmp_path, monkeypatch):
    path = tmp_path / "results.sqlite"
    monkeypatch.setattr(store_module, "MIGRATIONS", store_module.MIGRATIONS[:2])
    run_id = ResultStore(path).record_run(_row())
    assert ResultStore(path).schema_version() == 2
    monkeypatch.undo()
    store = ResultStore(path)
    assert store.schema_version() == store_module.SCHEMA_VERSION and store.evals().empty
    metric = dict(metric="perplexity", value=12.5, window_len=64, stride=64, n_windows=8,
                  prefix_len=16, corpus_sha256="ab" * 32)
    new_id = store.record_run(_row(), evals=[metric])
    evals = store.evals()
    assert list(evals.run_id) == [new_id] and evals.value[0] == 12.5 and new_id != run_id
    with pytest.raises(ValueError):  # a bad run row stores no eval row either
        store.record_run({**_row(), "nonsense": 1}, evals=[metric])
    assert len(store.evals()) == 1


def test_version_3_file_gains_the_baseline_columns_and_keeps_its_rows(tmp_path, monkeypatch):
    path = tmp_path / "results.sqlite"
    monkeypatch.setattr(store_module, "MIGRATIONS", store_module.MIGRATIONS[:3])
    run_id = ResultStore(path).record_run(_row())
    monkeypatch.undo()
    store = ResultStore(path)
    assert store.schema_version() >= 4
    assert {name for name, _ in RUN_COLUMNS_V4_ADDED} <= {
        name for name, _ in _table_columns(path, "runs")}
    new_id = store.record_run({**_row(), "system_version": "accelerate 1.16.0",
                               "peak_rss_file_bytes": 7})
    runs = store.runs().set_index("run_id")
    assert pd.isna(runs.loc[run_id, "system_version"])
    assert runs.loc[new_id, "system_version"] == "accelerate 1.16.0"
    assert runs.loc[new_id, "peak_rss_file_bytes"] == 7


def test_recent_runs_and_format_table(tmp_path):
    store = ResultStore(tmp_path / "results.sqlite")
    assert format_table(recent_runs(store)) == "(no runs)"
    for i in range(5):
        store.record_run(_row(seed=i, prefill_throughput=1234.5678, decode_throughput=0.012345))
    store.record_run(_row(status="error", error="x" * 200, peak_gpu_bytes=None))
    recent = recent_runs(store, limit=3)
    assert list(recent.columns) == RECENT_COLUMNS
    assert list(recent["run_id"]) == [4, 5, 6]  # newest last
    text = format_table(recent)
    assert "3.00 GiB" in text and "1234.6" in text and "0.0123" in text
    assert "x" * 58 not in text  # long errors are cut
    assert "opt-125m" in text and " 8 " in text


def test_version_4_file_gains_num_stages_and_the_stages_table(tmp_path, monkeypatch):
    path = tmp_path / "v4.sqlite"
    monkeypatch.setattr(store_module, "MIGRATIONS", store_module.MIGRATIONS[:4])
    run_id = ResultStore(path).record_run(_row())
    monkeypatch.undo()
    store = ResultStore(path)
    assert store.schema_version() >= 5
    columns = {name for name, _ in _table_columns(path, "stages")}
    assert {"run_id", "stage", "rank", "layers", "bytes_network", "peak_rss_bytes"} <= columns
    runs = store.runs().set_index("run_id")
    assert pd.isna(runs.loc[run_id, "num_stages"])


def test_stages_rows_go_in_with_their_run_missing_keys_as_null(tmp_path):
    store = ResultStore(tmp_path / "r.sqlite")
    run_id = store.record_run(_row(), stages=[
        {"stage": 0, "rank": 0, "layers": "0-5", "bytes_network": 7},
        {"stage": 1, "rank": 1, "layers": "6-11"}])
    rows = store.stages(run_id)
    assert list(rows.layers) == ["0-5", "6-11"] and rows.bytes_network[0] == 7
    assert pd.isna(rows.bytes_network[1]) and rows.peak_rss_bytes.isna().all()
    with pytest.raises(ValueError, match="bogus"):
        store.record_run(_row(), stages=[{"stage": 2}, {"stage": 3, "bogus": 1}])
    assert len(store.runs()) == 1  # nothing of the refused call, not even its run
