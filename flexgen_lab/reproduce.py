"""reproduce: run an experiment file's cells into the store, then print and write its table.

    python -m flexgen_lab reproduce experiment=table4 backend=simulated
    python -m flexgen_lab reproduce experiment=table4 backend=measured reproduce.repeats=3
    python -m flexgen_lab reproduce experiment=table2 reproduce.dry_run=true
    python -m flexgen_lab reproduce experiment=table4 reproduce.scale=tiny store.path=t.sqlite

Options of reproduce itself: experiment, reproduce.{scale,rerun,repeats,dry_run,only},
store.path and backend (which picks the scale: paper for simulated, cpu for measured). Any
other override applies to every cell; a cell's own overrides win over it
(results/experiment.py). Resume: a cell whose config hash already has enough ok or oom rows
is not run again (reproduce.rerun=true runs it anyway); measured cells run
reproduce.repeats times (default 3) and the table shows the median and the spread.
"""

from __future__ import annotations

import datetime
import time
from dataclasses import dataclass, field
from pathlib import Path

from flexgen_lab.compose import compose_run_config, load_profile
from flexgen_lab.config import ConfigError, RunConfig
from flexgen_lab.results import experiment as experiments
from flexgen_lab.results.experiment import Cell, Experiment, Scale
from flexgen_lab.results.parity import tokens_equal
from flexgen_lab.results.store import ResultStore
from flexgen_lab.runner import NotBuiltError, RunFailed, git_commit, requested_hash, run
from flexgen_lab.units import TORCH_DTYPES

DEFAULT_REPEATS = 3
TABLES_DIR = Path("results/tables")
PLOTS_DIR = Path("results/plots")
OPTIONS = {"experiment": None, "reproduce.scale": None, "reproduce.rerun": "false",
           "reproduce.repeats": None, "reproduce.dry_run": "false", "reproduce.only": None,
           "store.path": "results/flexgen_lab.sqlite", "backend": None}


@dataclass
class Options:
    experiment: str
    scale: str | None = None
    rerun: bool = False
    repeats: int | None = None
    dry_run: bool = False
    only: list[str] | None = None
    store_path: str = "results/flexgen_lab.sqlite"
    backend: str | None = None
    overrides: list[str] = field(default_factory=list)  # applied to every cell


@dataclass
class Planned:
    """A cell made concrete: its RunConfig and hash, or why it cannot run here."""

    cell: Cell
    cfg: RunConfig | None = None
    config_hash: str | None = None
    status: str = "to run"  # to run | stored | not simulated | not built | not run | config error
    message: str = ""
    needed: int = 1  # rows with status ok or oom the cell wants
    done: int = 0


def parse_options(args: list[str]) -> Options:
    """key=value arguments; reproduce's own keys are checked, the rest go to every cell."""
    own, rest = dict(OPTIONS), []
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep:
            raise ConfigError(f"reproduce: argument {arg!r} is not key=value")
        if key.startswith("reproduce.") and key not in OPTIONS:
            allowed = ", ".join(k for k in OPTIONS if k.startswith("reproduce."))
            raise ConfigError(f"reproduce: unknown option {key}; allowed: {allowed}")
        if key in OPTIONS:
            own[key] = value
        else:
            rest.append(arg)
    if not own["experiment"]:
        raise ConfigError("reproduce: experiment=NAME is required; allowed: "
                          f"{experiments.available()}")
    compose_run_config(rest)  # an override Hydra refuses (key, type, option) fails every cell
    flags = {}
    for key in ("reproduce.rerun", "reproduce.dry_run"):
        if own[key] not in ("true", "false"):
            raise ConfigError(f"{key}={own[key]!r}; allowed: true, false")
        flags[key] = own[key] == "true"
    repeats = own["reproduce.repeats"]
    if repeats is not None and (not repeats.isdigit() or int(repeats) < 1):
        raise ConfigError(f"reproduce.repeats={repeats!r}: must be a positive integer")
    if own["backend"] not in (None, "measured", "simulated"):
        raise ConfigError(f"backend={own['backend']!r}; allowed: measured, simulated")
    only = own["reproduce.only"]
    return Options(own["experiment"], own["reproduce.scale"], flags["reproduce.rerun"],
                   int(repeats) if repeats else None, flags["reproduce.dry_run"],
                   [r.strip() for r in only.split(",")] if only else None,
                   own["store.path"], own["backend"], rest)


def command_line(opts: Options) -> list[str]:
    """What every cell gets from the command line (backend and store.path win over cells)."""
    forced = [f"store.path={opts.store_path}"]
    if opts.backend:
        forced.append(f"backend={opts.backend}")
    return [*opts.overrides, *forced]


def plan(exp: Experiment, scale: Scale, opts: Options, store: ResultStore) -> list[Planned]:
    """Every cell of the table, composed, hashed and checked against the store."""
    cells = exp.cells(scale, command_line(opts))
    budgets = column_budgets(exp, scale, cells) if scale.budgets else {}
    repeats = opts.repeats or scale.repeats or DEFAULT_REPEATS
    planned = [_plan_cell(cell, scale, budgets.get(cell.column), repeats) for cell in cells
               if not opts.only or cell.row in opts.only]
    for p in planned:
        if p.status == "to run":
            rows = store.runs("config_hash = ? AND status IN ('ok', 'oom')", [p.config_hash])
            p.done = 0 if opts.rerun else len(rows)
            if p.done >= p.needed:
                p.status = "stored"
    return planned


def make_config(cell: Cell, scale: Scale, budgets: dict[str, int] | None = None) -> RunConfig:
    """The cell's RunConfig; at a scale with block_scale a manual policy's gpu_batch_size is
    scaled (at least 1), its number of GPU batches and placements kept; `budgets` (bytes per
    tier) replace the hardware's capacities."""
    cfg = compose_run_config(list(cell.overrides))
    if scale.block_scale and cfg.policy.name == "manual" and cfg.system.name == "flexgen_lab":
        cfg.policy.gpu_batch_size = max(1, round(cfg.policy.gpu_batch_size * scale.block_scale))
    for tier, nbytes in (budgets or {}).items():
        setattr(cfg.hardware, f"{tier}_mem", nbytes)
    return cfg


def _plan_cell(cell: Cell, scale: Scale, budgets: dict[str, int] | None,
               repeats: int) -> Planned:
    p = Planned(cell)
    if not cell.runs:
        p.status, p.message = "not run", "a system flexgen_lab does not run"
        return p
    if cell.backend == "simulated" and cell.system != "flexgen_lab":
        p.status, p.message = "not simulated", f"system={cell.system} runs measured only"
        return p
    try:
        p.cfg = make_config(cell, scale, budgets)
        p.config_hash = requested_hash(p.cfg)
    except NotBuiltError as err:
        p.status, p.message = "not built", str(err)
    except ConfigError as err:
        p.status, p.message = "config error", str(err)
    p.needed = repeats if cell.backend == "measured" else 1
    return p


def column_budgets(exp: Experiment, scale: Scale, cells: list[Cell]
                   ) -> dict[str, dict[str, int]]:
    """Budgets "paper-ratio:<profile>": each tier's capacity is the profile's times our
    model's bytes over the paper's model's (the column's paper_model, in fp16). The cpu and
    disk tiers are raised to what the column's baseline policy needs (every row's, in a table
    without a baseline row), the gpu tier to what the most demanding manual row of the column
    needs: a gpu budget a row does not fit would leave nothing to compare. The bytes go in
    the cells' configs (so in their hash and the budget columns); every cell of a column
    gets the same, so its rows compare."""
    from flexgen_lab.checks import prepare
    from flexgen_lab.models.spec import ModelSpec
    from flexgen_lab.planner.memory_model import peak_bytes
    from flexgen_lab.runner import job_for

    profile = load_profile(scale.budgets.partition(":")[2] or "t4-paper")
    budgets: dict[str, dict[str, float]] = {}
    for cell in cells:
        if not cell.runs or cell.system != "flexgen_lab":
            continue  # a baseline's budgets are not ours to size
        cfg = make_config(cell, scale)
        if cfg.policy.name != "manual":
            continue
        spec, device, dtype, _ = prepare(cfg)
        item = TORCH_DTYPES[dtype].itemsize
        need = peak_bytes(job_for(cfg, spec, dtype, profile, device=device))
        if cell.column not in budgets:
            paper = ModelSpec.from_name(exp.columns[cell.column]["paper_model"])
            ratio = spec.weight_bytes(item) / paper.weight_bytes(2)
            budgets[cell.column] = {t: ratio * getattr(profile, f"{t}_mem")
                                    for t in ("gpu", "cpu", "disk")}
        column = budgets[cell.column]
        column["gpu"] = max(column["gpu"], need["gpu"])
        if cell.row == exp.baseline_row or exp.baseline_row is None:
            column["cpu"], column["disk"] = (max(column[t], need[t]) for t in ("cpu", "disk"))
    return {column: {t: int(b) for t, b in tiers.items()} for column, tiers in budgets.items()}


def estimate_seconds(planned: list[Planned]) -> float:
    """A rough wall-time guess: a simulated run costs about 20 us per op of its stream; a
    measured one 3 s of setup plus the cost model's time where the profile has speeds."""
    from flexgen_lab.hardware.profile import HardwareProfile
    from flexgen_lab.models.spec import ModelSpec
    from flexgen_lab.planner.cost_model import predict
    from flexgen_lab.planner.job import Job
    from flexgen_lab.runner import to_policy

    total = 0.0
    for p in _distinct(planned):
        if p.status != "to run" or p.cfg is None:
            continue
        cfg, runs = p.cfg, p.needed - p.done
        spec = ModelSpec.from_name(cfg.model.name) if cfg.model.name != "local" else None
        policy, w = to_policy(cfg), cfg.workload
        layers = spec.num_layers + 2 if spec else 30
        ops = w.gen_len * layers * policy.num_gpu_batches * 6
        if cfg.backend.name == "simulated":
            total += runs * (0.2 + 2e-5 * ops)
            continue
        profile = HardwareProfile.from_config(cfg.hardware)
        seconds = 5.0
        if spec and not profile.missing_speeds() and cfg.policy.name == "manual":
            pred = predict(Job(spec, policy, cfg.schedule.name, profile, w.prompt_len,
                               w.gen_len, 4))
            seconds = pred.prefill_s + pred.decode_s
        total += runs * (3.0 + seconds)
    return total


def execute(planned: list[Planned]) -> None:
    """Run every cell still to run, as many times as it needs, with a progress bar."""
    from tqdm import tqdm

    todo = [p for p in planned if p.status == "to run"]
    total = sum(p.needed - p.done for p in _distinct(todo))
    ran: dict[str, int] = {}  # hash -> runs made now (two cells may be one configuration)
    with tqdm(total=total, unit="run", desc="reproduce") as bar:
        for p in todo:
            p.done += ran.get(p.config_hash, 0)
            for _ in range(max(0, p.needed - p.done)):
                bar.set_postfix_str(f"{p.cell.row} | {p.cell.column}"[:60])
                try:
                    run(p.cfg)
                except RunFailed as err:  # stored with its status; the table shows it
                    if isinstance(err.__cause__, KeyboardInterrupt):
                        raise KeyboardInterrupt from None  # stop; a rerun resumes
                except ConfigError as err:
                    p.status, p.message = "config error", str(err)
                    bar.update(p.needed - p.done)
                    break
                p.done += 1
                ran[p.config_hash] = ran.get(p.config_hash, 0) + 1
                bar.update(1)
            if p.status == "to run":
                p.status = "stored"


def _distinct(planned: list[Planned]) -> list[Planned]:
    """One Planned per config hash (a row may repeat another's configuration)."""
    return list({p.config_hash: p for p in reversed(planned)}.values())


def eval_rows(exp: Experiment, opts: Options) -> Path:
    """An eval experiment's table (table5), run and printed by the eval command's code."""
    from flexgen_lab import eval_table

    scale = exp.scale_for(opts.backend or "measured", opts.scale)
    text, path = eval_table.reproduce(exp, scale, command_line(opts),
                                      ResultStore(opts.store_path), opts.rerun, opts.only,
                                      TABLES_DIR)
    print(text)
    return path


def reproduce(args: list[str]) -> Path | None:
    """The command: plan, print the count and estimate, run, then write and print the
    table. Returns the markdown table's path (None for a dry run)."""
    from flexgen_lab.results import report

    opts = parse_options(args)
    exp = experiments.load(opts.experiment)
    if exp.kind == "eval":  # accuracy rows (table5): run by the eval command's code
        return eval_rows(exp, opts)
    scale = exp.scale_for(opts.backend, opts.scale)
    store = ResultStore(opts.store_path)
    planned = plan(exp, scale, opts, store)
    counts = {s: sum(p.status == s for p in planned) for s in
              dict.fromkeys(p.status for p in planned)}
    print(f"{exp.name} at scale {scale.name} ({scale.backend}): {len(planned)} cells, "
          + ", ".join(f"{n} {s}" for s, n in counts.items())
          + f"; estimated {estimate_seconds(planned):.0f} s (rough)")
    if opts.dry_run:
        for p in planned:
            print(f"  {p.status:13s} {p.cell.row} | {p.cell.column}"
                  + (f"  x={p.cell.x:g}" if p.cell.x is not None else "")
                  + (f"  ({p.message})" if p.message else ""))
        return None
    start = time.perf_counter()
    execute(planned)
    frame, meta = table(exp, scale, planned, store, args)
    paths = report.write_experiment(frame, exp, meta, TABLES_DIR)
    print(report.format_experiment(frame, exp, meta))
    print(f"({time.perf_counter() - start:.0f} s; wrote {', '.join(str(p) for p in paths)})")
    return paths[0]


def table(exp: Experiment, scale: Scale, planned: list[Planned], store: ResultStore,
          args: list[str]):
    """(frame, header) of what the store holds for the planned cells."""
    from flexgen_lab.results import report

    extra: dict[str, dict] = {}
    for name, figures in (("ours_over_capacity_token_s", over_capacity(planned, store)),
                          ("simulated_token_s", predictions(planned, store, scale)),
                          ("tokens_equal_ours", tokens_equal(exp, planned, store))):
        for config_hash, value in figures.items():
            extra.setdefault(config_hash, {})[name] = value
    frame = report.experiment_frame(exp, scale, planned, store, extra)
    meta = header(exp, scale, planned, args)
    if scale.predict_with:
        meta["predict_with"] = scale.predict_with
    return frame, meta


def predictions(planned: list[Planned], store: ResultStore, scale: Scale) -> dict[str, float]:
    """hash -> the simulator's token/s for each ok cell on the scale's predict_with profile
    (this machine's calibrated one for batch_sweep); {} when the scale has none or the
    profile does not exist yet (the table then says so)."""
    if not scale.predict_with:
        return {}
    try:
        profile = load_profile(scale.predict_with)
        profile.require_speeds()
    except ConfigError as err:
        print(f"no prediction: hardware={scale.predict_with} ({err}); run `python -m "
              f"flexgen_lab calibrate name={scale.predict_with}` to make it")
        return {}
    out = {}
    for p in planned:
        if p.cfg is None or not len(store.runs("config_hash = ? AND status = 'ok'",
                                              [p.config_hash])):
            continue
        out[p.config_hash] = simulated_throughput(p.cfg, profile)
    return out


def simulated_throughput(cfg: RunConfig, profile) -> float:
    """The simulator's token/s for cfg's policy and workload on `profile` (no capacity
    check: the caller says what the figure stands for)."""
    from flexgen_lab.checks import prepare
    from flexgen_lab.runner import job_for
    from flexgen_lab.sim.simulator import simulate

    spec, _, dtype, _ = prepare(cfg)
    return simulate(job_for(cfg, spec, dtype, profile)).generation_throughput


def over_capacity(planned: list[Planned], store: ResultStore) -> dict[str, float]:
    """hash -> simulated token/s without the capacity check, for simulated cells stored as
    oom over the gpu tier only (our engine's footprint over the paper's GPU: see the engine's
    second pass). Never stored as a run: the row stays oom; the table shows this figure
    beside it, labelled "over capacity"."""
    from flexgen_lab.hardware.profile import HardwareProfile

    out = {}
    for p in planned:
        if (p.cfg is None or p.cfg.backend.name != "simulated" or p.cfg.policy.name != "manual"
                or p.cfg.distributed.name != "none"):  # (a single machine's figure)
            continue
        oom = store.runs("config_hash = ? AND status = 'oom'", [p.config_hash])
        if not len(oom) or not _only_gpu_over(str(oom.error.iloc[-1])):
            continue  # over the cpu or disk tier too: a real OOM, as the paper's "no disk"
        out[p.config_hash] = simulated_throughput(
            p.cfg, HardwareProfile.from_config(p.cfg.hardware))
    return out


def _only_gpu_over(message: str) -> bool:
    """The simulated oom message names each tier over its capacity ("gpu tier: ...")."""
    return "gpu tier" in message and "cpu tier" not in message and "disk tier" not in message


def header(exp: Experiment, scale: Scale, planned: list[Planned], args: list[str]) -> dict:
    """What the table's first lines say: commit, profile, device, date, scale, backend."""
    from flexgen_lab.checks import compute_device
    from flexgen_lab.runner import device_name

    names = [p.cfg.hardware.name for p in planned if p.cfg is not None]
    # the scale's machine: the most cells' (a tie: the first by name, so file names are stable)
    hardware = max(sorted(set(names)), key=names.count) if names else "-"
    device = "simulated" if scale.backend == "simulated" else device_name(compute_device())
    return {"experiment": exp.name, "title": exp.title, "scale": scale.name,
            "backend": scale.backend, "hardware": hardware, "device": device,
            "git_commit": (git_commit() or "unknown")[:12],
            "command": " ".join(["python -m flexgen_lab reproduce", *args]),
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")}
