"""A run's op trace as a timeline: one lane per stage (and per I/O link), compute spans
coloured by micro-block, so a pipeline's overlap is visible (stage s + 1 on micro-block m
while stage s is on m + 1). Any traced run draws; a single process is one stage.

    python -m flexgen_lab plot run_id=12 store.path=results/results.sqlite
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display here or in CI
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402


def lanes(trace: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """(label, spans) per lane: each stage's computes, then each stage's links that moved
    bytes; spans hold start_s, end_s and the micro-block."""
    out = []
    for stage, rows in trace.groupby("stage"):
        computes = rows[rows.op == "compute"]
        out.append((f"stage {stage} compute", computes))
        for link, moved in rows[(rows.op != "compute") & (rows.bytes > 0)].groupby("link"):
            out.append((f"stage {stage} {link}", moved))
    return out


def draw_timeline(trace: pd.DataFrame, num_gpu_batches: int, title: str) -> plt.Figure:
    """Compute spans per stage coloured by micro-block (batch // num_gpu_batches)."""
    found = lanes(trace)
    fig, ax = plt.subplots(figsize=(11, 1.0 + 0.45 * len(found)))
    colours = plt.get_cmap("tab10")
    for y, (_, spans) in enumerate(found):
        block = spans.batch // max(num_gpu_batches, 1)
        ax.broken_barh(list(zip(spans.start_s, spans.end_s - spans.start_s, strict=True)),
                       (y - 0.4, 0.8), facecolors=[colours(int(m) % 10) for m in block])
    blocks = sorted({int(b) // max(num_gpu_batches, 1) for b in trace.batch.dropna()})
    ax.legend(handles=[Patch(color=colours(m % 10), label=f"micro-block {m}")
                       for m in blocks[:10]], loc="upper right", fontsize="small")
    ax.set_yticks(range(len(found)), [label for label, _ in found])
    ax.invert_yaxis()
    ax.set_xlabel("seconds from the start (each stage's clock, started together)")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def plot_run(store, run_id: int, out_dir: Path) -> list[Path]:
    """The run's timeline as PNG and SVG under out_dir; a run without a trace is refused."""
    from flexgen_lab.config import ConfigError
    from flexgen_lab.results.plots import save

    runs = store.runs("run_id = ?", (run_id,))
    if runs.empty:
        raise ConfigError(f"plot: run_id={run_id} is not in the store")
    trace = store.trace(run_id)
    if trace.empty:
        raise ConfigError(f"plot: run_id={run_id} has no trace; allowed: a run made with "
                          "trace=true")
    r = runs.iloc[0]
    stages = int(r.num_stages) if pd.notna(r.num_stages) else 1
    title = (f"run {run_id}: {r.model} [{r.backend}] on {r.device}, {stages} stage(s), "
             f"{int(r.gpu_batch_size)} x {int(r.num_gpu_batches)} per micro-block")
    fig = draw_timeline(trace, int(r.num_gpu_batches), title)
    return save(fig, out_dir / f"run{run_id}-timeline")
