"""The commands that compose no run configuration: table (recent runs), calibrate (measure
this machine, or fit a profile to stored runs), cache (list and clear weight caches) and
reproduce / plot (experiment files). Each checks its key=value options by name and exits 2
on bad input before any work, like the Hydra commands in __main__.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from flexgen_lab.compose import load_profile

PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # a profile name: a file name, no path


def fail(message: str, code: int) -> None:
    """Print `message` as the command's one line on stderr and exit with `code`."""
    print(f"flexgen_lab: {message}", file=sys.stderr)
    sys.exit(code)




def table_command(args: list[str]) -> None:
    """Print recent runs: table [store.path=FILE] [limit=N]."""
    from flexgen_lab.config import StoreConfig
    from flexgen_lab.results.tables import format_table, recent_runs

    options = _options("table", args, {"store.path": StoreConfig().path, "limit": "20"})
    if not options["limit"].isdigit() or int(options["limit"]) < 1:
        fail(f"table: limit={options['limit']!r}; allowed: a positive integer", 2)
    print(format_table(recent_runs(_existing_store("table", options["store.path"]),
                                   int(options["limit"]))))


def _existing_store(command: str, path: str):
    """The results store at `path` for reading; exit 2 when there is none or it is unusable."""
    from flexgen_lab.results.store import ResultStore, StoreError

    if not Path(path).exists():
        fail(f"{command}: store.path={path!r}: no results store there (run something "
              "first); allowed: an existing results file", 2)
    try:
        return ResultStore(path)
    except StoreError as err:
        fail(f"{command}: {err}", 2)


def _options(command: str, args: list[str], options: dict[str, str]) -> dict[str, str]:
    """key=value arguments of the small commands (table, calibrate), checked by name."""
    for arg in args:
        key, _, value = arg.partition("=")
        if key not in options or not value:
            allowed = ", ".join(f"{k}=..." for k in options)
            fail(f"{command}: unknown argument {arg!r}; allowed: {allowed}", 2)
        options[key] = value
    return options


def calibrate_command(args: list[str]) -> None:
    """Measure this machine: calibrate [name=calibrated] [quick=false] [offload_dir=DIR]
    [model=NAME[,NAME...]] [dtype=auto]; or refine a profile from stored runs: calibrate
    fit=true name=NAME [store.path=FILE] [holdout=0.25] [out=NAME-fitted]."""
    options = _options("calibrate", args, {
        "name": "calibrated", "quick": "false", "offload_dir": "results/offload",
        "fit": "false", "store.path": "results/flexgen_lab.sqlite", "holdout": "0.25",
        "out": "", "model": "", "dtype": "auto"})
    for key in ("quick", "fit"):
        if options[key] not in ("true", "false"):
            fail(f"calibrate: {key}={options[key]!r}; allowed: true, false", 2)
    for key in ("name", "out"):
        if options[key] and not PLAIN_NAME.fullmatch(options[key]):
            fail(f"calibrate: {key}={options[key]!r}; allowed: a profile name (letters, "
                  "digits, '.', '_', '-'; no path)", 2)
    if options["fit"] == "true":
        fit_command(options)
        return
    measure_command(options)


def measure_command(options: dict[str, str]) -> None:
    """calibrate without fit: speeds, copy latencies and operator tables of named models."""
    import torch

    from flexgen_lab.checks import compute_device, resolve_dtype
    from flexgen_lab.engine.disk import probe
    from flexgen_lab.hardware import calibrate
    from flexgen_lab.models.spec import ModelSpec

    try:
        probe(options["offload_dir"], "direct")
    except OSError as err:
        fail(f"calibrate: offload_dir={options['offload_dir']!r}: {err.strerror or err}; "
              "allowed: a writable directory on a disk", 2)
    allowed_dtypes = ("auto", "float32", "bfloat16", "float16")
    if options["dtype"] not in allowed_dtypes:
        fail(f"calibrate: dtype={options['dtype']!r}; allowed: {', '.join(allowed_dtypes)}", 2)
    try:
        specs = [ModelSpec.from_name(m) for m in options["model"].split(",") if m]
    except (KeyError, ValueError) as err:
        fail(f"calibrate: model={options['model']!r}: {err}", 2)
    device = compute_device()
    dtype = getattr(torch, resolve_dtype(options["dtype"], device))
    quick = options["quick"] == "true"
    speeds = calibrate.measure(quick, options["offload_dir"], dtype)
    settings = calibrate.engine_settings(device, dtype, options["offload_dir"])
    tables = calibrate.kept_tables(options["name"])
    for spec in specs:
        key, table = calibrate.model_table(spec, dtype, device, quick)
        tables[key] = table.to_json()
        print(f"  operator table {key} (measured: {', '.join(table.points)})")
    if tables:
        settings["op_tables"] = tables
    path = calibrate.write_profile(options["name"], speeds,
                                   calibrate.default_capacities(options["offload_dir"]),
                                   calibrate.measured_source(quick), settings=settings)
    for key, value in speeds.items():
        unit = "FLOP/s" if "flops" in key else "B/s"
        print(f"  {key:32s} {value:12.4g} {unit} (measured)")
    print(f"  engine overhead per compute step {1e6 * settings['step_overhead_s']:12.1f} us "
          "(measured)")
    print(f"  compute slowed by a copy beside it {settings['overlap_contention']:10.2f} s per s "
          "(measured)")
    for link, seconds in settings["io_latency_s"].items():
        print(f"  latency {link:24s} {1e6 * seconds:12.1f} us per copy (measured)")
    print(f"wrote {path}; use it with hardware={options['name']}")


def fit_command(options: dict[str, str]) -> None:
    """Least squares on the stored runs of hardware=NAME; report on held-out runs; write."""
    import statistics

    from hydra.errors import HydraException

    from flexgen_lab.config import ConfigError
    from flexgen_lab.hardware import calibrate
    from flexgen_lab.hardware.profile import OPTIONAL_SPEEDS, SPEED_FIELDS
    from flexgen_lab.planner import fit

    name, out = options["name"], options["out"] or f"{options['name']}-fitted"
    try:
        holdout = float(options["holdout"])
    except ValueError:
        holdout = -1.0
    if not 0 < holdout < 1:
        fail(f"calibrate: holdout={options['holdout']!r}; allowed: a fraction in (0, 1)", 2)
    try:
        base = load_profile(name)
        base.require_speeds()
    except (ConfigError, HydraException) as err:
        fail(f"calibrate fit=true: {err}", 2)
    rows = _existing_store("calibrate fit=true", options["store.path"]).runs(
        "status = 'ok' AND backend = 'measured' AND system = 'flexgen_lab' AND hardware = ?",
        [name])
    observations = [fit.observation_from_row(row) for row in rows.to_dict("records")]
    if len(observations) < 4:
        fail(f"calibrate fit=true: {len(observations)} ok measured runs with hardware={name} "
              f"in {options['store.path']}; the fit needs at least 4 (some are held out)", 2)
    train, held = fit.split(observations, holdout)
    fitted, report = fit.fit(base, train)
    held_errors = fit.errors(fitted, held)
    print(f"fitted on {len(train)} runs of hardware={name}: step overhead "
          f"{1e3 * report.step_overhead_s:.3f} ms, speed factors "
          + ", ".join(f"{k} x{v:.3g}" for k, v in report.factors.items()))
    print(f"  on those runs:   median |error| {100 * report.median_error:.1f} %")
    for obs, error in zip(held, held_errors, strict=True):
        print(f"  held out run {obs.run_id}: measured {obs.throughput:.3f} token/s, "
              f"predicted {obs.throughput * (1 + error):.3f} ({100 * error:+.1f} %)")
    median = statistics.median(abs(e) for e in held_errors)
    print(f"  on {len(held)} held-out runs: median |error| {100 * median:.1f} %, max "
          f"{100 * max(abs(e) for e in held_errors):.1f} %")
    speeds = {key: getattr(fitted, key) for key in (*SPEED_FIELDS, *OPTIONAL_SPEEDS)
              if getattr(fitted, key)}
    source = (f"fit of hardware={name} on {len(train)} runs in {options['store.path']} "
              f"(held-out median error {100 * median:.1f} % on {len(held)} runs)")
    capacities = {k: getattr(base, k) for k in ("gpu_mem", "cpu_mem", "disk_mem")}
    path = calibrate.write_profile(out, speeds, capacities, source, settings={
        "cpu_correction": list(base.cpu_correction), "safety_factor": base.safety_factor,
        "step_overhead_s": fitted.step_overhead_s, **fitted_extras(fitted)})
    print(f"wrote {path}; use it with hardware={out}")


def fitted_extras(fitted) -> dict:
    """The fitted profile's latencies and (scaled) operator tables, as calibrate writes them."""
    extras = {"io_latency_s": fitted.io_latency_s} if fitted.io_latency_s else {}
    if fitted.op_tables:
        extras["op_tables"] = {k: t.to_json() for k, t in fitted.op_tables.items()}
    return extras


def cache_command(args: list[str]) -> None:
    """Weight caches: `cache [engine.offload_dir=DIR]` lists them (key, size, last use, what
    they hold); `cache clear KEY|all [engine.offload_dir=DIR]` removes them (and leftovers
    of killed builds)."""
    from flexgen_lab.config import EngineConfig
    from flexgen_lab.engine import weight_cache

    words = [a for a in args if "=" not in a]
    options = _options("cache", [a for a in args if "=" in a],
                       {"engine.offload_dir": EngineConfig().offload_dir})
    where = options["engine.offload_dir"]
    if not words:
        print(f"weight caches in {Path(where) / 'weight_cache'}:")
        print(weight_cache.format_caches(weight_cache.list_caches(where)))
        return
    if words[0] != "clear" or len(words) != 2:
        fail(f"cache: {' '.join(words)!r}; allowed: cache [engine.offload_dir=DIR], "
              "cache clear KEY|all [engine.offload_dir=DIR]", 2)
    try:
        removed = weight_cache.clear_caches(where, words[1])
    except ValueError as err:
        fail(str(err), 2)
    freed = sum(e.nbytes for e in removed) / 2**20
    print(f"removed {len(removed)} director{'y' if len(removed) == 1 else 'ies'} "
          f"({freed:.1f} MiB) from {Path(where) / 'weight_cache'}")


def experiment_command(command: str, args: list[str]) -> None:
    """reproduce / plot experiment=NAME [...]: a bad option exits 2 before any cell runs."""
    from flexgen_lab.config import ConfigError
    from flexgen_lab.results.store import StoreError

    try:
        if command == "reproduce":
            from flexgen_lab.reproduce import reproduce

            reproduce(args)
        else:
            from flexgen_lab.plot_command import plot

            plot(args)
    except (ConfigError, StoreError) as err:
        fail(f"{command}: {err}" if isinstance(err, StoreError) else str(err), 2)
    except KeyboardInterrupt:
        fail(f"{command} interrupted; the cells done are stored: the same command resumes",
              130)
