"""Figures of an experiment's table (results/report.py's frame), with matplotlib, no display.

Each function takes the frame and the table's header (meta) and returns a Figure whose title
says measured or simulated, and on what; `save` writes it as PNG and SVG:

    ablation   throughput per row and column, the paper's values marked (measured: each row
               relative to its column's baseline, beside the paper's relative values)
    latency    throughput vs latency per series (Figure 1's shape), the paper's points marked
    batch      throughput vs effective batch size, with the simulator's prediction beside it
    bytes      bytes per link and phase, per cell
    predicted  predicted vs measured (or simulated) throughput, one point per cell
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display here or in CI
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

LINKS = ("cpu_to_gpu", "gpu_to_cpu", "disk_to_cpu", "cpu_to_disk")
KINDS = ("ablation", "latency", "batch", "bytes", "predicted")


def _title(meta: dict, what: str) -> str:
    how = ("simulated on hardware=" + meta["hardware"] if meta["backend"] == "simulated"
           else f"measured on {meta['device']} (hardware={meta['hardware']})")
    return f"{what}\n{meta['experiment']}, scale {meta['scale']}: {how}"


def _value(r) -> tuple[float, bool]:
    """(ours, whether it is the over-capacity figure); NaN when there is none."""
    ours = r.get("ours_token_s")
    if ours is not None and not pd.isna(ours):
        return float(ours), False
    beyond = r.get("ours_over_capacity_token_s")
    if beyond is not None and not pd.isna(beyond):
        return float(beyond), True
    return math.nan, False


def ablation(frame: pd.DataFrame, meta: dict) -> plt.Figure:
    measured = meta["backend"] == "measured"
    columns = list(dict.fromkeys(frame.column))
    rows = list(dict.fromkeys(frame.row))
    fig, axes = plt.subplots(1, len(columns), figsize=(6 * len(columns), 0.45 * len(rows) + 2),
                             squeeze=False, sharey=True)
    for ax, column in zip(axes[0], columns, strict=True):
        part = frame[frame.column == column].set_index("row").reindex(rows)
        for y, (name, r) in enumerate(part.iterrows()):
            ours, beyond = _value(r)
            paper = r.get("paper_token_s")
            if measured:
                ours, paper = r.get("relative"), r.get("paper_relative")
            if ours is not None and not pd.isna(ours):
                ax.barh(y, ours, color="tab:blue", hatch="//" if beyond else None,
                        alpha=0.5 if beyond else 1.0)
            else:  # at the axis' left edge, whatever the scale
                ax.text(0.01, y, str(r.get("status", "")).upper(), va="center", fontsize=8,
                        transform=ax.get_yaxis_transform())
            if paper is not None and not pd.isna(paper):
                ax.plot(paper, y, "D", color="tab:red", markersize=6)
        ax.set_yticks(range(len(rows)), rows, fontsize=8)
        ax.set_title(column)
        ax.set_xlabel("relative to the baseline row" if measured else "generation token/s")
        if not measured:
            ax.set_xscale("log")
    axes[0][0].invert_yaxis()  # the table's order, top down (the axes share y)
    handles = [Line2D([], [], marker="D", color="tab:red", linestyle="", label="paper"),
               Patch(color="tab:blue", label="ours"),
               Patch(facecolor="tab:blue", alpha=0.5, hatch="//",
                     label="ours, over the GPU's capacity (simulated without the check)")]
    fig.suptitle(_title(meta, "Ablation: generation throughput"), fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=8)
    return fig


def latency(frame: pd.DataFrame, meta: dict, paper_points: list[dict]) -> plt.Figure:
    columns = list(dict.fromkeys(frame.column))
    fig, axes = plt.subplots(1, len(columns), figsize=(6 * len(columns), 4.5), squeeze=False)
    for ax, column in zip(axes[0], columns, strict=True):
        part = frame[frame.column == column]
        for series, points in part.groupby("row", sort=False):
            xs, ys, hollow = [], [], []
            for _, r in points.iterrows():
                value, beyond = _value(r)
                block = r.get("block_size")
                if math.isnan(value) or block is None or pd.isna(block):
                    continue
                xs.append(block * r["gen_len"] / value)
                ys.append(value)
                hollow.append(beyond)
            line = ax.plot(xs, ys, "-", label=series)[0]
            for x, y, h in zip(xs, ys, hollow, strict=True):
                ax.plot(x, y, "o", color=line.get_color(),
                        markerfacecolor="none" if h else line.get_color())
        for point in (p for p in paper_points if p["column"] == column):
            x = point["batch"] * 32 / point["token_s"]
            ax.plot(x, point["token_s"], "*", markersize=11, color="black")
            ax.annotate(f"paper: {point['system']}", (x, point["token_s"]), fontsize=7,
                        xytext=(4, 4), textcoords="offset points")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("latency: block x n / throughput (s)")
        ax.set_ylabel("generation throughput (token/s)")
        ax.set_title(column)
        ax.legend(fontsize=8)
    fig.suptitle(_title(meta, "Throughput vs latency (hollow: over the GPU's capacity)"),
                 fontsize=10)
    fig.tight_layout()
    return fig


def batch(frame: pd.DataFrame, meta: dict) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for (column, row), part in frame.groupby(["column", "row"], sort=False):
        part = part.dropna(subset=["block_size"]).sort_values("block_size")
        line = ax.plot(part.block_size, part.ours_token_s, "o-", label=f"{column}: measured")[0]
        if "spread" in part or "ours_min_token_s" in part:
            ax.fill_between(part.block_size, part.ours_min_token_s, part.ours_max_token_s,
                            color=line.get_color(), alpha=0.2)
        if "simulated_token_s" in part and part.simulated_token_s.notna().any():
            ax.plot(part.block_size, part.simulated_token_s, "x--", color=line.get_color(),
                    label=f"{column}: simulated on {meta.get('predict_with', 'a profile')}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("effective batch size (gpu_batch_size x num_gpu_batches)")
    ax.set_ylabel("generation throughput (token/s)")
    ax.legend(fontsize=8)
    ax.set_title(_title(meta, "Throughput vs effective batch size"), fontsize=10)
    fig.tight_layout()
    return fig


def bytes_per_link(frame: pd.DataFrame, meta: dict) -> plt.Figure:
    cols = [f"bytes_{phase}_{link}" for phase in ("prefill", "decode") for link in LINKS]
    have = frame.dropna(subset=[c for c in cols if c in frame], how="all")
    labels = [f"{r.row} | {r.column}" + (f" x={r.x:g}" if "x" in have and not pd.isna(r.x)
                                         else "") for r in have.itertuples()]
    fig, ax = plt.subplots(figsize=(9, 0.3 * max(len(have), 4) + 2))
    left = [0.0] * len(have)
    for col in cols:
        if col not in have:
            continue
        values = have[col].fillna(0).astype(float) / 2**30
        ax.barh(range(len(have)), values, left=left, label=col[6:].replace("_", " ", 1))
        left = [a + b for a, b in zip(left, values, strict=True)]
    ax.set_yticks(range(len(have)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("GiB moved (all prompts), by phase and link")
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(_title(meta, "Bytes per link and phase"), fontsize=10)
    fig.tight_layout()
    return fig


def predicted(frame: pd.DataFrame, meta: dict) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(5.5, 5))
    source = "simulated_token_s" if "simulated_token_s" in frame else "predicted_token_s"
    part = frame.dropna(subset=[c for c in ("ours_token_s", source) if c in frame])
    if source in part and len(part):
        ax.loglog(part[source], part.ours_token_s, "o")
        low = min(part[source].min(), part.ours_token_s.min())
        high = max(part[source].max(), part.ours_token_s.max())
        ax.plot([low, high], [low, high], "--", color="gray", label="equal")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no predictions stored\n(the profile has no speeds)",
                ha="center", transform=ax.transAxes)
    what = "simulator" if source == "simulated_token_s" else "cost model"
    ax.set_xlabel(f"predicted by the {what} (token/s)")
    ax.set_ylabel(f"{meta['backend']} (token/s)")
    ax.set_title(_title(meta, f"Predicted vs {meta['backend']}"), fontsize=10)
    fig.tight_layout()
    return fig


def draw(kind: str, frame: pd.DataFrame, meta: dict, paper_points: list[dict]) -> plt.Figure:
    if kind not in KINDS:
        raise ValueError(f"plot kind {kind!r}; allowed: {KINDS}")
    if kind == "latency":
        return latency(frame, meta, paper_points)
    return {"ablation": ablation, "batch": batch, "bytes": bytes_per_link,
            "predicted": predicted}[kind](frame, meta)


def save(fig: plt.Figure, stem: Path) -> list[Path]:
    """stem.png and stem.svg; the figure is closed."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(".png"), stem.with_suffix(".svg")]
    for path in paths:
        fig.savefig(path, dpi=120)
    plt.close(fig)
    return paths
