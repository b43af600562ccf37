"""`reproduce` for experiments of kind `eval` (experiments/table5.yaml): each row a variant, each
column a metric, run with the `eval` command's code and compared as relative changes.

A row's configuration is the same in every column, so it runs once (keyed by its eval hash;
resume skips a stored one unless reproduce.rerun=true); the table shows each metric's value,
its change from the baseline row (full precision) in percent, and the paper's change.

    python -m flexgen_lab reproduce experiment=table5 [reproduce.scale=tiny] [store.path=...]
"""

from __future__ import annotations

import pandas as pd

from flexgen_lab.compose import compose_run_config
from flexgen_lab.config import ConfigError
from flexgen_lab.eval_run import eval_hash, run_eval, variant_label
from flexgen_lab.results.experiment import Experiment, Scale
from flexgen_lab.results.store import ResultStore
from flexgen_lab.runner import RunFailed, requested_hash


def run_rows(exp: Experiment, scale: Scale, command_line: list[str], store: ResultStore,
             rerun: bool, only: list[str] | None) -> dict[str, str]:
    """Row name -> its eval hash, running the rows not stored yet."""
    hashes: dict[str, str] = {}
    for cell in exp.cells(scale, command_line, only):
        if cell.row in hashes:
            continue
        cfg = compose_run_config(list(cell.overrides))
        hashes[cell.row] = h = eval_hash(requested_hash(cfg))
        if rerun or store.runs("config_hash = ? AND status = 'ok'", [h]).empty:
            print(f"{exp.name}: {cell.row}")
            try:
                run_eval(cfg)
            except RunFailed as err:  # stored with its status; the table says so
                print(f"  failed: {err}")
    return hashes


def frame(exp: Experiment, hashes: dict[str, str], store: ResultStore) -> pd.DataFrame:
    evals = store.evals()
    latest = {}
    for row, h in hashes.items():
        runs = store.runs("config_hash = ? AND status = 'ok'", [h])
        if not runs.empty:
            run_id = int(runs.run_id.iloc[-1])
            latest[row] = (runs.iloc[-1].to_dict(),
                           evals[evals.run_id == run_id].set_index("metric").value.to_dict())
    base = latest.get(exp.baseline_row, (None, {}))[1]
    out = []
    for spec in exp.rows:
        if spec["name"] not in hashes:
            continue
        run, values = latest.get(spec["name"], (None, {}))
        for metric in exp.columns:
            value, ref = values.get(metric), base.get(metric)
            change = (100 * (value / ref - 1) if value is not None and ref else None)
            out.append(dict(row=spec["name"], column=metric,
                            variant=variant_label(run) if run else None,
                            status="ok" if value is not None else "not run", ours=value,
                            ours_change_pct=change,
                            paper_change_pct=spec.get("paper", {}).get(metric),
                            scored_tokens=values.get("scored_tokens"),
                            wall_s=run["latency_s"] if run else None))
    return pd.DataFrame(out)


def format_frame(exp: Experiment, table: pd.DataFrame, scale: Scale) -> str:
    def num(x, fmt):
        return "-" if x is None or pd.isna(x) else format(x, fmt)

    lines = [f"# {exp.title} [measured, scale {scale.name}]", "",
             "| variant | perplexity | change % | paper % | last-word acc | change % | "
             "paper % |", "|---|---|---|---|---|---|---|"]
    for row, group in table.groupby("row", sort=False):
        m = group.set_index("column")
        p, a = m.loc["perplexity"], m.loc["last_word_accuracy"]
        lines.append(f"| {row} | {num(p.ours, '.3f')} | {num(p.ours_change_pct, '+.2f')} | "
                     f"{num(p.paper_change_pct, '+.2f')} | {num(a.ours, '.3f')} | "
                     f"{num(a.ours_change_pct, '+.2f')} | {num(a.paper_change_pct, '+.2f')} |")
    lines += ["", "full precision: SmolLM2 as shipped (its Q4_1 weights dequantised); paper: "
              "OPT-30B on WikiText (perplexity) and Lambada (accuracy), facts §7"]
    return "\n".join(lines)


def reproduce(exp: Experiment, scale: Scale, command_line: list[str], store: ResultStore,
              rerun: bool, only: list[str] | None, directory):
    """Run what is missing, then (the table's text, the markdown file's path)."""
    if scale.backend != "measured":
        raise ConfigError(f"experiment {exp.name} is measured only; allowed: backend=measured")
    hashes = run_rows(exp, scale, command_line, store, rerun, only)
    table = frame(exp, hashes, store)
    text = format_frame(exp, table, scale)
    directory.mkdir(parents=True, exist_ok=True)
    stem = directory / f"{exp.name}-measured-local-{scale.name}"
    stem.with_suffix(".md").write_text(text + "\n")
    table.to_csv(stem.with_suffix(".csv"), index=False)
    return text + f"\n(wrote {stem}.md, {stem}.csv)", stem.with_suffix(".md")
