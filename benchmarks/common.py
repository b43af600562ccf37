"""Helpers for benchmark scripts: repeated timing with a warm-up, median and spread."""

from __future__ import annotations

import statistics
from collections.abc import Callable


def interleaved(runs: dict[str, Callable[[], float]], repeats: int = 3,
                warmup: int = 1) -> dict[str, list[float]]:
    """Run each system in turn, repeat after repeat, so slow phases of a noisy machine hit all."""
    for _ in range(warmup):
        for run in runs.values():
            run()
    values: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            values[name].append(run())
    return values


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):8.2f} (spread {max(values) - min(values):.2f})"
