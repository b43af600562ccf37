"""Checks before a run starts: values, built features, weight files, budgets against this
machine, the store's and the offload directory's paths. Whatever fails here is a
configuration error (exit 2, no row); nothing has run yet.

    >>> spec, device, dtype, budgets = prepare(cfg)
"""

from __future__ import annotations

import os
import shutil

import torch

from flexgen_lab.config import ConfigError, RunConfig
from flexgen_lab.engine.disk import filesystem_type, probe
from flexgen_lab.hardware.local import existing_parent
from flexgen_lab.hardware.profile import HardwareProfile
from flexgen_lab.models.gguf import is_gguf, open_reader
from flexgen_lab.models.spec import ModelSpec
from flexgen_lab.models.weights import safetensors_files, safetensors_keys
from flexgen_lab.results.store import StoreError, check_path
from flexgen_lab.validation import parse_budgets, validate

SIMULATED = torch.device("meta")  # backend=simulated computes nothing on any device
SYSTEMS = ("flexgen_lab", "hf", "accelerate", "deepspeed", "llamacpp")


class NotBuiltError(ConfigError):
    """The configuration asks for a feature flexgen_lab does not have yet."""


def compute_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def resolve_dtype(name: str, device: torch.device) -> str:
    """auto = float16 on CUDA (and on SIMULATED: the simulated machine is a GPU profile),
    float32 on the CPU (the row stores the resolved name)."""
    if name != "auto":
        return name
    return "float16" if device.type in ("cuda", SIMULATED.type) else "float32"


def check_built(cfg: RunConfig) -> None:
    """Refuse, by name, every option that is configured but not implemented yet."""
    if cfg.backend.name == "simulated" and cfg.system.name != "flexgen_lab":
        raise ConfigError(f"backend=simulated with system={cfg.system.name}: the simulator "
                          "times flexgen_lab's op stream; allowed: system=flexgen_lab")
    if cfg.system.name == "deepspeed" and cfg.backend.name == "measured":
        check_deepspeed()
    missing = []
    if cfg.system.name not in SYSTEMS:
        missing.append(f"system={cfg.system.name} (that baseline)")
    if missing:
        raise NotBuiltError("not built yet: " + "; ".join(missing) + "; allowed: "
                            f"system={'|'.join(SYSTEMS)}, distributed=none")


def check_deepspeed() -> None:
    """system=deepspeed runs ZeRO-Inference, which needs a CUDA device and the extra."""
    if not torch.cuda.is_available():
        raise ConfigError("system=deepspeed needs CUDA (DeepSpeed ZeRO-Inference runs on a CUDA "
                          "GPU) and this machine has no CUDA device; allowed here: "
                          "system=flexgen_lab|hf|accelerate, or conf/policy/deepspeed-* in our "
                          "engine (the labelled stand-in)")
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        raise ConfigError("system=deepspeed needs the deepspeed package: pip install "
                          "'flexgen_lab[deepspeed]'") from None


def check_llamacpp(spec: ModelSpec, dtype: str, path: str | None) -> None:
    """system=llamacpp runs a GGUF file: the model must have one (a Llama-family model, written
    in a precision GGUF has, unless model.path is one) and the extra must be installed."""
    from flexgen_lab.models.gguf_writer import NoGGUFForm, check_writable
    from flexgen_lab.units import TORCH_DTYPES

    if not is_gguf(path):
        try:
            check_writable(spec, TORCH_DTYPES[dtype])
        except NoGGUFForm as err:
            raise ConfigError(f"system=llamacpp: {err}") from None
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        from flexgen_lab.baselines.llamacpp import INSTALL

        raise ConfigError("system=llamacpp needs the llama-cpp-python package (the "
                          f"[llamacpp] extra, built from source): {INSTALL}") from None


def check_budgets(cfg: RunConfig, device: torch.device) -> dict[str, int]:
    """Tier budgets in bytes; a measured run may not promise more than this machine has."""
    budgets = parse_budgets(cfg.hardware, cfg.engine.offload_dir)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if device.type == "cuda":
        limits = {"gpu": torch.cuda.get_device_properties(device).total_memory, "cpu": ram}
    else:  # without a GPU the gpu tier is a budget inside host memory
        limits = {"gpu": ram, "cpu": ram - budgets["gpu"]}
    limits["disk"] = shutil.disk_usage(existing_parent(cfg.engine.offload_dir)).total
    if limits["disk"] == 0:  # /proc, /sys and the like report no space at all
        raise ConfigError(
            f"engine.offload_dir={cfg.engine.offload_dir!r} is on a "
            f"{filesystem_type(cfg.engine.offload_dir)} pseudo-filesystem, not a disk; "
            "allowed: a directory on a disk (the disk tier's files go there)")
    for tier, limit in limits.items():
        if budgets[tier] > limit:
            raise ConfigError(
                f"hardware.{tier}_mem={getattr(cfg.hardware, tier + '_mem')!r} "
                f"({budgets[tier]} bytes) exceeds this machine's {limit} bytes for the {tier} "
                f"tier (hardware={cfg.hardware.name}); a measured run needs hardware=local or "
                "smaller budgets (backend=simulated accepts any profile)")
    return budgets


def prepare(cfg: RunConfig) -> tuple[ModelSpec, torch.device, str, dict[str, int]]:
    """Every check that can fail before work starts: values, features, weight files' headers,
    budgets (check_paths adds the store's and the offload directory's)."""
    spec = validate(cfg)
    if cfg.model.name == "local" and not cfg.model.path:
        raise ConfigError("model=local needs model.path=DIR (config.json + *.safetensors)")
    check_built(cfg)
    if cfg.model.path:
        check_weight_files(cfg.model.path)
    profile = HardwareProfile.from_config(cfg.hardware)  # its speeds and factors too
    if cfg.backend.name == "simulated":  # any profile, as long as it has speeds
        profile.require_speeds()
        if cfg.distributed.name == "pipeline" and cfg.distributed.stages > 1:
            profile.require_network()  # the stages' machines talk over it
        budgets = parse_budgets(cfg.hardware, cfg.engine.offload_dir)
        return spec, SIMULATED, resolve_dtype(cfg.dtype, SIMULATED), budgets
    device = compute_device()
    dtype = resolve_dtype(cfg.dtype, device)
    if cfg.system.name == "llamacpp":
        check_llamacpp(spec, dtype, cfg.model.path)
    return spec, device, dtype, check_budgets(cfg, device)


def check_weight_files(path: str) -> None:
    """A local model's weight files exist and their headers parse (cheap: no tensor is
    read), so a pickle-only or corrupt directory is a configuration error."""
    try:
        if is_gguf(path):
            open_reader(path)
            return
        for file in safetensors_files(path):
            safetensors_keys(file, path)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def uses_disk(cfg: RunConfig) -> bool:
    """Whether a run may put anything on the disk tier (a searched policy may)."""
    p = cfg.policy
    return (cfg.backend.name == "measured" and cfg.system.name == "flexgen_lab"
            and (p.name == "search" or any(getattr(p, kind).gpu + getattr(p, kind).cpu < 1
                                           for kind in ("weights", "cache", "activations"))))


def check_paths(cfg: RunConfig) -> None:
    """The results store can be written and, for a run that may use the disk tier, the
    offload directory takes an aligned block with engine.disk_io (a probe, removed)."""
    try:
        check_path(cfg.store.path)
    except StoreError as err:
        raise ConfigError(str(err)) from None
    baseline = cfg.backend.name == "measured" and cfg.system.name in (
        "accelerate", "deepspeed", "llamacpp")
    if uses_disk(cfg) or baseline:  # a baseline's export and offload folder: page cache
        try:
            probe(cfg.engine.offload_dir, "buffered" if baseline else cfg.engine.disk_io)
        except OSError as err:
            raise ConfigError(f"engine.offload_dir={cfg.engine.offload_dir!r}: "
                              f"{err.strerror or err}; allowed: a writable directory on a "
                              "disk") from None
