"""Run configuration: one dataclass per Hydra config group, registered in Hydra's ConfigStore.

Hydra composes YAML presets (conf/<group>/*.yaml) over these schemas, so a typo or a wrong type
fails at compose time; `validate` then checks values and names the key, the value and what is
allowed, before any weight is made. Library code receives plain dataclasses: only
`register_configs` touches Hydra.

    python -m flexgen_lab run model=opt-1.3b policy.gpu_batch_size=8 workload.prompt_len=512
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flexgen_lab.models.spec import PRESETS, ModelSpec
from flexgen_lab.units import TORCH_DTYPES

SCHEDULES = ("row_by_row", "zigzag")  # engine/schedule.py implements each (a test checks)
DTYPES = (*TORCH_DTYPES, "auto")
BACKENDS = ("measured", "simulated")
SYSTEMS = ("flexgen_lab", "hf", "accelerate", "deepspeed")
DISK_IO = ("direct", "buffered")
PROMPT_SOURCES = ("synthetic", "text")
POLICY_KINDS = ("manual", "search")
DISTRIBUTED = ("none", "pipeline")
COST_MODELS = ("flexgen_lab", "flexgen-original")  # planner/cost_model.py implements each
WEIGHT_CACHE = ("rebuild", "verify")  # engine/weight_cache.py implements each (a test checks)
# Sizes no machine could hold are configuration errors, not runs that fail: more prompts (or
# a bigger block) than this, a memory size over MAX_BYTES, a seed outside torch's range.
MAX_PROMPTS = 2**31
MAX_BYTES = 2**62  # 4 EiB; the store keeps bytes as 64-bit integers
MAX_SEED = 2**63 - 1
MAX_GROUP_SIZE = 2**16


class ConfigError(ValueError):
    """A bad configuration value: the message names the key, the value and what is allowed."""


def user_config_dir() -> Path:
    """Where `calibrate` writes profiles (hardware/<name>.yaml), on Hydra's search path."""
    default = Path(os.environ.get("HOME", tempfile.gettempdir())) / ".config" / "flexgen_lab"
    return Path(os.environ.get("FLEXGEN_LAB_CONFIG_DIR", default))


@dataclass
class ModelConfig:
    name: str = "opt-125m"  # a preset from models/spec.py, or "local" with path
    path: str | None = None  # a local Hugging Face directory (config.json + *.safetensors)


@dataclass
class PlacementConfig:
    gpu: float = 1.0
    cpu: float = 0.0  # disk = 1 - gpu - cpu


@dataclass
class PolicyConfig:
    name: str = "manual"  # manual | search
    gpu_batch_size: int = 4
    num_gpu_batches: int = 1
    weights: PlacementConfig = field(default_factory=PlacementConfig)
    cache: PlacementConfig = field(default_factory=PlacementConfig)
    activations: PlacementConfig = field(default_factory=PlacementConfig)
    overlap: bool = True
    cpu_delegation: bool | None = False  # null: left to the search
    attn_sparsity: float = 1.0
    attn_renormalize: bool = False
    compress_weight: bool | None = False  # set by the compress group; null = search decides
    compress_cache: bool | None = False
    compress_bits: int = 4
    compress_group_size: int = 64
    pin_memory: bool = True


@dataclass
class HardwareConfig:
    """Capacities (budgets a measured run enforces) and speeds (what predictions use).

    Speeds are numbers (bytes/s, FLOP/s) or strings with units ("12.89GiB/s", "21.24TFLOP/s");
    null means unknown (predictions then refuse to run). `source` says where they come from.
    """

    name: str = "local"
    gpu_mem: Any = "4GiB"  # bytes (int), a string with a unit ("16GiB", "15GB"), or "local"
    cpu_mem: Any = "8GiB"
    disk_mem: Any = "32GiB"
    source: str = ""
    bw_cpu_to_gpu: Any = None
    bw_gpu_to_cpu_cache: Any = None  # the original fitted cache and activations apart
    bw_gpu_to_cpu_hidden: Any = None
    bw_disk_to_cpu: Any = None
    bw_cpu_to_disk_cache_prefill: Any = None
    bw_cpu_to_disk_hidden_prefill: Any = None
    bw_cpu_to_disk_decode: Any = None
    mm_flops_prefill: Any = None  # GPU matmul
    mm_flops_decode: Any = None
    bmm_flops_prefill: Any = None  # GPU batched matmul (attention)
    bmm_flops_decode: Any = None
    gpu_mem_bw: Any = None  # device memory bandwidth: decode reads every weight each step
    dequant_rate: Any = None  # bytes/s of dequantised output (4-bit groups -> compute dtype)
    step_overhead_s: float = 0.0  # fixed seconds per compute step (launches, bookkeeping)
    cpu_flops: Any = None  # CPU attention, times the original's batch/hidden correction:
    cpu_correction: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])  # c1 c2 c3
    safety_factor: float = 0.8  # share of each capacity a searched policy may plan to use
    io_workers: Any = None  # I/O workers (loads and stores in flight); null: the device's default


@dataclass
class ScheduleConfig:
    name: str = "zigzag"  # row_by_row | zigzag


@dataclass
class WorkloadConfig:
    prompt_len: int = 128
    gen_len: int = 32
    num_prompts: int | None = None  # null: one block (gpu_batch_size x num_gpu_batches)
    prompts: str = "synthetic"  # synthetic (seeded random ids) | text (needs model.path)
    varied_lengths: bool = False  # left-padded prompts of different lengths
    temperature: float = 0.0  # 0 = greedy
    stop_token: int | None = None


@dataclass
class StoreConfig:
    path: str = "results/flexgen_lab.sqlite"


@dataclass
class BackendConfig:
    name: str = "measured"


@dataclass
class SystemConfig:
    name: str = "flexgen_lab"


@dataclass
class DistributedConfig:
    name: str = "none"
    world_size: int = 1


@dataclass
class EngineConfig:
    offload_dir: str = "results/offload"
    disk_io: str = "direct"
    io_workers: Any = None  # overrides hardware.io_workers; null: the profile's, else the device's
    weight_cache: str = "rebuild"  # a damaged weight cache: rebuild it (warn) | verify (fail)


@dataclass
class CostModelConfig:
    variant: str = "flexgen_lab"  # flexgen_lab | flexgen-original (the original's formulas)


@dataclass
class SearchConfig:
    """Bounds on what policy=search may choose (and the `search` command)."""

    max_block_size: int | None = None  # gpu_batch_size x num_gpu_batches at most (latency)
    rerank_top: int = 5  # the cost model's best answers the simulator re-ranks (0: none)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    system: SystemConfig = field(default_factory=SystemConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    cost_model: CostModelConfig = field(default_factory=CostModelConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    dtype: str = "auto"
    seed: int = 0
    trace: bool = False


def register_configs() -> None:
    """Register the schema with Hydra (called by the CLI only)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="run_schema", node=RunConfig)


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_bytes(value: Any, key: str) -> int:
    """An int (bytes) or a string with a unit ("16GiB" = 16 * 2^30, "15GB" = 15 * 10^9)."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}={value!r}: expected bytes (int) or a size like '16GiB'")
    nbytes = None
    if isinstance(value, int | float) and math.isfinite(value) and value > 0:
        nbytes = int(value)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(value))
    if match and match.group(2).upper() in _UNITS and float(match.group(1)) > 0:
        nbytes = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    if nbytes is None:
        raise ConfigError(f"{key}={value!r}: expected a positive size in bytes or with a unit "
                          f"({', '.join(u for u in _UNITS if u)}), e.g. '16GiB'")
    if not 0 < nbytes <= MAX_BYTES:
        raise ConfigError(f"{key}={value!r}: {nbytes} bytes; allowed: 1 byte to 2^62 bytes "
                          "(4 EiB), more than any machine holds")
    return nbytes


def parse_budgets(hardware: HardwareConfig, offload_dir: str = "results/offload"
                  ) -> dict[str, int]:
    """Tier -> capacity in bytes, from hardware.gpu_mem, cpu_mem and disk_mem (the word
    `local`: this machine's, hardware/local.py; disk on offload_dir's filesystem); one
    ConfigError naming every bad one."""
    budgets, problems = {}, []
    for tier in ("gpu", "cpu", "disk"):
        value = getattr(hardware, f"{tier}_mem")
        try:
            if value == "local":
                from flexgen_lab.hardware.local import capacity

                budgets[tier] = capacity(tier, offload_dir)
                continue
            budgets[tier] = parse_bytes(value, f"hardware.{tier}_mem")
        except ConfigError as err:
            problems.append(str(err))
        except OSError as err:  # this machine's capacity could not be read
            problems.append(f"hardware.{tier}_mem='local': {err}")
    if problems:
        raise ConfigError("; ".join(problems))
    return budgets


def _choice(key: str, value: Any, allowed: tuple) -> list[str]:
    return [] if value in allowed else [f"{key}={value!r}: allowed values are {list(allowed)}"]


def _positive_or_null(key: str, value: Any) -> list[str]:
    return [] if value is None else _positive(key, value)


def _positive(key: str, value: Any) -> list[str]:
    if isinstance(value, int) and value > 0:
        return []
    return [f"{key}={value!r}: must be an integer > 0"]


def model_spec(cfg: RunConfig) -> ModelSpec:
    """The model's shapes, from a preset or a local config.json (no weights are read)."""
    if cfg.model.path:
        try:
            return ModelSpec.from_hf_config(cfg.model.path)
        except (ValueError, KeyError, OSError) as err:
            reason = str(err).removeprefix(f"model.path={str(cfg.model.path)!r} ")
            raise ConfigError(f"model.path={cfg.model.path!r}: {reason}; allowed: a Hugging "
                              "Face directory with config.json and *.safetensors") from None
    if cfg.model.name not in PRESETS:
        raise ConfigError(f"model.name={cfg.model.name!r}: allowed values are {sorted(PRESETS)}, "
                          "or model=local model.path=DIR")
    return ModelSpec.from_name(cfg.model.name)


def validate(cfg: RunConfig) -> ModelSpec:
    """Check every value; raise one ConfigError listing all problems. Returns the model spec."""
    problems = _check_choices(cfg) + _check_sizes(cfg) + _check_policy(cfg.policy)
    try:
        parse_budgets(cfg.hardware, cfg.engine.offload_dir)
    except ConfigError as err:
        problems.append(str(err))
    spec = None
    try:
        spec = model_spec(cfg)
    except ConfigError as err:
        problems.append(str(err))
    if spec is not None:
        problems += _check_workload(cfg, spec)
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))
    return spec


def _check_choices(cfg: RunConfig) -> list[str]:
    return (_choice("dtype", cfg.dtype, DTYPES)
            + _choice("backend.name", cfg.backend.name, BACKENDS)
            + _choice("system.name", cfg.system.name, SYSTEMS)
            + _choice("schedule.name", cfg.schedule.name, SCHEDULES)
            + _choice("engine.disk_io", cfg.engine.disk_io, DISK_IO)
            + _choice("engine.weight_cache", cfg.engine.weight_cache, WEIGHT_CACHE)
            + _choice("workload.prompts", cfg.workload.prompts, PROMPT_SOURCES)
            + _choice("policy.name", cfg.policy.name, POLICY_KINDS)
            + _choice("distributed.name", cfg.distributed.name, DISTRIBUTED)
            + _choice("cost_model.variant", cfg.cost_model.variant, COST_MODELS))


def _check_sizes(cfg: RunConfig) -> list[str]:
    w, p = cfg.workload, cfg.policy
    out = (_positive("workload.prompt_len", w.prompt_len) + _positive("workload.gen_len", w.gen_len)
           + _positive("policy.gpu_batch_size", p.gpu_batch_size)
           + _positive("policy.num_gpu_batches", p.num_gpu_batches)
           + _positive("distributed.world_size", cfg.distributed.world_size)
           + _positive_or_null("engine.io_workers", cfg.engine.io_workers)
           + _positive_or_null("hardware.io_workers", cfg.hardware.io_workers))
    if w.num_prompts is not None:
        out += _positive("workload.num_prompts", w.num_prompts)
    if cfg.search.max_block_size is not None:
        out += _positive("search.max_block_size", cfg.search.max_block_size)
    if not isinstance(cfg.search.rerank_top, int) or cfg.search.rerank_top < 0:
        out.append(f"search.rerank_top={cfg.search.rerank_top!r}: an integer >= 0 "
                   "(0: no re-ranking by the simulator)")
    if not (math.isfinite(w.temperature) and w.temperature >= 0):
        out.append(f"workload.temperature={w.temperature!r}: must be a finite number >= 0 "
                   "(0 = greedy)")
    if not 0 <= cfg.seed <= MAX_SEED:
        out.append(f"seed={cfg.seed!r}: must be an integer in [0, 2^63 - 1]")
    if not cfg.engine.offload_dir.strip():
        out.append(f"engine.offload_dir={cfg.engine.offload_dir!r}: must name a directory "
                   "(the disk tier's files go there), e.g. results/offload")
    return out + _check_counts(cfg)


def _check_counts(cfg: RunConfig) -> list[str]:
    """Counts no machine could hold: more than 2^31 prompts in a run or in a block."""
    w, p, out = cfg.workload, cfg.policy, []
    if isinstance(w.num_prompts, int) and w.num_prompts > MAX_PROMPTS:
        out.append(f"workload.num_prompts={w.num_prompts}: at most 2^31 prompts")
    if isinstance(p.gpu_batch_size, int) and isinstance(p.num_gpu_batches, int) and (
            p.gpu_batch_size * p.num_gpu_batches > MAX_PROMPTS):
        out.append(f"policy.gpu_batch_size x policy.num_gpu_batches = {p.gpu_batch_size} x "
                   f"{p.num_gpu_batches}: a block of at most 2^31 prompts")
    if (cfg.search.max_block_size or 0) > MAX_PROMPTS:
        out.append(f"search.max_block_size={cfg.search.max_block_size}: at most 2^31")
    if p.compress_group_size > MAX_GROUP_SIZE:
        out.append(f"policy.compress_group_size={p.compress_group_size}: at most 2^16")
    return out


def _check_policy(p: PolicyConfig) -> list[str]:
    out = []
    for name in ("weights", "cache", "activations"):
        out += _check_placement(f"policy.{name}", getattr(p, name))
    if not 0.0 < p.attn_sparsity <= 1.0:
        out.append(f"policy.attn_sparsity={p.attn_sparsity!r}: must be in (0, 1] (1 = dense)")
    out += _choice("policy.compress_bits", p.compress_bits, (4, 8))
    if not (isinstance(p.compress_group_size, int) and p.compress_group_size > 0
            and p.compress_group_size % 2 == 0):
        out.append(f"policy.compress_group_size={p.compress_group_size!r}: must be a positive "
                   "even integer")
    if p.name == "manual":
        for key in ("cpu_delegation", "compress_weight", "compress_cache"):
            if getattr(p, key) is None:
                out.append(f"policy.{key}=null: only policy=search may leave it open; "
                           "allowed: true or false (compress=none|weight|cache|both)")
    return out


def _check_placement(key: str, part: PlacementConfig) -> list[str]:
    out = [f"{key}.{tier}={value!r}: must be a fraction in [0, 1]"
           for tier, value in (("gpu", part.gpu), ("cpu", part.cpu)) if not 0.0 <= value <= 1.0]
    if not out and part.gpu + part.cpu > 1.0 + 1e-9:
        out.append(f"{key}.gpu + {key}.cpu = {part.gpu + part.cpu:g}: must be at most 1 "
                   "(disk takes the rest)")
    return out


def _check_workload(cfg: RunConfig, spec: ModelSpec) -> list[str]:
    w, p = cfg.workload, cfg.policy
    out = []
    if isinstance(w.prompt_len, int) and isinstance(w.gen_len, int):
        if w.prompt_len + w.gen_len > spec.max_positions:
            out.append(f"workload.prompt_len + workload.gen_len = {w.prompt_len + w.gen_len}: "
                       f"must be at most {spec.name}'s max positions {spec.max_positions}")
    block = p.gpu_batch_size * p.num_gpu_batches
    if w.num_prompts is not None and p.name == "manual" and block > 0 and w.num_prompts % block:
        out.append(f"workload.num_prompts={w.num_prompts}: must be a multiple of the block "
                   f"gpu_batch_size x num_gpu_batches = {block}")
    if w.prompts == "text" and not cfg.model.path:
        out.append("workload.prompts='text' needs a tokenizer: use model=local model.path=DIR")
    if w.stop_token is not None and not 0 <= w.stop_token < spec.vocab:
        out.append(f"workload.stop_token={w.stop_token}: must be a token id in [0, {spec.vocab})")
    return out + _check_prompt_bytes(cfg)


def _check_prompt_bytes(cfg: RunConfig) -> list[str]:
    """The prompts' token ids alone (int64) must fit in the cpu tier."""
    w, p = cfg.workload, cfg.policy
    count = w.num_prompts or (p.gpu_batch_size * p.num_gpu_batches if p.name == "manual" else 0)
    try:
        cpu = parse_budgets(cfg.hardware, cfg.engine.offload_dir)["cpu"]  # `local` resolved
    except ConfigError:
        return []  # reported with the budgets
    need = count * w.prompt_len * 8
    if need <= cpu:
        return []
    key = ("workload.num_prompts" if w.num_prompts
           else "policy.gpu_batch_size x policy.num_gpu_batches")
    return [f"{key} = {count} prompts of {w.prompt_len} tokens: their ids alone take {need} "
            f"bytes, more than hardware.cpu_mem ({cpu} bytes); allowed: fewer or shorter "
            "prompts, or a larger hardware.cpu_mem"]
