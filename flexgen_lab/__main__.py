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
    python -m flexgen_lab fetch smollm2-135m-instruct corpus   # the real model and text
    python -m flexgen_lab eval model=smollm2-135m-instruct compress=both   # accuracy on text

Hydra reads conf/ at the repository's top level (found from this file, so any working
directory works for source and editable installs); `--config-dir DIR` adds another directory
of presets, `--config-path DIR` replaces conf/.

Exit codes: 0 done; 2 a configuration error (Hydra's while composing or ours while
validating: one message naming the key, the value and what is allowed; nothing ran, no row
was stored); 1 a run that failed after starting (exactly one row, status error or oom).
"""

from __future__ import annotations

import os
import sys

from flexgen_lab.commands import (
    cache_command,
    calibrate_command,
    experiment_command,
    fail,
    table_command,
)
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
from flexgen_lab.fetch import fetch_command

COMMANDS = ("run", "table", "search", "reproduce", "plot", "calibrate", "cache", "fetch",
            "eval")
NOT_BUILT: dict[str, str] = {}


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


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _job_failed(message: str, code: int) -> None:
    """Exit with `code`; inside a --multirun sweep, let the other jobs run first."""
    if _in_multirun():
        raise JobFailed(message, code)
    fail(message, code)


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
        where = ("stored by another stage" if err.run_id is None
                 else f"stored as run_id {err.run_id}")
        _job_failed(f"run failed ({err.status}, {where}): {err}", 1)
    if result.run_id is None:  # a pipeline stage other than rank 0: rank 0 stored the run
        print(f"stage {_rank()} of {result.row['num_stages']} "
              "done; rank 0 stored the run")
        return result.row
    print(_summary(result, run_cfg.store.path))
    if result.texts:  # prompts from a tokenizer: show what the model said (the first answer)
        print(f"answer: {result.texts[0]}")
    return result.row


def _rank() -> int:
    import os

    return int(os.environ.get("RANK", "0"))


def _threads() -> int:
    """torch's intra-op threads: every system of one machine runs with the same number."""
    import torch

    return torch.get_num_threads()


def _summary(result, store_path: str) -> str:
    r = result.row
    where = (f"simulated on hardware={r['hardware']}" if r["backend"] == "simulated"
             else f"on {r['device']}")
    return (f"{r['model']} {r['system']} {where} ({r['dtype']}), "
            f"{r['num_prompts']} prompts x {r['prompt_len']}+{r['gen_len']} tokens: "
            f"generation {r['generation_throughput']:.2f} token/s, "
            f"prefill {r['prefill_throughput']:.1f} token/s ({r['prefill_s']:.3f} s), "
            f"decode {r['decode_throughput'] or 0:.2f} token/s ({r['decode_s']:.3f} s) "
            f"[{r['backend']}]"
            + (f" ({_threads()} torch threads)" if r["backend"] == "measured" else "") + "\n"
            f"stored as run_id {result.run_id} in {store_path}")


def _search_task(cfg) -> None:
    """Hydra's task for `search`: the LP's best policy for the configured model and machine."""
    from flexgen_lab.checks import compute_device, resolve_dtype
    from flexgen_lab.config import ConfigError
    from flexgen_lab.planner.search import search
    from flexgen_lab.runner import TORCH_DTYPES, run_profile, to_policy
    from flexgen_lab.validation import validate

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
    from flexgen_lab.planner.job import Job
    from flexgen_lab.sim.simulator import simulate

    sim = simulate(Job(spec, found.policy, found.schedule, profile, w.prompt_len, w.gen_len,
                       dtype.itemsize))
    print(_search_summary(found, spec.name, profile.name, sim.generation_throughput))


def _eval_task(cfg) -> None:
    """Hydra's task for `eval`: perplexity and last-word accuracy of one variant (eval_run.py)."""
    from flexgen_lab.config import ConfigError
    from flexgen_lab.eval_run import run_eval, summary
    from flexgen_lab.runner import RunFailed

    try:
        run_cfg = to_run_config(cfg)
        result = run_eval(run_cfg)
    except ConfigError as err:
        _job_failed(str(err), 2)
    except RunFailed as err:
        _job_failed(f"eval failed ({err.status}, stored as run_id {err.run_id}): {err}", 1)
    print(summary(result, run_cfg.store.path))


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


def _rank_run_dir(parsed) -> list[str]:
    """Under torchrun, one Hydra output directory per launch with a folder per rank (its
    config and log), unless the command names hydra.run.dir itself."""
    if "RANK" not in os.environ or parsed.multirun or any(
            o.startswith("hydra.run.dir=") for o in parsed.overrides):
        return []
    launch = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    if launch == "none":  # a named rendezvous without an id: the endpoint names the launch
        launch = f"{os.environ.get('MASTER_ADDR', 'local')}-{os.environ.get('MASTER_PORT', 0)}"
    return [f"hydra.run.dir=results/hydra/pipeline/{launch}/rank{os.environ['RANK']}"]


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
        fail(str(err), 2)
    saved = sys.argv, os.environ.get("HYDRA_FULL_ERROR")
    sys.argv = [f"{sys.argv[0]} {command}", *args, *_rank_run_dir(parsed)]
    os.environ["HYDRA_FULL_ERROR"] = "1"  # else Hydra prints its errors itself and exits 1
    try:
        if not (parsed.help or parsed.hydra_help or parsed.cfg or parsed.info
                or parsed.shell_completion):
            _validate_jobs(command, parsed.overrides, source, parsed.multirun)
        ensure_user_config_dir()
        run_command({"search": _search_task, "eval": _eval_task}.get(command, _run_task))
    except JobFailed as err:
        fail(str(err), err.code)
    except ConfigError as err:
        fail(str(err), 2)
    except (HydraException, OmegaConfBaseException) as err:
        fail(describe_hydra_error(err, parsed.overrides), 2)
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
        fail(f"{' '.join(modes)}: allowed: one of --run, --multirun, --cfg, --info, "
              "--shell-completion", 2)
    if parsed.resolve and parsed.cfg is None and not parsed.help:
        fail("--resolve: allowed only with --cfg or --help", 2)


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
    if command in ("run", "eval"):
        from flexgen_lab.checks import check_paths, prepare  # imports torch: seconds

        spec = prepare(cfg)[0]
        check_paths(cfg)
        if command == "eval":
            from flexgen_lab.eval_run import check_eval

            check_eval(cfg, spec)
    else:
        from flexgen_lab.hardware.profile import HardwareProfile
        from flexgen_lab.validation import validate

        validate(cfg)
        HardwareProfile.from_config(cfg.hardware).require_speeds()


def main(argv: list[str] | None = None) -> None:
    """The console script: argv defaults to sys.argv[1:]; exits 2 on bad input, 1 when a
    run failed after starting (see the module's docstring)."""
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(_usage())
        sys.exit(0 if args else 2)
    command = args[0]
    if command not in COMMANDS:
        fail(f"unknown command {command!r}; allowed: {', '.join(COMMANDS)}", 2)
    if command in NOT_BUILT:
        fail(f"'{command}' is not built yet ({NOT_BUILT[command]})", 2)
    small = {"table": table_command, "calibrate": calibrate_command, "cache": cache_command,
             "fetch": fetch_command}
    if command in small:
        small[command](args[1:])
    elif command in ("reproduce", "plot"):
        experiment_command(command, args[1:])
    else:
        hydra_command(command, args[1:])


if __name__ == "__main__":
    main()
