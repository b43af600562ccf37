"""Validation of a composed RunConfig: sizes, choices, counts and the model's shapes, each
problem naming the key, the value and what is allowed, raised before any weight is made.

    >>> spec = validate(cfg)   # ModelSpec, or ConfigError listing every problem
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from flexgen_lab.config import (
    BACKENDS,
    COST_MODELS,
    DISK_IO,
    DISTRIBUTED,
    DTYPES,
    MAX_BYTES,
    MAX_GROUP_SIZE,
    MAX_PROMPTS,
    MAX_SEED,
    POLICY_KINDS,
    PROMPT_SOURCES,
    SCHEDULES,
    SYSTEMS,
    TOKENIZED,
    WEIGHT_CACHE,
    ConfigError,
    HardwareConfig,
    PlacementConfig,
    PolicyConfig,
    RunConfig,
)
from flexgen_lab.fetch import ARTIFACTS, missing_hint
from flexgen_lab.models.gguf import is_gguf, spec_from_gguf
from flexgen_lab.models.spec import PRESETS, ModelSpec

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
    if is_gguf(cfg.model.path):
        return _gguf_spec(cfg)
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


def _gguf_spec(cfg: RunConfig) -> ModelSpec:
    """A .gguf file's shapes (its metadata); a fetched preset's missing file says what to run."""
    name = cfg.model.name if cfg.model.name != "local" else None
    if name in ARTIFACTS and not Path(cfg.model.path).is_file():
        raise ConfigError(f"model={name}: model.path={cfg.model.path!r} does not exist; "
                          f"{missing_hint(name)}")
    try:
        return spec_from_gguf(cfg.model.path, name)
    except ValueError as err:
        raise ConfigError(str(err)) from None


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
           + _check_distributed(cfg)
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


def _check_distributed(cfg: RunConfig) -> list[str]:
    d = cfg.distributed
    out = (_positive("distributed.stages", d.stages)
           + _positive_or_null("distributed.micro_blocks", d.micro_blocks))
    if not (isinstance(d.timeout_s, int | float) and math.isfinite(d.timeout_s)
            and d.timeout_s > 0):
        out.append(f"distributed.timeout_s={d.timeout_s!r}: must be a number of seconds > 0")
    if d.name == "pipeline" and cfg.schedule.name != "zigzag":
        out.append(f"schedule={cfg.schedule.name} with distributed=pipeline: a micro-block "
                   "passes a stage one token at a time, layer by layer over all its GPU "
                   "batches (the original's order); allowed: schedule=zigzag")
    if d.name == "none" and d.stages != 1:
        out.append(f"distributed.stages={d.stages!r} with distributed=none: one process is one "
                   "stage; allowed: distributed.stages=1, or distributed=pipeline")
    return out


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
    stages = cfg.distributed.stages
    if isinstance(stages, int) and stages > spec.num_layers:
        out.append(f"distributed.stages={stages}: at most one stage per decoder layer "
                   f"({spec.name} has {spec.num_layers})")
    if isinstance(w.prompt_len, int) and isinstance(w.gen_len, int):
        if w.prompt_len + w.gen_len > spec.max_positions:
            out.append(f"workload.prompt_len + workload.gen_len = {w.prompt_len + w.gen_len}: "
                       f"must be at most {spec.name}'s max positions {spec.max_positions}")
    block = p.gpu_batch_size * p.num_gpu_batches
    if w.num_prompts is not None and p.name == "manual" and block > 0 and w.num_prompts % block:
        out.append(f"workload.num_prompts={w.num_prompts}: must be a multiple of the block "
                   f"gpu_batch_size x num_gpu_batches = {block}")
    elif (cfg.distributed.name == "pipeline" and w.num_prompts is not None and block > 0
          and p.name == "manual" and isinstance(cfg.distributed.micro_blocks, int | None)):
        group = (cfg.distributed.micro_blocks or cfg.distributed.stages) * block
        if isinstance(group, int) and w.num_prompts % group:
            out.append(f"workload.num_prompts={w.num_prompts}: under distributed=pipeline a "
                       f"multiple of micro_blocks x block = {group} (null: exactly that)")
    if (w.prompts in TOKENIZED or w.prompt_text is not None) and not cfg.model.path:
        what = (f"workload.prompts={w.prompts!r}" if w.prompt_text is None
                else "workload.prompt_text")
        out.append(f"{what} needs a tokenizer, and model={cfg.model.name} has none; allowed: "
                   "model=smollm2-135m-instruct, or model.path=DIR or FILE.gguf")
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
