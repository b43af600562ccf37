"""The results store's schema: the columns of `runs` and `trace`, their constraints, and the
migrations that take a file from one schema version to the next.

Schema changes are append-only: write a function that takes the file from version N to N + 1,
append it to ``MIGRATIONS`` and bump ``SCHEMA_VERSION``. Files are never rebuilt, so results
recorded by older code stay readable and keep their run_ids.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

STATUSES = ("ok", "oom", "error", "skipped")

# Columns of `runs`, in order (docs/architecture.md, "Contracts": store schema). Units live in the names:
# *_s seconds, *_bytes bytes, *_throughput tokens/s; placement fractions (w_*, c_*, a_*) in [0, 1];
# booleans (cpu_delegation, overlap) as 0/1.
RUN_COLUMNS_V1: list[tuple[str, str]] = [
    ("run_id", "INTEGER"),
    ("created_at", "TEXT"),  # ISO-8601, UTC
    ("status", "TEXT"),
    *[(name, "TEXT") for name in ("error", "config_hash", "config_json", "system", "backend")],
    *[(name, "TEXT") for name in ("device", "hardware", "dtype")],
    ("seed", "INTEGER"),
    ("model", "TEXT"),
    ("schedule", "TEXT"),
    ("compress", "TEXT"),
    ("compress_bits", "INTEGER"),
    ("compress_group", "INTEGER"),
    *[(name, "INTEGER") for name in ("prompt_len", "gen_len", "num_prompts")],
    *[(name, "INTEGER") for name in ("gpu_batch_size", "num_gpu_batches")],
    *[(f"{kind}_{tier}", "REAL") for kind in ("w", "c", "a") for tier in ("gpu", "cpu", "disk")],
    ("cpu_delegation", "INTEGER"),
    ("overlap", "INTEGER"),
    ("attn_sparsity", "REAL"),
    *[(f"{tier}_budget_bytes", "INTEGER") for tier in ("gpu", "cpu", "disk")],
    *[(name, "REAL") for name in ("prefill_s", "decode_s")],
    *[(f"{phase}_throughput", "REAL") for phase in ("prefill", "decode", "generation")],
    ("latency_s", "REAL"),
    *[(f"bytes_{link}", "INTEGER") for link in ("cpu_to_gpu", "gpu_to_cpu")],
    *[(f"bytes_{link}", "INTEGER") for link in ("disk_to_cpu", "cpu_to_disk")],
    *[(f"peak_{tier}_bytes", "INTEGER") for tier in ("gpu", "cpu", "disk", "rss", "cuda")],
    ("predicted_generation_throughput", "REAL"),
    ("predicted_prefill_s", "REAL"),
    ("predicted_decode_s", "REAL"),
    ("version", "TEXT"),
    ("git_commit", "TEXT"),
]

# Added by schema version 2 (migration _migrate_1_to_2).
RUN_COLUMNS_V2_ADDED: list[tuple[str, str]] = [("placement_json", "TEXT"),
                                               ("link_bytes_json", "TEXT")]
# Added by schema version 4 (migration _migrate_3_to_4): what a baseline system reports.
RUN_COLUMNS_V4_ADDED: list[tuple[str, str]] = [("system_version", "TEXT"),
                                               ("peak_rss_anon_bytes", "INTEGER"),
                                               ("peak_rss_file_bytes", "INTEGER")]
# Added by schema version 5 (migration _migrate_4_to_5): pipeline stages of the run (1 alone).
RUN_COLUMNS_V5_ADDED: list[tuple[str, str]] = [("num_stages", "INTEGER")]
RUN_COLUMNS = (RUN_COLUMNS_V1 + RUN_COLUMNS_V2_ADDED + RUN_COLUMNS_V4_ADDED
               + RUN_COLUMNS_V5_ADDED)

# Constraints beside the plain types, kept apart so RUN_COLUMNS reads like PRAGMA table_info.
_RUN_CONSTRAINTS = {
    "run_id": "PRIMARY KEY AUTOINCREMENT",
    "created_at": "NOT NULL",
    "status": "NOT NULL CHECK (status IN ({}))".format(", ".join(f"'{s}'" for s in STATUSES)),
}

TOKEN_COLUMNS: list[tuple[str, str]] = [
    ("run_id", "INTEGER"),
    ("prompt_index", "INTEGER"),
    ("prompt_ids", "TEXT"),  # JSON array of ints
    ("output_ids", "TEXT"),  # JSON array of ints
]

# One row per executed op; times in seconds from the start of the run, bytes actually moved.
TRACE_COLUMNS: list[tuple[str, str]] = [
    *[(name, "INTEGER") for name in ("run_id", "rank", "stage")],
    *[(name, "TEXT") for name in ("device", "op")],
    *[(name, "INTEGER") for name in ("token", "layer", "batch")],
    ("link", "TEXT"),
    ("bytes", "INTEGER"),
    *[(name, "REAL") for name in ("start_s", "end_s")],
]


def _run_column_sql(name: str, sql_type: str) -> str:
    return f"{name} {sql_type} {_RUN_CONSTRAINTS.get(name, '')}".rstrip()


def _migrate_1_to_2(conn: sqlite3.Connection) -> None:
    """Version 2 adds what the offloading engine reports beyond the flat columns: placement
    asked vs achieved per kind and tier, and bytes per link split by phase (both JSON)."""
    for name, sql_type in RUN_COLUMNS_V2_ADDED:
        conn.execute(f"ALTER TABLE runs ADD COLUMN {name} {sql_type}")


def _migrate_3_to_4(conn: sqlite3.Connection) -> None:
    """Version 4 adds what a baseline system reports (baselines/): the versions of the
    libraries it ran on (e.g. "accelerate 1.16.0; transformers 5.25.0"), and its peak resident
    memory split into anonymous and file-backed pages (mapped weights are the latter)."""
    for name, sql_type in RUN_COLUMNS_V4_ADDED:
        conn.execute(f"ALTER TABLE runs ADD COLUMN {name} {sql_type}")


def _migrate_0_to_1(conn: sqlite3.Connection) -> None:
    """Version 0 is a file without a meta table: empty, or a `runs` table from before the meta
    table existed. Create what is missing, and add missing run columns in place so old rows
    (and their run_ids) survive; a CHECK cannot be added to an existing table, so old files
    rely on the code's statuses there."""
    existing = {row[1] for row in conn.execute("PRAGMA table_info(runs)")}
    if existing:
        for name, sql_type in RUN_COLUMNS_V1:
            if name not in existing:
                conn.execute(f"ALTER TABLE runs ADD COLUMN {name} {sql_type}")
    else:
        columns = ",\n  ".join(_run_column_sql(name, t) for name, t in RUN_COLUMNS_V1)
        conn.execute(f"CREATE TABLE runs (\n  {columns}\n)")
    conn.execute("CREATE INDEX IF NOT EXISTS runs_config_hash ON runs (config_hash, status)")
    conn.execute(
        "CREATE TABLE IF NOT EXISTS tokens ("
        " run_id INTEGER NOT NULL REFERENCES runs (run_id),"
        " prompt_index INTEGER NOT NULL, prompt_ids TEXT NOT NULL, output_ids TEXT NOT NULL,"
        " PRIMARY KEY (run_id, prompt_index))"
    )
    trace_columns = ", ".join(f"{name} {t}" for name, t in TRACE_COLUMNS[1:])
    conn.execute(
        "CREATE TABLE IF NOT EXISTS trace ("
        f" run_id INTEGER NOT NULL REFERENCES runs (run_id), {trace_columns})"
    )
    conn.execute("CREATE INDEX IF NOT EXISTS trace_run_id ON trace (run_id)")
    conn.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")


# One row per metric of an `eval` run (flexgen_lab/evaluation.py): how the text was cut is
# stored with the value, and the corpus by its sha256.
EVAL_COLUMNS: list[tuple[str, str]] = [
    ("run_id", "INTEGER"),
    ("metric", "TEXT"),  # perplexity | last_word_accuracy | scored_tokens | ...
    ("value", "REAL"),
    *[(name, "INTEGER") for name in ("window_len", "stride", "n_windows", "prefix_len")],
    ("corpus_sha256", "TEXT"),
]


def _migrate_2_to_3(conn: sqlite3.Connection) -> None:
    """Version 3 adds table `evals` (accuracy of a run's approximations on real text)."""
    columns = ", ".join(f"{name} {t}" for name, t in EVAL_COLUMNS[1:])
    conn.execute("CREATE TABLE IF NOT EXISTS evals ("
                 f" run_id INTEGER NOT NULL REFERENCES runs (run_id), {columns})")
    conn.execute("CREATE INDEX IF NOT EXISTS evals_run_id ON evals (run_id)")


# One row per pipeline stage of a distributed=pipeline run (rank 0 writes them with the run):
# its decoder layers ("first-last", 0-based, inclusive), bytes per link including what it
# sent to the next stage, its accounted peaks per tier and its process's peak RSS.
STAGE_COLUMNS: list[tuple[str, str]] = [
    *[(name, "INTEGER") for name in ("run_id", "stage", "rank")],
    ("layers", "TEXT"),
    *[(f"bytes_{link}", "INTEGER") for link in ("cpu_to_gpu", "gpu_to_cpu", "disk_to_cpu",
                                                 "cpu_to_disk", "network")],
    *[(f"peak_{tier}_bytes", "INTEGER") for tier in ("gpu", "cpu", "disk", "rss")],
]


def _migrate_4_to_5(conn: sqlite3.Connection) -> None:
    """Version 5 adds `runs.num_stages` and table `stages` (pipeline parallel runs)."""
    for name, sql_type in RUN_COLUMNS_V5_ADDED:
        conn.execute(f"ALTER TABLE runs ADD COLUMN {name} {sql_type}")
    columns = ", ".join(f"{name} {t}" for name, t in STAGE_COLUMNS[1:])
    conn.execute("CREATE TABLE IF NOT EXISTS stages ("
                 f" run_id INTEGER NOT NULL REFERENCES runs (run_id), {columns})")
    conn.execute("CREATE INDEX IF NOT EXISTS stages_run_id ON stages (run_id)")


# MIGRATIONS[v] takes a file from schema version v to v + 1. Append only; never edit one that
# has shipped, since files already migrated by it will not run it again.
MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [_migrate_0_to_1, _migrate_1_to_2,
                                                         _migrate_2_to_3, _migrate_3_to_4,
                                                         _migrate_4_to_5]
SCHEMA_VERSION = 5
assert SCHEMA_VERSION == len(MIGRATIONS), "bump SCHEMA_VERSION with every migration"


def read_version(conn: sqlite3.Connection) -> int:
    has_meta = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
    ).fetchone()
    if not has_meta:
        return 0
    row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    return int(row[0]) if row else 0
