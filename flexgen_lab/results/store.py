"""SQLite result store: one row per run, its tokens and (optionally) its op trace.

Why SQLite: sweeps run as several processes (Hydra's joblib launcher, torchrun ranks) that all
append to one file; SQLite gives atomic multi-table inserts and safe concurrent writers with
nothing to install, and pandas reads it directly for tables, plots and notebooks.

    with ResultStore("results/flexgen_lab.sqlite") as store:
        run_id = store.record_run({"status": "ok", "model": "opt-125m", "decode_s": 1.5})
        store.runs("status = ?", ("ok",))

Schema changes are append-only: write a function that takes the file from version N to N + 1,
append it to ``MIGRATIONS`` and bump ``SCHEMA_VERSION``. Files are never rebuilt, so results
recorded by older code stay readable and keep their run_ids.
"""

from __future__ import annotations

import json
import os
import random
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Self

import pandas as pd

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
RUN_COLUMNS = RUN_COLUMNS_V1 + RUN_COLUMNS_V2_ADDED

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

_RUN_NAMES = [name for name, _ in RUN_COLUMNS]
_WRITABLE_RUN_NAMES = frozenset(_RUN_NAMES) - {"run_id"}
_TRACE_NAMES = [name for name, _ in TRACE_COLUMNS if name != "run_id"]

# Lock contention: busy_timeout makes SQLite wait by itself; the retry loop covers the cases
# where SQLite reports "locked"/"busy" without waiting (WAL setup, schema changes, snapshots).
_BUSY_TIMEOUT_MS = 30_000
_RETRY_DEADLINE_S = 120.0
_RETRY_FIRST_SLEEP_S = 0.01
_RETRY_MAX_SLEEP_S = 1.0


SQLITE_HEADER = b"SQLite format 3\x00"  # the first 16 bytes of every SQLite 3 database


class StoreError(RuntimeError):
    """store.path cannot hold a results store; the message says why and what is allowed."""


class SchemaTooNewError(StoreError):
    """The file was written by a newer flexgen_lab; writing to it could corrupt its meaning."""


def check_path(path: str | Path) -> None:
    """Raise StoreError when `path` cannot be a results store (empty, a directory, a parent
    that is a file, a file that is not SQLite, not writable), touching nothing. An absent
    path is fine (it is created) and so is an empty file (SQLite's empty database)."""
    text = str(path)
    allowed = "allowed: a flexgen_lab results file (SQLite) or a new file's path"
    if not text.strip():
        raise StoreError(f"store.path={text!r}: empty; {allowed}, e.g. "
                         "results/flexgen_lab.sqlite")
    target = Path(text)
    if target.is_dir():
        raise StoreError(f"store.path={text!r} is a directory; {allowed}")
    parent = target.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise StoreError(f"store.path={text!r}: {parent} is a file, not a directory; {allowed}")
    if not target.exists():
        if not os.access(parent, os.W_OK):
            raise StoreError(f"store.path={text!r}: {parent} is not writable; {allowed}")
        return
    try:
        with open(target, "rb") as f:
            header = f.read(len(SQLITE_HEADER))
    except OSError as err:
        raise StoreError(f"store.path={text!r} cannot be read ({err.strerror}); {allowed}"
                         ) from None
    if header and header != SQLITE_HEADER:
        raise StoreError(f"store.path={text!r} is not a SQLite file (it starts with "
                         f"{header!r}); {allowed}")
    if not os.access(target, os.W_OK):
        raise StoreError(f"store.path={text!r} is not writable; {allowed}")


def _run_column_sql(name: str, sql_type: str) -> str:
    return f"{name} {sql_type} {_RUN_CONSTRAINTS.get(name, '')}".rstrip()


def _migrate_1_to_2(conn: sqlite3.Connection) -> None:
    """Version 2 adds what the offloading engine reports beyond the flat columns: placement
    asked vs achieved per kind and tier, and bytes per link split by phase (both JSON)."""
    for name, sql_type in RUN_COLUMNS_V2_ADDED:
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


# MIGRATIONS[v] takes a file from schema version v to v + 1. Append only; never edit one that
# has shipped, since files already migrated by it will not run it again.
MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [_migrate_0_to_1, _migrate_1_to_2]
SCHEMA_VERSION = 2
assert SCHEMA_VERSION == len(MIGRATIONS), "bump SCHEMA_VERSION with every migration"


def _is_lock_error(error: sqlite3.OperationalError) -> bool:
    message = str(error).lower()
    return "locked" in message or "busy" in message


def _with_retry(action: Callable[[], Any]) -> Any:
    """Run `action`, retrying with jittered exponential backoff while the file is locked, so
    many writers starting at once (a joblib sweep) all get their rows in, just later."""
    deadline = time.monotonic() + _RETRY_DEADLINE_S
    sleep_s = _RETRY_FIRST_SLEEP_S
    while True:
        try:
            return action()
        except sqlite3.OperationalError as error:
            if not _is_lock_error(error) or time.monotonic() > deadline:
                raise
        time.sleep(sleep_s * (0.5 + random.random()))
        sleep_s = min(2 * sleep_s, _RETRY_MAX_SLEEP_S)


def _read_version(conn: sqlite3.Connection) -> int:
    has_meta = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
    ).fetchone()
    if not has_meta:
        return 0
    row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    return int(row[0]) if row else 0


def _plain(value: Any) -> Any:
    """Make a value bindable by sqlite3: bools as 0/1, numpy/torch scalars as Python numbers,
    dicts and lists (e.g. a config) as JSON text."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, sort_keys=True)
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        return _plain(value.item())
    return value


def _id_list_json(ids: Sequence[Any]) -> str:
    return json.dumps([int(token) for token in ids])


def _now_utc() -> str:
    return datetime.now(UTC).isoformat()


class ResultStore:
    """One SQLite file of runs. Holds only the path: every call opens a short-lived connection,
    so the object can be pickled into worker processes and several processes (or threads) can
    write the same file at once."""

    def __init__(self, path: str | Path) -> None:
        check_path(path)
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._closed = False
        try:
            _with_retry(self._enable_wal)
            _with_retry(self._migrate)
        except sqlite3.DatabaseError as err:  # a damaged file with a valid header, ...
            raise StoreError(f"store.path={str(path)!r} is not a usable results store: {err}"
                             ) from None

    # -- connections and transactions -------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        if self._closed:
            raise ValueError(f"ResultStore({str(self.path)!r}) is closed")
        # isolation_level=None: we issue BEGIN IMMEDIATE / COMMIT ourselves, so a write takes
        # the lock up front and can never deadlock halfway through upgrading a read lock.
        conn = sqlite3.connect(self.path, timeout=_BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA synchronous = NORMAL")  # safe with WAL; fsync per checkpoint
        conn.execute("PRAGMA foreign_keys = ON")
        return conn

    @contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        conn = self._connect()
        try:
            yield conn
        finally:
            conn.close()

    @contextmanager
    def _writing(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: everything inside commits together or not at all."""
        conn = self._connect()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                if conn.in_transaction:  # SQLite may already have rolled back by itself
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        finally:
            conn.close()

    def _enable_wal(self) -> None:
        """WAL lets readers (a notebook) run while a sweep writes; it is stored in the file."""
        with self._reading() as conn:
            conn.execute("PRAGMA journal_mode = WAL")

    def _migrate(self) -> None:
        """Bring the file to SCHEMA_VERSION in one transaction, re-reading the version under the
        write lock so that processes opening a new file together migrate it exactly once."""
        target = len(MIGRATIONS)
        with self._reading() as conn:
            if _read_version(conn) == target:  # the usual case: no write lock needed
                return
        with self._writing() as conn:
            version = _read_version(conn)
            if version > target:
                raise SchemaTooNewError(
                    f"{self.path} has schema_version {version}, but this flexgen_lab only knows "
                    f"versions up to {target}; open it with a newer flexgen_lab"
                )
            if version == target:
                return
            for migration in MIGRATIONS[version:]:
                migration(conn)
            conn.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)",
                (str(target),),
            )

    # -- writing ------------------------------------------------------------------------------

    def record_run(
        self,
        row: dict[str, Any],
        tokens: list[tuple[int, list[int], list[int]]] | None = None,
        trace: list[dict[str, Any]] | None = None,
    ) -> int:
        """Insert one run with its tokens and trace in one transaction and return its run_id.

        A row is all or nothing: if any part fails (a CHECK, a duplicate prompt_index) nothing
        of this run is stored, so a sweep never sees half a result."""
        unknown = sorted(set(row) - _WRITABLE_RUN_NAMES)
        if unknown:
            raise ValueError(f"unknown run columns {unknown}; allowed: RUN_COLUMNS minus run_id")
        values = {name: _plain(value) for name, value in row.items()}
        values.setdefault("created_at", _now_utc())
        token_rows = [
            (int(index), _id_list_json(prompt), _id_list_json(output))
            for index, prompt, output in tokens or []
        ]
        trace_rows = [self._trace_values(event) for event in trace or []]
        return _with_retry(lambda: self._insert_run(values, token_rows, trace_rows))

    @staticmethod
    def _trace_values(event: dict[str, Any]) -> tuple[Any, ...]:
        unknown = sorted(set(event) - set(_TRACE_NAMES))
        if unknown:
            raise ValueError(f"unknown trace columns {unknown}; allowed: {_TRACE_NAMES}")
        return tuple(_plain(event.get(name)) for name in _TRACE_NAMES)

    def _insert_run(
        self,
        values: dict[str, Any],
        token_rows: list[tuple[int, str, str]],
        trace_rows: list[tuple[Any, ...]],
    ) -> int:
        names = list(values)
        placeholders = ", ".join("?" for _ in names)
        with self._writing() as conn:
            cursor = conn.execute(
                f"INSERT INTO runs ({', '.join(names)}) VALUES ({placeholders})",
                [values[name] for name in names],
            )
            run_id = int(cursor.lastrowid)
            conn.executemany(
                "INSERT INTO tokens (run_id, prompt_index, prompt_ids, output_ids)"
                " VALUES (?, ?, ?, ?)",
                [(run_id, *token_row) for token_row in token_rows],
            )
            trace_placeholders = ", ".join("?" for _ in range(len(_TRACE_NAMES) + 1))
            conn.executemany(
                f"INSERT INTO trace (run_id, {', '.join(_TRACE_NAMES)})"
                f" VALUES ({trace_placeholders})",
                [(run_id, *trace_row) for trace_row in trace_rows],
            )
        return run_id

    # -- reading ------------------------------------------------------------------------------

    def has_ok(self, config_hash: str) -> bool:
        """Whether this config already ran successfully: sweeps skip such cells."""
        with self._reading() as conn:
            row = conn.execute(
                "SELECT 1 FROM runs WHERE config_hash = ? AND status = 'ok' LIMIT 1",
                (config_hash,),
            ).fetchone()
        return row is not None

    def runs(self, where: str | None = None, params: Sequence[Any] = ()) -> pd.DataFrame:
        """The runs table (optionally filtered by an SQL `where` clause with ? parameters),
        ordered by run_id, i.e. by the order runs were recorded."""
        query = "SELECT * FROM runs"
        if where:
            query += f" WHERE {where}"
        query += " ORDER BY run_id"
        with self._reading() as conn:
            return pd.read_sql_query(query, conn, params=tuple(params))

    def tokens(self, run_id: int) -> list[tuple[int, list[int], list[int]]]:
        """(prompt_index, prompt_ids, output_ids) per prompt, in prompt order."""
        with self._reading() as conn:
            rows = conn.execute(
                "SELECT prompt_index, prompt_ids, output_ids FROM tokens"
                " WHERE run_id = ? ORDER BY prompt_index",
                (run_id,),
            ).fetchall()
        return [(index, json.loads(prompt), json.loads(output)) for index, prompt, output in rows]

    def trace(self, run_id: int) -> pd.DataFrame:
        """The run's op trace in the order it was recorded (rowid), which is execution order."""
        columns = ", ".join(name for name, _ in TRACE_COLUMNS)
        query = f"SELECT {columns} FROM trace WHERE run_id = ? ORDER BY rowid"
        with self._reading() as conn:
            return pd.read_sql_query(query, conn, params=(run_id,))

    def schema_version(self) -> int:
        with self._reading() as conn:
            return _read_version(conn)

    # -- lifetime -----------------------------------------------------------------------------

    def close(self) -> None:
        """No connection stays open between calls; closing only makes later use an error."""
        self._closed = True

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ResultStore({str(self.path)!r})"
