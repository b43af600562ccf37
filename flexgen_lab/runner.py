"""One run: config -> checks -> weights and prompts -> generation -> metrics -> one stored row.

Every run ends as exactly one row in the results store, ok or not: a failure is stored with
status error (or oom) and its message, then re-raised; earlier rows are never touched.

    python -m flexgen_lab run model=opt-1.3b workload.prompt_len=512
"""

from __future__ import annotations

import contextlib
import copy
import json
from dataclasses import dataclass

import torch

from flexgen_lab import workload
from flexgen_lab.callbacks import ProgressBar, TraceRecorder, chain
from flexgen_lab.checks import SIMULATED, NotBuiltError, check_paths, prepare
from flexgen_lab.config import ConfigError, RunConfig
from flexgen_lab.engine.engine import Callbacks, Engine, Generation, Sampling
from flexgen_lab.engine.memory import PeakRSS
from flexgen_lab.engine.placement import TIERS
from flexgen_lab.engine.tiers import Tiers
from flexgen_lab.models.spec import ModelSpec
from flexgen_lab.models.weights import open_weights
from flexgen_lab.pipeline.comm import check_world
from flexgen_lab.pipeline.stages import micro_blocks as blocks_in_flight
from flexgen_lab.planner.pipeline import (
    heaviest_stage,
    stage_spec,
)
from flexgen_lab.results.store import ResultStore, StoreError
from flexgen_lab.run_columns import (
    config_columns,
    config_hash,
    device_name,
    engine_columns,
    git_commit,
    io_workers,
    job_for,
    metrics,
    prediction_columns,
    requested_hash,
    run_profile,
    run_prompts,
    to_policy,
)
from flexgen_lab.units import TORCH_DTYPES
from flexgen_lab.validation import model_spec


class RunFailed(RuntimeError):
    """A run raised; its row is stored with the status and message. `run_id` names the row
    (None on a pipeline stage whose failure another stage stored)."""

    def __init__(self, message: str, run_id: int | None, status: str):
        super().__init__(message)
        self.run_id, self.status = run_id, status


@dataclass
class RunResult:
    run_id: int
    row: dict
    generation: Generation | None  # None for a simulated run (no tokens)
    texts: list[str] | None = None  # decoded answers, when the prompts came from a tokenizer


def make_prompts(cfg: RunConfig, spec: ModelSpec, num_prompts: int):
    """(ids, mask, tokenizer): the tokenizer is None for synthetic prompts. A question longer
    than prompt_len, or a corpus not fetched, is a ConfigError (raised before any row)."""
    w = cfg.workload
    if w.prompts == "synthetic" and w.prompt_text is None:
        return (*workload.synthetic_prompts(spec, num_prompts, w.prompt_len, cfg.seed,
                                            w.varied_lengths), None)
    try:
        tokenizer = workload.load_tokenizer(cfg.model.path)
    except (OSError, ValueError) as err:  # no tokenizer files: nothing ran yet
        raise ConfigError(f"model.path={cfg.model.path!r}: its tokenizer cannot be loaded "
                          f"({err}); allowed: a model with a tokenizer, or "
                          "workload.prompts=synthetic") from None
    if w.prompt_text is not None:
        made = workload.question_prompts(tokenizer, spec, num_prompts, w.prompt_len,
                                         w.prompt_text, w.chat_template)
    elif w.prompts == "corpus":
        from flexgen_lab.corpus import corpus_path, load_documents

        docs = load_documents(corpus_path(None, key="workload.prompts=corpus"))
        made = workload.corpus_prompts(tokenizer, spec, num_prompts, w.prompt_len, cfg.seed, docs)
    else:
        made = workload.text_prompts(tokenizer, spec, num_prompts, w.prompt_len)
    return (*made, tokenizer)


def answers(tokenizer, spec: ModelSpec, output_ids: torch.Tensor) -> list[str]:
    """Each sequence's generated text, up to its first end-of-sequence token."""
    texts = []
    for row in output_ids.tolist():
        if spec.eos_token_id in row:
            row = row[:row.index(spec.eos_token_id)]
        texts.append(tokenizer.decode(row, skip_special_tokens=True))
    return texts


def searched(cfg: RunConfig, spec: ModelSpec, dtype: str, device: torch.device) -> RunConfig:
    """policy=search: a copy of cfg whose policy is the LP's best for this machine's budgets."""
    from flexgen_lab.planner.search import search

    profile = run_profile(cfg, device)
    profile.require_speeds()
    w = cfg.workload
    micro_blocks = 1
    if cfg.distributed.name == "pipeline":  # the heaviest stage's layers on one machine
        d = cfg.distributed
        spec = stage_spec(spec, d.stages, heaviest_stage(spec, d.stages))[0]
        micro_blocks = blocks_in_flight(d.stages, d.micro_blocks)
    found = search(spec, profile, w.prompt_len, w.gen_len, TORCH_DTYPES[dtype].itemsize,
                   to_policy(cfg), cfg.schedule.name, cfg.policy.cpu_delegation,
                   compress=(cfg.policy.compress_weight, cfg.policy.compress_cache),
                   max_block_size=cfg.search.max_block_size,
                   rerank_top=cfg.search.rerank_top, micro_blocks=micro_blocks,
                   compute_on_cpu=device.type == "cpu")
    if found is None:
        raise ConfigError(f"policy=search: no policy fits {spec.name} in hardware="
                          f"{cfg.hardware.name}'s budgets")
    out = copy.deepcopy(cfg)
    p, f = out.policy, found.policy
    p.gpu_batch_size, p.num_gpu_batches, p.cpu_delegation = (
        f.gpu_batch_size, f.num_gpu_batches, f.cpu_delegation)
    p.compress_weight, p.compress_cache = f.compress_weight, f.compress_cache
    for kind in ("weights", "cache", "activations"):
        place = getattr(f, kind)
        getattr(p, kind).gpu, getattr(p, kind).cpu = place.gpu, place.cpu
    return out


def run(cfg: RunConfig, callbacks: Callbacks | None = None) -> RunResult:
    """Run one configuration and store its row; raises ConfigError before any work if invalid."""
    spec, device, dtype, budgets = prepare(cfg)
    check_paths(cfg)
    if cfg.distributed.name == "pipeline" and cfg.backend.name == "measured":
        check_world(cfg.distributed.stages)  # every rank refuses a wrong launch, before work
    asked = config_hash(cfg, dtype, device_name(device))
    if cfg.policy.name == "search":
        cfg = searched(cfg, spec, dtype, device)
    try:
        store = ResultStore(cfg.store.path)
    except StoreError as err:  # a damaged file behind a valid header: nothing ran yet
        raise ConfigError(str(err)) from None
    row = (config_columns(cfg, spec, dtype, device, budgets)
           | prediction_columns(cfg, spec, dtype, device))
    row["config_hash"] = asked  # a searched run is known by what was asked
    tracer = TraceRecorder() if cfg.trace else None
    if cfg.backend.name == "simulated":
        return _simulated(cfg, spec, dtype, store, row, tracer)
    if cfg.distributed.name == "pipeline":
        return _pipeline(cfg, spec, device, dtype, budgets, row, store, tracer, callbacks)
    ids, mask, tokenizer = make_prompts(cfg, spec, run_prompts(cfg))
    try:
        progress = ProgressBar(cfg, spec) if cfg.system.name == "flexgen_lab" else None
        with progress or contextlib.nullcontext():
            gen, measured = _execute(cfg, spec, device, dtype, budgets, ids, mask,
                                     chain(callbacks, tracer, progress))
    except BaseException as err:  # KeyboardInterrupt too: the row says how the run ended
        status = "oom" if type(err).__name__ == "BudgetExceeded" else "error"
        message = f"{type(err).__name__}: {err}"
        run_id = store.record_run({**row, "status": status, "error": message})
        raise RunFailed(message, run_id, status) from err
    row |= {"status": "ok", **metrics(gen, len(ids), cfg.workload.prompt_len,
                                      cfg.workload.gen_len), **measured}
    tokens = [(n, prompt, out) for n, (prompt, out) in
              enumerate(zip(workload.unpadded(ids, mask), gen.output_ids.tolist(), strict=True))]
    run_id = store.record_run(row, tokens=tokens, trace=tracer.rows if tracer else None)
    texts = answers(tokenizer, spec, gen.output_ids) if tokenizer is not None else None
    return RunResult(run_id, row, gen, texts)


def _pipeline(cfg: RunConfig, spec: ModelSpec, device: torch.device, dtype: str,
              budgets: dict[str, int], row: dict, store: ResultStore,
              tracer: TraceRecorder | None, callbacks: Callbacks | None) -> RunResult:
    """distributed=pipeline, measured: this rank's stage (pipeline/run.py). Rank 0 stores the
    run with its stages; the other ranks return without a row (run_id None)."""
    from flexgen_lab.pipeline import run as pipeline

    num_prompts = row["num_prompts"]  # run_prompts: micro_blocks x block when null
    ids, mask, tokenizer = make_prompts(cfg, spec, num_prompts)
    try:
        out = pipeline.run_stages(cfg, spec, device, dtype, budgets, to_policy(cfg), ids, mask,
                                  io_workers(cfg, device), chain(callbacks, tracer), tracer,
                                  row, store)
    except pipeline.StageFailed as err:
        raise RunFailed(str(err), err.run_id, err.status) from err
    if out is None:
        return RunResult(None, row, None)
    row |= {"status": "ok", **metrics(out.generation, num_prompts, cfg.workload.prompt_len,
                                      cfg.workload.gen_len), **out.columns}
    tokens = list(enumerate(zip(workload.unpadded(ids, mask),
                                out.generation.output_ids.tolist(), strict=True)))
    run_id = (store.record_run(row, tokens=[(n, p, o) for n, (p, o) in tokens],
                               trace=out.trace if tracer else None, stages=out.stage_rows)
              if out.claimed else None)
    texts = answers(tokenizer, spec, out.generation.output_ids) if tokenizer else None
    return RunResult(run_id, row, out.generation, texts)


def _simulated(cfg: RunConfig, spec: ModelSpec, dtype: str, store: ResultStore, row: dict,
               tracer: TraceRecorder | None) -> RunResult:
    """backend=simulated: the op stream timed on the profile; peaks from the memory model, and
    a policy whose modelled peak exceeds a tier's capacity is stored as oom, like the engine's
    BudgetExceeded."""
    from flexgen_lab.planner.memory_model import peak_bytes
    from flexgen_lab.sim.simulator import simulate

    if cfg.distributed.name == "pipeline":
        return _simulated_pipeline(cfg, spec, dtype, store, row)
    w, profile = cfg.workload, run_profile(cfg, SIMULATED)
    job = job_for(cfg, spec, dtype, profile)
    peaks = peak_bytes(job, profile.workers())
    row |= {f"peak_{tier}_bytes": int(n) for tier, n in peaks.items()}
    over = [f"{tier} tier: modelled peak {int(n)} bytes > capacity {row[f'{tier}_budget_bytes']}"
            for tier, n in peaks.items() if n > row[f"{tier}_budget_bytes"]]
    if over:
        message = "BudgetExceeded (simulated): " + "; ".join(over)
        run_id = store.record_run({**row, "status": "oom", "error": message})
        raise RunFailed(message, run_id, "oom")
    sim = simulate(job)
    if tracer is not None:
        tracer.device = "simulated"
        for record in sim.trace:
            tracer.on_op(record)
    row |= {"status": "ok", **metrics(sim, job.prompts, w.prompt_len, w.gen_len),
            **{f"bytes_{link}": sim.link_bytes["prefill"][link] + sim.link_bytes["decode"][link]
               for link in sim.link_bytes["prefill"]},
            "link_bytes_json": json.dumps(sim.link_bytes)}
    run_id = store.record_run(row, trace=tracer.rows if tracer else None)
    return RunResult(run_id, row, None)


def _simulated_pipeline(cfg: RunConfig, spec: ModelSpec, dtype: str, store: ResultStore,
                        row: dict) -> RunResult:
    """backend=simulated, distributed=pipeline (sim/pipeline.py): one runs row, a stages row
    per stage; a stage over one machine's capacity makes the run oom."""
    from flexgen_lab.sim import pipeline

    w, d = cfg.workload, cfg.distributed
    job = job_for(cfg, spec, dtype, run_profile(cfg, SIMULATED), run_prompts(cfg))
    sim = pipeline.simulate_pipeline(job, d.stages, d.micro_blocks)
    over = pipeline.over_capacity(sim, {t: row[f"{t}_budget_bytes"] for t in TIERS})
    row |= pipeline.run_columns(sim) | (
        {"status": "oom", "error": "BudgetExceeded (simulated): " + "; ".join(over)} if over
        else {"status": "ok", **metrics(sim, sim.num_prompts, w.prompt_len, w.gen_len)})
    run_id = store.record_run(row, trace=pipeline.trace_rows(sim) if cfg.trace else None,
                              stages=[st.row() for st in sim.stages])
    if over:
        raise RunFailed(row["error"], run_id, "oom")
    return RunResult(run_id, row, None)


def _execute(cfg: RunConfig, spec: ModelSpec, device: torch.device, dtype: str,
             budgets: dict[str, int], ids: torch.Tensor, mask: torch.Tensor,
             callbacks: Callbacks | None):
    """Build weights and the system; generate once; measure memory around it."""
    policy = to_policy(cfg)
    weights = open_weights(spec.name, cfg.model.path, cfg.seed)
    torch_dtype = TORCH_DTYPES[dtype]
    extra: dict = {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode(), PeakRSS() as rss:
        if cfg.system.name == "hf":
            from flexgen_lab.baselines import hf_generate

            model = hf_generate.hf_model(spec, weights, torch_dtype, device)
            gen = hf_generate.generate(model, ids, mask, cfg.workload.gen_len,
                                       policy.gpu_batch_size)
        elif cfg.system.name in OFFLOADING_BASELINES:  # they measure their own memory
            gen, extra = OFFLOADING_BASELINES[cfg.system.name]().run(
                spec, weights, ids, mask, cfg.workload.gen_len, policy.gpu_batch_size, device,
                torch_dtype, budgets, cfg.engine.offload_dir)
        else:
            tiers = Tiers(budgets["gpu"], budgets["cpu"], budgets["disk"], device,
                          policy.pin_memory)
            sampling = Sampling(cfg.workload.temperature, cfg.seed, cfg.workload.stop_token)
            with Engine(spec, weights, policy, cfg.schedule.name, device, torch_dtype,
                        callbacks, tiers, cfg.engine.offload_dir, cfg.engine.disk_io,
                        io_workers(cfg, device), cfg.engine.weight_cache) as engine:
                gen = engine.generate(ids, mask, cfg.workload.gen_len, sampling)
                extra = engine_columns(engine, tiers, gen)
    # a baseline that measures its own memory (RssAnon / RssFile, CUDA) keeps its figures
    extra = {"peak_rss_bytes": rss.peak_bytes,
             "peak_cuda_bytes": torch.cuda.max_memory_allocated(device)
             if device.type == "cuda" else None} | extra
    return gen, extra


def _accelerate():
    from flexgen_lab.baselines import accelerate_offload

    return accelerate_offload


def _deepspeed():
    from flexgen_lab.baselines import deepspeed_zero

    return deepspeed_zero


def _llamacpp():
    from flexgen_lab.baselines import llamacpp

    return llamacpp


# Baselines that load a checkpoint (or GGUF file) themselves: system name -> its module (each
# has run(spec, weights, ids, mask, gen_len, batch, device, dtype, budgets, offload_dir)).
OFFLOADING_BASELINES = {"accelerate": _accelerate, "deepspeed": _deepspeed,
                        "llamacpp": _llamacpp}


# run_columns' names stay importable from here, where callers have always found them
__all__ = ["run", "prepare", "RunResult", "RunFailed", "NotBuiltError", "model_spec",
           "config_columns", "config_hash", "device_name", "engine_columns", "git_commit",
           "io_workers", "job_for", "metrics", "prediction_columns", "requested_hash",
           "run_profile", "run_prompts", "to_policy"]
