"""An experiment's table from the store: the paper's value beside ours, cell by cell.

`experiment_frame` reads every cell's stored rows (by config hash) into one DataFrame, the
same columns as the CSV it writes (CSV_COLUMNS first); `format_experiment` prints it as
Markdown with a header (commit, profile, device, date, scale) and, for a measured table,
each row relative to its column's baseline row beside the paper's relative values (CPU
seconds over T4 seconds mean nothing); `rankings` compares the order of the rows.
Nothing here runs anything: the table says what the store holds.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from flexgen_lab.results.experiment import Experiment, Scale, tied_ranking
from flexgen_lab.results.store import ResultStore

CSV_COLUMNS = ["row", "column", "system", "status", "paper_token_s", "ours_token_s", "ratio",
               "ours_over_capacity_token_s"]
TARGET = 0.25  # the reproduction target: within +-25 % of the paper
LINKS = ("cpu_to_gpu", "gpu_to_cpu", "disk_to_cpu", "cpu_to_disk")


def experiment_frame(exp: Experiment, scale: Scale, planned: list, store: ResultStore,
                     extra: dict[str, dict] | None = None) -> pd.DataFrame:
    """One line per cell: status, paper and ours (median over repeats, with min and max),
    ratio, relative values, prediction, bytes per link and phase. `extra`: config hash ->
    figures computed beside the store (ours_over_capacity_token_s, simulated_token_s)."""
    extra = extra or {}
    lines = [_cell_line(p, store, extra.get(p.config_hash, {})) for p in planned]
    frame = pd.DataFrame(lines)
    for name in ("experiment", "scale", "backend"):
        frame.insert(0, name, {"experiment": exp.name, "scale": scale.name,
                               "backend": scale.backend}[name])
    if exp.baseline_row:
        _relative(frame, exp.baseline_row)
    for name in CSV_COLUMNS + ["ours_token_s", "relative", "paper_relative"]:
        if name not in frame:
            frame[name] = None  # a table where no cell has it still has the column
    ordered = CSV_COLUMNS + [c for c in frame.columns if c not in CSV_COLUMNS]
    return frame[ordered]


def _cell_line(p, store: ResultStore, extra: dict) -> dict:
    cell = p.cell
    line = {"row": cell.row, "column": cell.column, "x": cell.x, "system": cell.system,
            "paper_token_s": cell.paper_token_s, "paper_oom": cell.paper_oom,
            "note": cell.note, "config_hash": p.config_hash, "message": p.message}
    if p.cfg is not None:  # what was asked, whatever happened (a searched run may differ)
        pol = p.cfg.policy
        line |= {"block_size": pol.gpu_batch_size * pol.num_gpu_batches,
                 "gen_len": p.cfg.workload.gen_len}
    if p.config_hash is None or p.status == "config error":
        return {**line, "status": p.status}
    rows = store.runs("config_hash = ?", [p.config_hash])
    ok = rows[rows.status == "ok"]
    line["status"] = ("ok" if len(ok) else "oom" if (rows.status == "oom").any()
                      else "error" if len(rows) else "not stored")
    if line["status"] == "error":
        line["message"] = str(rows.error.iloc[-1])
    if line["status"] == "oom":
        line["message"] = str(rows[rows.status == "oom"].error.iloc[-1])
    if len(ok):
        line |= _measured(ok, cell.metric)
    line |= extra
    ours, paper = line.get("ours_token_s"), cell.paper_token_s
    line["ratio"] = ours / paper if ours and paper else None
    beyond = line.get("ours_over_capacity_token_s")
    line["over_capacity_ratio"] = beyond / paper if beyond and paper else None
    return line


def _measured(ok: pd.DataFrame, metric: str = "generation_throughput") -> dict:
    """Median and spread of the ok repeats (of the column's metric), and what one of them
    moved and predicted."""
    tput = ok[metric].astype(float)
    last = ok.iloc[-1]
    out = {"ours_token_s": float(tput.median()), "ours_min_token_s": float(tput.min()),
           "ours_max_token_s": float(tput.max()), "repeats": int(len(ok)),
           "latency_s": float(ok.latency_s.astype(float).median()),
           "num_prompts": int(last.num_prompts), "gen_len": int(last.gen_len),
           "block_size": int(last.gpu_batch_size * last.num_gpu_batches),
           "gpu_batch_size": int(last.gpu_batch_size),
           "num_gpu_batches": int(last.num_gpu_batches),
           "predicted_token_s": _predicted(last, metric),
           "peak_gpu_bytes": _float(last.peak_gpu_bytes), "run_ids": ",".join(
               str(int(r)) for r in ok.run_id)}
    moved = json.loads(last.link_bytes_json) if isinstance(last.link_bytes_json, str) else {}
    for phase, links in moved.items():
        for link in LINKS:
            out[f"bytes_{phase}_{link}"] = links.get(link, 0)
    return out


def _predicted(run, metric: str) -> float | None:
    """The cost model's figure for the column's metric (facts §2's definitions)."""
    phase = {"decode_throughput": "decode", "prefill_throughput": "prefill"}.get(metric)
    seconds = _float(run[f"predicted_{phase}_s"]) if phase else None
    if phase is None or not seconds:
        return _float(run.predicted_generation_throughput) if phase is None else None
    tokens = run.gen_len - 1 if phase == "decode" else run.prompt_len
    return float(run.num_prompts * tokens / seconds)


def _float(value) -> float | None:
    return None if value is None or pd.isna(value) else float(value)


def _relative(frame: pd.DataFrame, baseline: str) -> None:
    """ours / the column's baseline row's ours, and the same for the paper's values."""
    base = frame[frame.row == baseline].set_index("column")
    for name, source in (("relative", "ours_token_s"), ("paper_relative", "paper_token_s")):
        if source not in frame:
            frame[name] = None
            continue
        frame[name] = [(value / base.at[col, source]) if col in base.index and value
                       and _good(base.at[col, source]) else None
                       for value, col in zip(frame[source], frame.column, strict=True)]


def _good(value) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def rankings(frame: pd.DataFrame, rows: list[str], column: str) -> tuple[list, list]:
    """(paper's, ours) rankings of `rows` in one column, values within 5 % tied. OOM ranks
    last; ours uses the over-capacity figure where a cell is over the memory model's
    capacity (labelled so in the table)."""
    part = frame[(frame.column == column) & frame.row.isin(rows)]
    paper = {r.row: (r.paper_token_s if _good(r.paper_token_s) else math.nan)
             for r in part.itertuples()}
    ours = {r.row: _ours_or_beyond(r) for r in part.itertuples()}
    return tied_ranking(paper), tied_ranking(ours)


def _ours_or_beyond(r) -> float:
    for value in (getattr(r, "ours_token_s", None), getattr(r, "ours_over_capacity_token_s",
                                                             None)):
        if _good(value):
            return float(value)
    return math.nan


def within_target(frame: pd.DataFrame, target: float = TARGET) -> tuple[int, int, list[str]]:
    """(cells within +-target of the paper, cells compared, the others' labels). Over-capacity
    cells are judged on the simulator's figure without the capacity check; a cell whose
    note says "not comparable" is left out."""
    compared, hits, misses = 0, 0, []
    for r in frame.itertuples():
        if not _good(r.paper_token_s) or "not comparable" in (r.note or ""):
            continue
        ours = _ours_or_beyond(r)
        if math.isnan(ours):
            continue
        compared += 1
        if abs(ours / r.paper_token_s - 1) <= target:
            hits += 1
        else:
            misses.append(f"{r.row} | {r.column}: {ours:.3g} vs {r.paper_token_s:.3g}")
    return hits, compared, misses


def _fmt(value, digits: int = 3) -> str:
    if not _good(value):
        return "-"
    return f"{value:.{digits}g}"


def _status_text(r) -> str:
    if r.status == "oom" and _good(getattr(r, "ours_over_capacity_token_s", None)):
        return f"OOM (over capacity: {r.ours_over_capacity_token_s:.3g})"
    return {"ok": "ok", "oom": "OOM"}.get(r.status, r.status)


def format_experiment(frame: pd.DataFrame, exp: Experiment, meta: dict) -> str:
    """Markdown: a header, one line per cell, then the target count and the rankings."""
    measured = meta["backend"] == "measured"
    head = [f"# {exp.title}", "",
            f"{meta['backend']} at scale {meta['scale']}; hardware={meta['hardware']}; device "
            f"{meta['device']}; commit {meta['git_commit']}; {meta['date']}", "",
            f"command: `{meta.get('command', exp.command)}`", ""]
    cols = ["row", "column", "system", "paper token/s", "ours token/s", "ours/paper",
            "status"]
    if measured:  # CPU seconds over T4 seconds mean nothing: compare within a column
        cols.remove("ours/paper")
        cols += ["spread", "vs baseline", "paper vs baseline"]
    if "simulated_token_s" in frame and frame.simulated_token_s.notna().any():
        cols.insert(cols.index("status"), "simulated token/s")
    if "tokens_equal_ours" in frame and frame.tokens_equal_ours.notna().any():
        cols.append("tokens = ours")  # baselines' tokens against exp.tokens_reference's
    if not exp.baseline_row:
        cols = [c for c in cols if "baseline" not in c]
    if frame.paper_token_s.isna().all() and not frame.paper_oom.any():
        cols = [c for c in cols if "paper" not in c]
    notes = list(dict.fromkeys(n for n in frame.note if n))
    if "x" in frame and frame.x.notna().any():
        cols.insert(2, "x")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in frame.itertuples():
        paper = "OOM" if r.paper_oom else _fmt(r.paper_token_s)
        mark = f" [{notes.index(r.note) + 1}]" if r.note else ""
        cells = {"row": r.row + mark, "column": r.column,
                 "x": _fmt(getattr(r, "x", None)), "system": r.system, "paper token/s": paper,
                 "ours token/s": _fmt(getattr(r, "ours_token_s", None)),
                 "ours/paper": _fmt(getattr(r, "ratio", None), 2), "status": _status_text(r),
                 "spread": _spread(r), "vs baseline": _fmt(getattr(r, "relative", None), 2),
                 "paper vs baseline": _fmt(getattr(r, "paper_relative", None), 2),
                 "simulated token/s": _fmt(getattr(r, "simulated_token_s", None)),
                 "tokens = ours": _yes_no(getattr(r, "tokens_equal_ours", None))}
        lines.append("| " + " | ".join(cells[c] for c in cols) + " |")
    foot = [""] + [f"[{n}] {text}" for n, text in enumerate(notes, 1)]
    said: dict[tuple[str, str], list[str]] = {}  # (row, what) -> columns
    for r in frame.itertuples():
        if r.status not in ("ok", "oom") and r.message:
            said.setdefault((r.row, f"{r.status}: {r.message}"), []).append(r.column)
    messages = [f"- {row} ({', '.join(cols)}): {what}" for (row, what), cols in said.items()]
    return "\n".join(head + lines + foot + messages + _summary(frame, exp, measured))


def _yes_no(value) -> str:
    return "-" if not _good(value) else "yes" if value else "no"


def _spread(r) -> str:
    low, high = getattr(r, "ours_min_token_s", None), getattr(r, "ours_max_token_s", None)
    if not _good(low):
        return "-"
    return f"{low:.3g}-{high:.3g} (n={int(r.repeats)})"


def _summary(frame: pd.DataFrame, exp: Experiment, measured: bool) -> list[str]:
    out = [""]
    if not measured:
        hits, compared, misses = within_target(frame, exp.target)
        out.append(f"within +-{round(exp.target * 100)} % of the paper: {hits} of {compared} cells"
                   " (over-capacity cells judged on the simulator's figure without the "
                   "capacity check)")
        out += [f"- outside: {m}" for m in misses]
    for column in dict.fromkeys(frame.column) if exp.ranked_rows else []:
        paper, ours = rankings(frame, exp.ranked_rows, column)
        out.append(f"ranking {column}, paper: {_ranking_text(paper)}")
        out.append(f"ranking {column}, ours:  {_ranking_text(ours)}"
                   + ("  (same)" if paper == ours else ""))
    return out


def _ranking_text(groups: list[list[str]]) -> str:
    return " > ".join(" = ".join(g) for g in groups)


def table_stem(meta: dict) -> str:
    """<experiment>-<backend>-<hardware>-<scale>: the tables' and plots' file name."""
    return f"{meta['experiment']}-{meta['backend']}-{meta['hardware']}-{meta['scale']}"


def write_experiment(frame: pd.DataFrame, exp: Experiment, meta: dict,
                     directory: Path) -> list[Path]:
    """results/tables/<stem>.md and .csv (the CSV: one line per cell, CSV_COLUMNS first)."""
    directory.mkdir(parents=True, exist_ok=True)
    stem = directory / table_stem(meta)
    md, csv = stem.with_suffix(".md"), stem.with_suffix(".csv")
    md.write_text(format_experiment(frame, exp, meta) + "\n")
    frame.to_csv(csv, index=False)
    return [md, csv]
