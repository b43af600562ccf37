"""What a run's row says besides its outcome: the engine's Policy from the config, the
config hash, the flat config columns, the cost model's prediction, the paper's metrics and
the engine's bytes and peaks. runner.py fills a row with these; reproduce, fit and the
benchmarks read the same definitions.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
from pathlib import Path

import torch

from flexgen_lab import __version__
from flexgen_lab.checks import prepare
from flexgen_lab.config import RunConfig
from flexgen_lab.engine.engine import Engine, Generation
from flexgen_lab.engine.policy import Placement, Policy
from flexgen_lab.engine.tiers import Tiers
from flexgen_lab.engine.transfer import DEFAULT_IO_WORKERS, IO_THREADS
from flexgen_lab.hardware.profile import HardwareProfile
from flexgen_lab.models.spec import ModelSpec
from flexgen_lab.planner.cost_model import predict
from flexgen_lab.planner.job import Job
from flexgen_lab.planner.original_cost_model import flexgen_original
from flexgen_lab.planner.pipeline import (
    pipeline_prompts,
    predict_pipeline,
)
from flexgen_lab.units import TORCH_DTYPES


def to_policy(cfg: RunConfig) -> Policy:
    """The engine's Policy from a validated manual policy config."""
    p = cfg.policy
    return Policy(
        gpu_batch_size=p.gpu_batch_size, num_gpu_batches=p.num_gpu_batches,
        weights=Placement(p.weights.gpu, p.weights.cpu), cache=Placement(p.cache.gpu, p.cache.cpu),
        activations=Placement(p.activations.gpu, p.activations.cpu), overlap=p.overlap,
        cpu_delegation=bool(p.cpu_delegation), attn_sparsity=p.attn_sparsity,
        attn_renormalize=p.attn_renormalize, compress_weight=bool(p.compress_weight),
        compress_cache=bool(p.compress_cache), compress_bits=p.compress_bits,
        compress_group_size=p.compress_group_size, pin_memory=p.pin_memory,
    )


# Keys that cannot change a run's result: where results and scratch files go, a profile's
# description, and what to do with a damaged weight cache (rebuilt or refused, a run never
# reads one). config_hash leaves them out, so changing them re-runs nothing.
HASH_EXCLUDED = ("store", "engine.offload_dir", "engine.weight_cache", "hardware.source")


def config_hash(cfg: RunConfig, dtype: str, device: str) -> str:
    """sha256 of the resolved config (HASH_EXCLUDED left out), the resolved dtype, the device
    it runs on (device_name: "cpu", "cuda:0 <name>" or "simulated") and the package's
    major.minor version: a version with new keys hashes differently, so it re-runs cells."""
    data = dataclasses.asdict(cfg)
    for key in HASH_EXCLUDED:
        *parents, last = key.split(".")
        node = data
        for parent in parents:
            node = node[parent]
        node.pop(last)
    data["dtype"], data["device"] = dtype, device
    major_minor = ".".join(__version__.split(".")[:2])
    text = json.dumps({"config": data, "version": major_minor}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def requested_hash(cfg: RunConfig) -> str:
    """The hash `run` stores for cfg (what was asked, before any search): resume's key."""
    _, device, dtype, _ = prepare(cfg)
    return config_hash(cfg, dtype, device_name(device))


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def device_name(device: torch.device) -> str:
    if device.type == "meta":
        return "simulated"
    if device.type == "cuda":
        return f"cuda:{torch.cuda.current_device()} {torch.cuda.get_device_name(device)}"
    return "cpu"


def config_columns(cfg: RunConfig, spec: ModelSpec, dtype: str, device: torch.device,
                   budgets: dict[str, int]) -> dict:
    """The store's flat config columns (the whole config also goes in config_json)."""
    p = to_policy(cfg)
    return p.store_columns() | dict(
        config_hash=config_hash(cfg, dtype, device_name(device)),
        config_json=json.dumps(dataclasses.asdict(cfg)),
        system=cfg.system.name, backend=cfg.backend.name, device=device_name(device),
        hardware=cfg.hardware.name, dtype=dtype, seed=cfg.seed, model=spec.name,
        schedule=cfg.schedule.name, prompt_len=cfg.workload.prompt_len,
        gen_len=cfg.workload.gen_len, num_prompts=run_prompts(cfg),
        num_stages=cfg.distributed.stages,
        gpu_budget_bytes=budgets["gpu"], cpu_budget_bytes=budgets["cpu"],
        disk_budget_bytes=budgets["disk"], version=__version__, git_commit=git_commit(),
    )


def run_prompts(cfg: RunConfig) -> int:
    """workload.num_prompts, else one block (micro_blocks blocks under the pipeline)."""
    d = cfg.distributed
    return pipeline_prompts(to_policy(cfg), d.stages, d.micro_blocks, cfg.workload.num_prompts)


def io_workers(cfg: RunConfig, device: torch.device) -> int:
    """The run's I/O workers: engine.io_workers, else the profile's, else the device's."""
    for value in (cfg.engine.io_workers, cfg.hardware.io_workers):
        if value is not None:
            return value
    return DEFAULT_IO_WORKERS.get(device.type, IO_THREADS)


def run_profile(cfg: RunConfig, device: torch.device) -> HardwareProfile:
    """The hardware profile predictions for this run use: its I/O workers are the run's."""
    profile = HardwareProfile.from_config(cfg.hardware, cfg.engine.offload_dir)
    return profile.replace(io_workers=io_workers(cfg, device))


def job_for(cfg: RunConfig, spec: ModelSpec, dtype: str, profile: HardwareProfile,
            num_prompts: int | None = None, device: torch.device | None = None) -> Job:
    """What the cost model, simulator and memory model are asked about for this run (on
    `device`; None or a simulated run: the profile's GPU)."""
    w = cfg.workload
    return Job(spec, to_policy(cfg), cfg.schedule.name, profile, w.prompt_len, w.gen_len,
               TORCH_DTYPES[dtype].itemsize, num_prompts or w.num_prompts,
               compute_on_cpu=device is not None and device.type == "cpu")


def prediction_columns(cfg: RunConfig, spec: ModelSpec, dtype: str,
                       device: torch.device) -> dict:
    """The cost model's prediction for this run, when the hardware profile has speeds."""
    profile = run_profile(cfg, device)
    if profile.missing_speeds():
        return {}
    job = job_for(cfg, spec, dtype, profile, device=device)
    if cfg.cost_model.variant == "flexgen-original":  # one block, as the original modelled
        pred = flexgen_original(job)
    elif cfg.distributed.name == "pipeline":
        pred = predict_pipeline(job.replace(num_prompts=run_prompts(cfg)),
                                cfg.distributed.stages, cfg.distributed.micro_blocks)
    else:
        pred = predict(job)
    return {"predicted_generation_throughput": pred.generation_throughput,
            "predicted_prefill_s": pred.prefill_s, "predicted_decode_s": pred.decode_s}


def metrics(gen: Generation, num_prompts: int, prompt_len: int, gen_len: int) -> dict:
    """The paper's definitions (facts §2), over every decode step."""
    latency = gen.prefill_s + gen.decode_s
    return dict(
        prefill_s=gen.prefill_s, decode_s=gen.decode_s, latency_s=latency,
        prefill_throughput=num_prompts * prompt_len / gen.prefill_s,
        decode_throughput=num_prompts * (gen_len - 1) / gen.decode_s if gen_len > 1 else None,
        generation_throughput=num_prompts * gen_len / latency,
    )


def engine_columns(engine: Engine, tiers: Tiers, gen: Generation) -> dict:
    """Bytes per link (both phases), accounted peaks per tier, placement asked vs achieved."""
    links = {link: gen.link_bytes["prefill"][link] + gen.link_bytes["decode"][link]
             for link in gen.link_bytes["prefill"]}
    peaks = tiers.peaks()
    return {**{f"bytes_{link}": n for link, n in links.items()},
            **{f"peak_{tier}_bytes": n for tier, n in peaks.items()},
            "placement_json": json.dumps(engine.placement_report()),
            "link_bytes_json": json.dumps(gen.link_bytes)}
