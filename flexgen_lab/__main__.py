"""Command line: python -m flexgen_lab COMMAND [Hydra overrides]

    python -m flexgen_lab run                                  # the built-in default run
    python -m flexgen_lab run schedule=zigzag compress=none model=opt-1.3b
    python -m flexgen_lab run --multirun policy.gpu_batch_size=1,2,4
    python -m flexgen_lab run --multirun hydra/launcher=joblib policy.gpu_batch_size=1,2,4
    python -m flexgen_lab run --help                           # config groups and options
    python -m flexgen_lab run --cfg job                        # the composed config
    python -m flexgen_lab table [store.path=FILE] [limit=N]    # recent runs
    python -m flexgen_lab search model=opt-30b hardware=t4-paper workload=paper-512
    python -m flexgen_lab calibrate [name=calibrated] [quick=true]    # writes a profile
    python -m flexgen_lab calibrate fit=true name=calibrated   # refines it from stored runs
    python -m flexgen_lab reproduce experiment=table4 backend=simulated   # a paper table
    python -m flexgen_lab plot experiment=table4 backend=simulated        # its figures
    python -m flexgen_lab cache [engine.offload_dir=DIR]       # weight caches: size, last use
    python -m flexgen_lab cache clear KEY|all                  # remove them

Hydra reads conf/ at the repository's top level (found from this file, so any working
directory works for source and editable installs); `--config-dir DIR` adds another directory
of presets, `--config-path DIR` replaces conf/.

Exit codes: 0 done; 2 a configuration error (Hydra's while composing or ours while
validating: one message naming the key, the value and what is allowed; nothing ran, no row
was stored); 1 a run that failed after starting (exactly one row, status error or oom).
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from flexgen_lab.compose import (  # noqa: F401  (re-exported for scripts and tests)
    CONF_DIR,
    Source,
    compose_run_config,
    describe_hydra_error,
    ensure_user_config_dir,
    load_profile,
    sweep_jobs,
    to_run_config,
)

COMMANDS = ("run", "table", "search", "reproduce", "plot", "calibrate", "cache")
NOT_BUILT: dict[str, str] = {}
PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # a profile name: a file name, no path


class JobFailed(Exception):
    """A --multirun job failed; the sweep goes on and the command exits with `code` at its
    end (picklable: joblib's workers send it back)."""

    def __init__(self, message: str, code: int):
        super().__init__(message, code)

    code = property(lambda self: self.args[1])

    def __str__(self) -> str:
        return self.args[0]


def _usage() -> str:
    return (__doc__ or "").strip() + "\n\ncommands: " + ", ".join(COMMANDS) + "\n"


def _fail(message: str, code: int) -> None:
    print(f"flexgen_lab: {message}", file=sys.stderr)
    sys.exit(code)


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _job_failed(message: str, code: int) -> None:
    """Exit with `code`; inside a --multirun sweep, let the other jobs run first."""
    if _in_multirun():
        raise JobFailed(message, code)
    _fail(message, code)


def _run_task(cfg) -> dict:
    """Hydra's task: convert once, run, print a summary. Config errors exit 2, no traceback."""
    from flexgen_lab.config import ConfigError
    from flexgen_lab.runner import RunFailed, run

    try:
        run_cfg = to_run_config(cfg)
        result = run(run_cfg)
    except ConfigError as err:
        _job_failed(str(err), 2)
    except RunFailed as err:
        _job_failed(f"run failed ({err.status}, stored as run_id {err.run_id}): {err}", 1)
    print(_summary(result, run_cfg.store.path))
    return result.row


def _summary(result, store_path: str) -> str:
    r = result.row
    where = (f"simulated on hardware={r['hardware']}" if r["backend"] == "simulated"
             else f"on {r['device']}")
    return (f"{r['model']} {r['system']} {where} ({r['dtype']}), "
            f"{r['num_prompts']} prompts x {r['prompt_len']}+{r['gen_len']} tokens: "
            f"generation {r['generation_throughput']:.2f} token/s, "
            f"prefill {r['prefill_throughput']:.1f} token/s ({r['prefill_s']:.3f} s), "
            f"decode {r['decode_throughput'] or 0:.2f} token/s ({r['decode_s']:.3f} s) "
            f"[{r['backend']}]\nstored as run_id {result.run_id} in {store_path}")


def _search_task(cfg) -> None:
    """Hydra's task for `search`: the LP's best policy for the configured model and machine."""
    from flexgen_lab.config import ConfigError, validate
    from flexgen_lab.planner.search import search
    from flexgen_lab.runner import (
        TORCH_DTYPES,
        compute_device,
        resolve_dtype,
        run_profile,
        to_policy,
    )

    try:
        run_cfg = to_run_config(cfg)
        spec = validate(run_cfg)
        profile = run_profile(run_cfg, compute_device())  # with the run's I/O workers
        dtype = TORCH_DTYPES[resolve_dtype(run_cfg.dtype, compute_device())]
        w = run_cfg.workload
        p = run_cfg.policy
        found = search(spec, profile, w.prompt_len, w.gen_len, dtype.itemsize,
                       to_policy(run_cfg), run_cfg.schedule.name, p.cpu_delegation,
                       compress=(p.compress_weight, p.compress_cache),
                       max_block_size=run_cfg.search.max_block_size,
                       rerank_top=run_cfg.search.rerank_top)
    except ConfigError as err:
        _job_failed(str(err), 2)
    if found is None:  # nothing ran: the budgets are the configuration's
        _job_failed(f"no policy fits {spec.name} in hardware={profile.name}'s budgets "
                    f"(hardware.gpu_mem={run_cfg.hardware.gpu_mem}, hardware.cpu_mem="
                    f"{run_cfg.hardware.cpu_mem}, hardware.disk_mem={run_cfg.hardware.disk_mem},"
                    f" safety_factor {profile.safety_factor}); allowed: budgets that hold at "
                    "least one sequence, or a smaller model or workload", 2)
    from flexgen_lab.sim.simulator import simulate

    sim = simulate(spec, found.policy, found.schedule, profile, w.prompt_len, w.gen_len,
                   dtype.itemsize)
    print(_search_summary(found, spec.name, profile.name, sim.generation_throughput))


def _search_summary(found, model: str, hardware: str, simulated: float) -> str:
    p, pred = found.policy, found.prediction
    place = lambda x: f"gpu {x.gpu:.3f} cpu {x.cpu:.3f} disk {x.disk:.3f}"  # noqa: E731
    peaks = ", ".join(f"{t} {b / 2**30:.2f} GiB" for t, b in found.peak_bytes.items())
    return (f"{model} on {hardware} [predicted, cost model]: {pred.generation_throughput:.3f} "
            f"token/s (prefill {pred.prefill_s:.1f} s, decode {pred.decode_s:.1f} s); "
            f"[simulated] {simulated:.3f} token/s\n"
            f"  gpu_batch_size {p.gpu_batch_size} x num_gpu_batches {p.num_gpu_batches}, "
            f"schedule {found.schedule}, cpu_delegation {p.cpu_delegation}, compress weight "
            f"{p.compress_weight} cache {p.compress_cache}\n"
            f"  weights {place(p.weights)}\n  cache {place(p.cache)}\n"
            f"  activations {place(p.activations)}\n  peak memory: {peaks}\n"
            f"{_rerank_line(found)}"
            f"  ({found.lps_solved} LPs in {found.seconds:.1f} s)")


def _rerank_line(found) -> str:
    """What re-ranking by the simulator changed, if anything."""
    if found.lp_best is None:
        return ""
    p, predicted, simulated = found.lp_best
    return (f"  re-ranked by the simulator: the cost model's best, gpu_batch_size "
            f"{p.gpu_batch_size} x {p.num_gpu_batches} (predicted {predicted:.3f}, simulated "
            f"{simulated:.3f} token/s), simulates slower than the policy above\n")


def run_command(task=None) -> None:
    import hydra

    from flexgen_lab.config import register_configs

    register_configs()
    hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")(
        task or _run_task)()


def hydra_command(command: str, args: list[str]) -> None:
    """run / search through hydra.main. Every configuration error exits 2 before Hydra makes
    anything: each job (every one of a --multirun) is composed and validated first; what
    Hydra still raises comes to us (not printed by Hydra with exit 1). A run that failed
    after starting exits 1."""
    from hydra._internal.utils import get_args_parser  # hydra.main's own (Hydra < 1.4)
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from flexgen_lab.config import ConfigError

    parser = get_args_parser()
    parser.prog = f"flexgen_lab {command}"
    parsed = parser.parse_args(args)  # an unknown option: argparse says so and exits 2
    _check_modes(parsed)
    source = Source(parsed.config_path, parsed.config_dir, parsed.config_name or "config")
    try:
        source.extra_overrides()  # --config-dir must be a directory
    except ConfigError as err:
        _fail(str(err), 2)
    saved = sys.argv, os.environ.get("HYDRA_FULL_ERROR")
    sys.argv = [f"{sys.argv[0]} {command}", *args]
    os.environ["HYDRA_FULL_ERROR"] = "1"  # else Hydra prints its errors itself and exits 1
    try:
        if not (parsed.help or parsed.hydra_help or parsed.cfg or parsed.info
                or parsed.shell_completion):
            _validate_jobs(command, parsed.overrides, source, parsed.multirun)
        ensure_user_config_dir()
        run_command(_search_task if command == "search" else _run_task)
    except JobFailed as err:
        _fail(str(err), err.code)
    except ConfigError as err:
        _fail(str(err), 2)
    except (HydraException, OmegaConfBaseException) as err:
        _fail(describe_hydra_error(err, parsed.overrides), 2)
    finally:
        sys.argv = saved[0]
        if saved[1] is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = saved[1]


def _check_modes(parsed) -> None:
    """Hydra's own checks of its flags, which it raises as a ValueError with a traceback."""
    modes = [name for name, on in (("--run", parsed.run), ("--multirun", parsed.multirun),
                                   ("--cfg", parsed.cfg is not None),
                                   ("--info", parsed.info is not None),
                                   ("--shell-completion", parsed.shell_completion)) if on]
    if len(modes) > 1:
        _fail(f"{' '.join(modes)}: allowed: one of --run, --multirun, --cfg, --info, "
              "--shell-completion", 2)
    if parsed.resolve and parsed.cfg is None and not parsed.help:
        _fail("--resolve: allowed only with --cfg or --help", 2)


def _validate_jobs(command: str, overrides: list[str], source: Source, multirun: bool) -> None:
    """Compose the job, or every job of a --multirun sweep, then check each one's values;
    the first bad one is a ConfigError naming its overrides (then no job has started)."""
    from flexgen_lab.config import ConfigError

    jobs = sweep_jobs(overrides, source) if multirun else [overrides]
    for check in (lambda job: compose_run_config(job, source),  # Hydra's errors, quickly
                  lambda job: _check_values(command, compose_run_config(job, source))):
        for number, job in enumerate(jobs):
            try:
                check(job)
            except ConfigError as err:
                if not multirun:
                    raise
                raise ConfigError(f"--multirun job {number} of {len(jobs)} "
                                  f"({' '.join(job)}): {err}\n(no job was started)") from None


def _check_values(command: str, cfg) -> None:
    """What `run` checks before it starts (values, files, budgets), or `search` (the model,
    the workload and a profile with speeds)."""
    if command == "run":
        from flexgen_lab.runner import check_paths, prepare  # imports torch: seconds

        prepare(cfg)
        check_paths(cfg)
    else:
        from flexgen_lab.config import validate
        from flexgen_lab.hardware.profile import HardwareProfile

        validate(cfg)
        HardwareProfile.from_config(cfg.hardware).require_speeds()


def table_command(args: list[str]) -> None:
    """Print recent runs: table [store.path=FILE] [limit=N]."""
    from flexgen_lab.config import StoreConfig
    from flexgen_lab.results.tables import format_table, recent_runs

    options = _options("table", args, {"store.path": StoreConfig().path, "limit": "20"})
    if not options["limit"].isdigit() or int(options["limit"]) < 1:
        _fail(f"table: limit={options['limit']!r}; allowed: a positive integer", 2)
    print(format_table(recent_runs(_existing_store("table", options["store.path"]),
                                   int(options["limit"]))))


def _existing_store(command: str, path: str):
    """The results store at `path` for reading; exit 2 when there is none or it is unusable."""
    from flexgen_lab.results.store import ResultStore, StoreError

    if not Path(path).exists():
        _fail(f"{command}: store.path={path!r}: no results store there (run something "
              "first); allowed: an existing results file", 2)
    try:
        return ResultStore(path)
    except StoreError as err:
        _fail(f"{command}: {err}", 2)


def _options(command: str, args: list[str], options: dict[str, str]) -> dict[str, str]:
    """key=value arguments of the small commands (table, calibrate), checked by name."""
    for arg in args:
        key, _, value = arg.partition("=")
        if key not in options or not value:
            allowed = ", ".join(f"{k}=..." for k in options)
            _fail(f"{command}: unknown argument {arg!r}; allowed: {allowed}", 2)
        options[key] = value
    return options


def calibrate_command(args: list[str]) -> None:
    """Measure this machine: calibrate [name=calibrated] [quick=false] [offload_dir=DIR];
    or refine a profile from stored runs: calibrate fit=true name=NAME [store.path=FILE]
    [holdout=0.25] [out=NAME-fitted]."""
    options = _options("calibrate", args, {
        "name": "calibrated", "quick": "false", "offload_dir": "results/offload",
        "fit": "false", "store.path": "results/flexgen_lab.sqlite", "holdout": "0.25",
        "out": ""})
    for key in ("quick", "fit"):
        if options[key] not in ("true", "false"):
            _fail(f"calibrate: {key}={options[key]!r}; allowed: true, false", 2)
    for key in ("name", "out"):
        if options[key] and not PLAIN_NAME.fullmatch(options[key]):
            _fail(f"calibrate: {key}={options[key]!r}; allowed: a profile name (letters, "
                  "digits, '.', '_', '-'; no path)", 2)
    if options["fit"] == "true":
        fit_command(options)
        return
    import torch

    from flexgen_lab.engine.disk import probe
    from flexgen_lab.hardware import calibrate

    try:
        probe(options["offload_dir"], "direct")
    except OSError as err:
        _fail(f"calibrate: offload_dir={options['offload_dir']!r}: {err.strerror or err}; "
              "allowed: a writable directory on a disk", 2)

    quick = options["quick"] == "true"
    dtype = torch.float16 if torch.cuda.is_available() else torch.float32
    speeds = calibrate.measure(quick, options["offload_dir"], dtype)
    capacities = calibrate.default_capacities(options["offload_dir"])
    path = calibrate.write_profile(options["name"], speeds, capacities,
                                   calibrate.measured_source(quick))
    for key, value in speeds.items():
        unit = "FLOP/s" if "flops" in key else "B/s"
        print(f"  {key:32s} {value:12.4g} {unit} (measured)")
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
        _fail(f"calibrate: holdout={options['holdout']!r}; allowed: a fraction in (0, 1)", 2)
    try:
        base = load_profile(name)
        base.require_speeds()
    except (ConfigError, HydraException) as err:
        _fail(f"calibrate fit=true: {err}", 2)
    rows = _existing_store("calibrate fit=true", options["store.path"]).runs(
        "status = 'ok' AND backend = 'measured' AND system = 'flexgen_lab' AND hardware = ?",
        [name])
    observations = [fit.observation_from_row(row) for row in rows.to_dict("records")]
    if len(observations) < 4:
        _fail(f"calibrate fit=true: {len(observations)} ok measured runs with hardware={name} "
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
        "step_overhead_s": fitted.step_overhead_s})
    print(f"wrote {path}; use it with hardware={out}")


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
        _fail(f"cache: {' '.join(words)!r}; allowed: cache [engine.offload_dir=DIR], "
              "cache clear KEY|all [engine.offload_dir=DIR]", 2)
    try:
        removed = weight_cache.clear_caches(where, words[1])
    except ValueError as err:
        _fail(str(err), 2)
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
            from flexgen_lab.reproduce import plot

            plot(args)
    except (ConfigError, StoreError) as err:
        _fail(f"{command}: {err}" if isinstance(err, StoreError) else str(err), 2)
    except KeyboardInterrupt:
        _fail(f"{command} interrupted; the cells done are stored: the same command resumes",
              130)


def main(argv: list[str] | None = None) -> None:
    """The console script: argv defaults to sys.argv[1:]; exits 2 on bad input, 1 when a
    run failed after starting (see the module's docstring)."""
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(_usage())
        sys.exit(0 if args else 2)
    command = args[0]
    if command not in COMMANDS:
        _fail(f"unknown command {command!r}; allowed: {', '.join(COMMANDS)}", 2)
    if command in NOT_BUILT:
        _fail(f"'{command}' is not built yet ({NOT_BUILT[command]})", 2)
    small = {"table": table_command, "calibrate": calibrate_command, "cache": cache_command}
    if command in small:
        small[command](args[1:])
    elif command in ("reproduce", "plot"):
        experiment_command(command, args[1:])
    else:
        hydra_command(command, args[1:])


if __name__ == "__main__":
    main()
