"""Experiment files: one YAML per reproduced table or figure, expanded into cells.

An experiment (experiments/<name>.yaml; its first line is the command that runs it) has
scales, columns and rows. A cell is one (row, column) at one scale, and its configuration is
a list of Hydra overrides merged in this order, a later value for a key winning:

    the scale's overrides, the command line's, the column's at that scale, the row's (for
    every column, or per column), the row's at that scale; then backend and store.path
    from the command line (or the scale's backend)

so a row states only what differs from the column it sits in. Paper values live in the
rows, per column; nothing of the paper is written in code.

    scales:
      paper: {backend: simulated, overrides: [hardware=t4-paper-sourced, ...]}
      cpu:   {backend: measured, overrides: [...], block_scale: 0.083,
            budgets: "paper-ratio:t4-paper-sourced", repeats: 3}
    columns:
      OPT-30B: {paper_model: opt-30b, paper: [model=opt-30b, policy=...], tiny: [...]}
      decode 30B: {..., metric: decode_throughput}   # token/s from this runs column
    rows:
      - name: no overlapping
        overrides: [policy.overlap=false]       # or {OPT-30B: [...], OPT-175B: [...]}
        at: {tiny: [workload.gen_len=3]}         # extra overrides at one scale
        paper: {OPT-30B: 5.86, OPT-175B: 0.59}   # token/s; "OOM" where the paper ran out
        note: "..."                              # printed beside the row
        scales: [paper]                          # only at these scales (default: all)
        runs: false                              # a row no system here can run (paper only)
    tokens_reference: FlexGen   # other systems' cells say whether their tokens equal its

`kind: sweep` experiments (figures) take their cells from `sweep`: a list of rows with the
same fields, each with a `values` list crossed with a `key` (e.g. policy.gpu_batch_size).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from flexgen_lab.config import ConfigError

EXPERIMENTS_DIR = Path(__file__).resolve().parents[2] / "experiments"
REPRODUCE_KEYS = ("backend", "store.path")  # the command line's, whatever a cell says
OOM = "OOM"
# what a column's token/s are (columns' `metric`; null: the paper's generation throughput)
METRICS = (None, "generation_throughput", "decode_throughput", "prefill_throughput")


@dataclass(frozen=True)
class Cell:
    """One configuration of an experiment at one scale, and what the paper says of it."""

    row: str
    column: str
    overrides: tuple[str, ...]  # complete, merged (key=value, last value per key)
    paper_token_s: float | None = None  # None: the paper has no value (or OOM, see below)
    paper_oom: bool = False
    note: str = ""
    runs: bool = True  # False: shown with the paper's value only
    x: float | None = None  # the swept value, for figures
    metric: str = "generation_throughput"  # the runs column its token/s are read from

    @property
    def system(self) -> str:
        return self.setting("system", "flexgen_lab")

    @property
    def backend(self) -> str:
        return self.setting("backend", "measured")

    def setting(self, key: str, default: str) -> str:
        for item in reversed(self.overrides):
            name, _, value = item.partition("=")
            if name == key:
                return value
        return default


@dataclass
class Scale:
    name: str
    backend: str
    overrides: list[str] = field(default_factory=list)
    budgets: str | None = None  # "paper-ratio:<profile>": capacities scaled from the paper's
    repeats: int | None = None
    block_scale: float | None = None  # a manual policy's gpu_batch_size times this (>= 1)
    predict_with: str | None = None  # a profile: the simulator's figure beside measured ones


@dataclass
class Experiment:
    name: str
    title: str
    command: str
    kind: str  # table | sweep | eval (accuracy rows run by `eval`: flexgen_lab/eval_table.py)
    scales: dict[str, Scale]
    columns: dict[str, dict]
    rows: list[dict]
    baseline_row: str | None = None
    ranked_rows: list[str] = field(default_factory=list)  # rows whose ranking is compared
    plots: list[str] = field(default_factory=list)
    sweep_key: str | None = None
    paper_points: list[dict] = field(default_factory=list)  # figure points (from the paper)
    tokens_reference: str | None = None  # the row other systems' tokens are compared with
    target: float = 0.25  # simulated cells within +-target of the paper's (Table 3: 0.30)

    def scale_for(self, backend: str | None, scale: str | None) -> Scale:
        """reproduce.scale, else the scale whose backend is the one asked (paper for
        simulated, cpu for measured)."""
        if scale is not None:
            if scale not in self.scales:
                raise ConfigError(f"reproduce.scale={scale!r}: allowed: "
                                  f"{sorted(self.scales)} (experiment {self.name}'s scales)")
            return self.scales[scale]
        wanted = {"simulated": "paper", "measured": "cpu"}.get(backend or "simulated")
        if wanted not in self.scales:
            raise ConfigError(f"backend={backend}: experiment {self.name} has no {wanted!r} "
                              f"scale; allowed: reproduce.scale={'|'.join(self.scales)}")
        return self.scales[wanted]

    def cells(self, scale: Scale, command_line: list[str], only: list[str] | None = None
              ) -> list[Cell]:
        """Every cell at `scale` in table order; `only` keeps the named rows."""
        forced = [o for o in command_line if o.partition("=")[0] in REPRODUCE_KEYS]
        shared = [o for o in command_line if o not in forced]
        backend = [f"backend={scale.backend}"]
        out = []
        for row in self.rows:
            if only and row["name"] not in only:
                continue
            if scale.name not in row.get("scales", list(self.scales)):
                continue
            for column in row.get("columns", list(self.columns)):
                for x, extra in self._swept(row, column):
                    overrides = [*scale.overrides, *shared,
                                 *self._at(self.columns[column], scale.name, column),
                                 *self._for_column(row.get("overrides", []), column),
                                 *self._for_column(row.get("at", {}).get(scale.name, []),
                                                   column), *extra, *backend, *forced]
                    out.append(self._cell(row, column, merge(overrides), x,
                                          self.columns[column].get("metric")))
        return out

    def _swept(self, row: dict, column: str) -> list[tuple[float | None, list[str]]]:
        """(x, its override) per swept value (one list, or one per column); (None, [])
        for a table."""
        if self.kind != "sweep":
            return [(None, [])]
        values = row["values"]
        values = values.get(column, []) if isinstance(values, dict) else values
        return [(float(v), [f"{self.sweep_key}={v}"]) for v in values]

    @staticmethod
    def _at(column: dict, scale: str, name: str) -> list[str]:
        if scale not in column:
            raise ConfigError(f"column {name!r} has no overrides for scale {scale!r}")
        return list(column[scale])

    @staticmethod
    def _for_column(overrides, column: str) -> list[str]:
        if isinstance(overrides, dict):
            return list(overrides.get(column, []))
        return list(overrides)

    @staticmethod
    def _cell(row: dict, column: str, overrides: tuple[str, ...], x,
              metric: str | None = None) -> Cell:
        paper = row.get("paper", {}).get(column)
        oom = paper == OOM
        return Cell(row["name"], column, overrides, None if oom or paper is None
                    else float(paper), oom, row.get("note", ""), row.get("runs", True), x,
                    metric or "generation_throughput")


def merge(overrides: list[str]) -> tuple[str, ...]:
    """Hydra overrides with one value per key, the last one kept, in first-seen order."""
    merged: dict[str, str] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r}: expected key=value")
        merged.pop(key, None)
        merged[key] = value
    return tuple(f"{k}={v}" for k, v in merged.items())


def available() -> list[str]:
    return sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.yaml"))


def load(name: str, directory: Path | None = None) -> Experiment:
    """experiments/<name>.yaml, checked: a bad file names the file and the problem."""
    path = (directory or EXPERIMENTS_DIR) / f"{name}.yaml"
    if not path.exists():
        raise ConfigError(f"experiment={name!r}: allowed values are {available()}")
    text = path.read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    first = text.splitlines()[0] if text else ""
    if not first.startswith("# python -m flexgen_lab reproduce"):
        raise ConfigError(f"{path}: the first line must be the command that runs it")
    return _build(name, data, first[2:].strip(), path)


def _build(name: str, data: dict, command: str, path: Path) -> Experiment:
    missing = [k for k in ("title", "scales", "columns") if k not in data]
    if missing:
        raise ConfigError(f"{path}: missing {', '.join(missing)}")
    kind = data.get("kind", "table")
    rows = data.get("sweep" if kind == "sweep" else "rows", [])  # table | eval: rows
    scales = {n: Scale(n, s["backend"], list(s.get("overrides", [])), s.get("budgets"),
                       s.get("repeats"), s.get("block_scale"), s.get("predict_with"))
              for n, s in data["scales"].items()}
    for row in rows:
        unknown = set(row.get("columns", [])) - set(data["columns"])
        bad_metric = {c.get("metric") for c in data["columns"].values()} - set(METRICS)
        if bad_metric:
            raise ConfigError(f"{path}: column metric {sorted(bad_metric, key=str)}: allowed "
                              f"{', '.join(m for m in METRICS if m)} (null: generation)")
        if unknown or "," in row.get("name", ","):
            raise ConfigError(f"{path}: row {row.get('name')!r}: needs a name without commas "
                              f"(reproduce.only lists them) and known columns, not "
                              f"{sorted(unknown)}")
        for value in row.get("paper", {}).values():
            if value != OOM and not isinstance(value, (int, float)):
                raise ConfigError(f"{path}: row {row['name']!r}: paper value {value!r} is "
                                  "neither a number nor OOM")
    return Experiment(name, data["title"], command, kind, scales, data["columns"], rows,
                      data.get("baseline_row"), data.get("ranked_rows", []),
                      data.get("plots", []), data.get("sweep_key"),
                      data.get("paper_points", []), data.get("tokens_reference"),
                      float(data.get("target", 0.25)))


def tied_ranking(values: dict[str, float], tie: float = 0.05) -> list[list[str]]:
    """Names from the highest value down; a value within `tie` (relative) of the group's
    first joins its group. NaN (OOM, failed) ranks last, all together."""
    finite = sorted(((v, k) for k, v in values.items() if not math.isnan(v)), reverse=True)
    groups: list[list[str]] = []
    top = None
    for value, key in finite:
        if groups and top and abs(top - value) <= tie * abs(top):
            groups[-1].append(key)
        else:
            groups.append([key])
            top = value
    rest = [k for k, v in values.items() if math.isnan(v)]
    return groups + ([rest] if rest else [])
