"""Tables printed from the result store, for a terminal.

Tables read only the store (through pandas), never a run in memory, so what is printed is what
was recorded: ``python -m flexgen_lab table`` shows the same numbers a notebook would.
"""

from __future__ import annotations

import math

import pandas as pd

from flexgen_lab.results.store import RUN_COLUMNS, ResultStore

# What people glance at after a sweep: what ran, on what, at which size, and how fast.
RECENT_COLUMNS = [
    "run_id", "created_at", "status", "system", "backend", "device", "model", "dtype",
    "schedule", "compress", "prompt_len", "gen_len", "num_prompts", "gpu_batch_size",
    "num_gpu_batches", "prefill_throughput", "decode_throughput", "generation_throughput",
    "peak_gpu_bytes", "error",
]  # fmt: skip

_ERROR_WIDTH = 60  # a traceback's last line is enough to tell runs apart
_BYTE_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")
_INTEGER_COLUMNS = {name for name, sql_type in RUN_COLUMNS if sql_type == "INTEGER"}


def recent_runs(store: ResultStore, limit: int = 20) -> pd.DataFrame:
    """The last `limit` runs, newest last (like a log), with the columns in RECENT_COLUMNS."""
    df = store.runs(
        "run_id IN (SELECT run_id FROM runs ORDER BY run_id DESC LIMIT ?)", (int(limit),)
    )
    return df[[name for name in RECENT_COLUMNS if name in df.columns]].reset_index(drop=True)


def _format_float(value: float) -> str:
    """Two or three significant decimals: 1234.5 -> 1234.5, 12.345 -> 12.35, 0.01234 -> 0.0123."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def _format_bytes(value: float) -> str:
    """Bytes in binary units (GiB = 2**30), as the store's budgets and peaks are meant."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    size = float(value)
    for unit in _BYTE_UNITS:
        if abs(size) < 1024 or unit == _BYTE_UNITS[-1]:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _shorten(text: object) -> object:
    if isinstance(text, str) and len(text) > _ERROR_WIDTH:
        return text[: _ERROR_WIDTH - 3] + "..."
    return text


def _to_second(timestamp: object) -> object:
    """'2025-01-02T03:04:05.678+00:00' -> '2025-01-02 03:04:05' (the store's times are UTC)."""
    if isinstance(timestamp, str):
        return timestamp[:19].replace("T", " ")
    return timestamp


def _is_whole(column: pd.Series) -> bool:
    """A float column of whole numbers: an INTEGER column that pandas widened for a NULL."""
    if not pd.api.types.is_float_dtype(column):
        return False
    values = column.dropna()
    return bool((values == values.round()).all())


def format_table(df: pd.DataFrame) -> str:
    """Render runs for a terminal: byte columns in KiB/MiB/GiB, counts as integers even where
    a missing value made pandas read them as floats, floats rounded, times to the second, long
    error messages cut, missing values as '-'."""
    if df.empty:
        return "(no runs)"
    shown = df.copy()
    for name in shown.columns:
        if name.endswith("_bytes"):
            shown[name] = shown[name].map(_format_bytes).astype(object)
        elif name == "error":
            shown[name] = shown[name].map(_shorten).astype(object)
        elif name == "created_at":
            shown[name] = shown[name].map(_to_second).astype(object)
        elif name in _INTEGER_COLUMNS and _is_whole(shown[name]):
            shown[name] = shown[name].astype("Int64")
        if not pd.api.types.is_float_dtype(shown[name]):  # float NaN is na_rep's job
            shown[name] = shown[name].astype(object).where(shown[name].notna(), "-")
    return shown.to_string(index=False, float_format=_format_float, na_rep="-")
