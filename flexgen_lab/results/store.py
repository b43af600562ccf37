"""SQLite result store: one row per run, its tokens and (optionally) its op trace.

Why SQLite: sweeps run as several processes (Hydra's joblib launcher, torchrun ranks) that all
append to one file; SQLite gives atomic multi-table inserts and safe concurrent writers with
nothing to install, and pandas reads it directly for tables, plots and notebooks.

    with ResultStore("results/flexgen_lab.sqlite") as store:
        run_id = store.record_run({"status": "ok", "model": "opt-125m", "decode_s": 1.5})
        store.runs("status = ?", ("ok",))

The tables, their columns and the migrations between schema versions are in schema.py.
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

from flexgen_lab.results.schema import (
    EVAL_COLUMNS,
    STAGE_COLUMNS,
    MIGRATIONS,
    RUN_COLUMNS,
    SCHEMA_VERSION,
    STAGE_COLUMNS,
    STATUSES,
    TRACE_COLUMNS,
    read_version,
)

_RUN_NAMES = [name for name, _ in RUN_COLUMNS]
_WRITABLE_RUN_NAMES = frozenset(_RUN_NAMES) - {"run_id"}
_TRACE_NAMES = [name for name, _ in TRACE_COLUMNS if name != "run_id"]
_EVAL_NAMES = [name for name, _ in EVAL_COLUMNS if name != "run_id"]
_STAGE_NAMES = [name for name, _ in STAGE_COLUMNS if name != "run_id"]

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
            if read_version(conn) == target:  # the usual case: no write lock needed
                return
        with self._writing() as conn:
            version = read_version(conn)
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
        evals: list[dict[str, Any]] | None = None,
        stages: list[dict[str, Any]] | None = None,
    ) -> int:
        """Insert one run with its tokens, trace, evals and pipeline stages (STAGE_COLUMNS
        without run_id; missing keys NULL) in one transaction and return its run_id.

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
        eval_rows = [tuple(_plain(e.get(name)) for name in _EVAL_NAMES) for e in evals or []]
        stage_rows = [self._stage_values(stage) for stage in stages or []]
        return _with_retry(lambda: self._insert_run(values, token_rows, trace_rows, eval_rows,
                                                    stage_rows))

    @staticmethod
    def _stage_values(stage: dict[str, Any]) -> tuple[Any, ...]:
        unknown = sorted(set(stage) - set(_STAGE_NAMES))
        if unknown:
            raise ValueError(f"unknown stage columns {unknown}; allowed: {_STAGE_NAMES}")
        return tuple(_plain(stage.get(name)) for name in _STAGE_NAMES)

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
        eval_rows: list[tuple[Any, ...]] = (),
        stage_rows: list[tuple[Any, ...]] = (),
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
            if eval_rows:  # (an older schema, as tests pin, has no such table)
                conn.executemany(
                    f"INSERT INTO evals (run_id, {', '.join(_EVAL_NAMES)})"
                    f" VALUES ({', '.join('?' for _ in range(len(_EVAL_NAMES) + 1))})",
                    [(run_id, *eval_row) for eval_row in eval_rows],
                )
            if stage_rows:
                conn.executemany(
                    f"INSERT INTO stages (run_id, {', '.join(_STAGE_NAMES)})"
                    f" VALUES ({', '.join('?' for _ in range(len(_STAGE_NAMES) + 1))})",
                    [(run_id, *stage_row) for stage_row in stage_rows],
                )
        return run_id

    def stages(self, run_id: int) -> pd.DataFrame:
        """The run's `stages` rows, stage by stage."""
        with self._reading() as conn:
            return pd.read_sql_query("SELECT * FROM stages WHERE run_id = ? ORDER BY stage",
                                     conn, params=(run_id,))

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

    def evals(self) -> pd.DataFrame:
        """Table `evals` joined with each run's model, compress, bits, group and sparsity."""
        query = ("SELECT e.*, r.model, r.compress, r.compress_bits, r.compress_group,"
                 " r.attn_sparsity, r.status FROM evals e JOIN runs r USING (run_id)"
                 " ORDER BY e.run_id")
        with self._reading() as conn:
            return pd.read_sql_query(query, conn)

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
            return read_version(conn)

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
