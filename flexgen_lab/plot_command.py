"""The `plot` command: an experiment's figures from what the store holds (nothing is run),
or one traced run's timeline.

    python -m flexgen_lab plot experiment=table4 backend=simulated
    python -m flexgen_lab plot run_id=12 store.path=results/flexgen_lab.sqlite
"""

from __future__ import annotations

from pathlib import Path

from flexgen_lab.config import ConfigError
from flexgen_lab.reproduce import (
    OPTIONS,
    PLOTS_DIR,
    eval_rows,
    parse_options,
    plan,
    table,
)
from flexgen_lab.results import experiment as experiments
from flexgen_lab.results.store import ResultStore


def plot(args: list[str]) -> list[Path]:
    """plot experiment=NAME [backend=...] [reproduce.scale=...] [store.path=...]: the
    experiment's figures from what the store holds (nothing is run), as PNG and SVG."""
    from flexgen_lab.results import plots, report

    run_id = [a.partition("=")[2] for a in args if a.startswith("run_id=")]
    if run_id:  # one run's trace as a timeline (a pipeline's stages overlapping)
        return _plot_run(run_id[0], args)
    opts = parse_options(args)
    exp = experiments.load(opts.experiment)
    if exp.kind == "eval":  # accuracy rows (table5): run by the eval command's code
        return eval_rows(exp, opts)
    scale = exp.scale_for(opts.backend, opts.scale)
    store = ResultStore(opts.store_path)
    planned = plan(exp, scale, opts, store)
    frame, meta = table(exp, scale, planned, store, args)
    if not (frame.status == "ok").any() and not frame.get(
            "ours_over_capacity_token_s", frame.status).notna().any():
        raise ConfigError(f"plot: nothing stored for {exp.name} at scale {scale.name} in "
                          f"{opts.store_path}; run `python -m flexgen_lab reproduce "
                          f"{' '.join(args)}` first")
    paths = []
    for kind in exp.plots:
        stem = PLOTS_DIR / f"{report.table_stem(meta)}-{kind}"
        paths += plots.save(plots.draw(kind, frame, meta, exp.paper_points), stem)
    print("wrote " + ", ".join(str(p) for p in paths))
    return paths


def _plot_run(run_id: str, args: list[str]) -> list[Path]:
    from flexgen_lab.results.timeline import plot_run

    store_path = dict(a.partition("=")[::2] for a in args).get("store.path",
                                                             OPTIONS["store.path"])
    if not run_id.isdigit():
        raise ConfigError(f"plot: run_id={run_id!r}: must be a run's integer id")
    paths = plot_run(ResultStore(store_path), int(run_id), PLOTS_DIR)
    print("wrote " + ", ".join(str(p) for p in paths))
    return paths
