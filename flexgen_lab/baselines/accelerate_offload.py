"""Baseline `system=accelerate`: transformers + Accelerate big-model inference.

Accelerate places whole modules (embeddings, decoder layers, head) on its devices in order,
each up to its `max_memory`, and what does not fit goes to `disk`: mapped from the
checkpoint's safetensors (or written to `offload_folder` when it must convert them) and read
through the page cache when its module runs. Its tiers are ours shifted by one on a machine
without a GPU: Accelerate's `cpu` is the device that computes, so it gets our gpu-tier
budget, and the rest goes to its disk; on CUDA device 0 gets the gpu tier and `cpu` the cpu
tier. So `hardware.gpu_mem` at 20 % of the weights means "80 % off the compute device".

It runs on exactly the engine's weights (models/weights.py; dummy weights exported once by
baselines/export.py), the run's prompts, greedy, timed as the paper times (prefill = the
first token, decode = the rest). Its `offload_folder` is an owner-named scratch directory in
engine.offload_dir (engine/owners.py), removed when the run ends however it ends and swept
by the next run if the process was killed. The row records what Accelerate really did: bytes
per tier from `hf_device_map` x parameter bytes, peak anonymous and file-backed RSS apart,
and the accelerate and transformers versions.

    python -m flexgen_lab run system=accelerate model=opt-1.3b hardware.gpu_mem=1GiB
"""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch

from flexgen_lab.baselines import hf_generate
from flexgen_lab.baselines.export import checkpoint_dir
from flexgen_lab.engine import owners

TIERS = ("gpu", "cpu", "disk")


def versions() -> str:
    import accelerate
    import transformers

    return f"accelerate {accelerate.__version__}; transformers {transformers.__version__}"


def max_memory(budgets: dict[str, int], device: torch.device) -> dict:
    """Accelerate's max_memory from our tier budgets (its disk takes whatever is left)."""
    if device.type == "cuda":
        return {device.index or 0: budgets["gpu"], "cpu": budgets["cpu"]}
    return {"cpu": budgets["gpu"]}


def our_tier(accelerate_device, device: torch.device) -> str:
    """Our tier for one of Accelerate's devices (`cpu` computes where there is no GPU)."""
    if accelerate_device == "disk":
        return "disk"
    if device.type == "cuda":
        return "cpu" if accelerate_device == "cpu" else "gpu"
    return "gpu"


def meta_model(path: Path, dtype: torch.dtype):
    """The checkpoint's model on the meta device: shapes and module names, no memory."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=dtype)


def plan(model, memory: dict, dtype: torch.dtype) -> dict[str, object]:
    """Accelerate's own device map for `model` under `memory` (modules kept whole)."""
    from accelerate import infer_auto_device_map

    return infer_auto_device_map(model, max_memory=memory, dtype=dtype,
                                 no_split_module_classes=model._no_split_modules)


def achieved_bytes(model, device_map: dict, device: torch.device) -> dict[str, int]:
    """Bytes of parameters per our tier, from the device map (a tied weight counted once)."""
    placed = dict.fromkeys(TIERS, 0)
    prefixes = sorted(device_map, key=len, reverse=True)  # the most specific module first
    for name, param in model.named_parameters():
        owner = next(p for p in prefixes if p == "" or name == p or name.startswith(p + "."))
        placed[our_tier(device_map[owner], device)] += param.numel() * param.element_size()
    return placed


@contextmanager
def scratch_dir(offload_dir: str):
    """This run's offload folder, owner-named, removed on exit (swept if the run is killed)."""
    root = Path(offload_dir)
    root.mkdir(parents=True, exist_ok=True)
    owners.sweep(root)
    path = root / owners.temporary_name("run")
    path.mkdir()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def load(path: Path, dtype: torch.dtype, device_map: dict, offload: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=device_map,
                                                 offload_folder=str(offload))
    return model.eval()


def dispatched(model, budgets: dict[str, int], device: torch.device, dtype: torch.dtype,
               offload: Path):
    """A model already built in host memory, placed by Accelerate under the budgets without a
    checkpoint (what a user with the model in memory does; the paper's GPU baseline): on CUDA
    what does not fit device 0 stays in host memory and is copied to the GPU as its module
    runs; on a CPU what does not fit goes to `offload` (Accelerate's disk). Returns (model,
    parameter bytes per our tier)."""
    from accelerate import dispatch_model

    device_map = plan(model, max_memory(budgets, device), dtype)
    placed = achieved_bytes(model, device_map, device)
    return dispatch_model(model, device_map, offload_dir=str(offload)).eval(), placed


def run(spec, weights, ids, mask, gen_len: int, batch_size: int, device: torch.device,
        dtype: torch.dtype, budgets: dict[str, int], offload_dir: str):
    """Load under the budgets, generate, and report (Generation, the row's columns)."""
    from flexgen_lab.baselines.rss import PeakRssSplit

    path = checkpoint_dir(weights, spec, dtype, offload_dir)
    skeleton = meta_model(path, dtype)
    device_map = plan(skeleton, max_memory(budgets, device), dtype)
    placed = achieved_bytes(skeleton, device_map, device)
    asked = {"gpu": budgets["gpu"], "cpu": budgets["cpu"] if device.type == "cuda" else 0}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with scratch_dir(offload_dir) as offload, PeakRssSplit() as rss:
        model = load(path, dtype, device_map, offload)
        gen = hf_generate.generate(model, ids, mask, gen_len, batch_size, device)
        del model
    return gen, columns(placed, asked, rss, device)


def columns(placed: dict[str, int], asked: dict[str, int], rss, device: torch.device) -> dict:
    """The row's columns: "asked" is the budget Accelerate was given per tier (its disk takes
    the rest: None), "achieved" the parameter bytes it put there."""
    total = sum(placed.values())
    report = {"weights": {tier: {"asked": asked.get(tier), "achieved": placed[tier]}
                          for tier in TIERS}}
    return {
        "placement_json": json.dumps(report),
        **{f"w_{tier}": placed[tier] / total for tier in TIERS},
        "peak_rss_bytes": rss.peak_bytes, "peak_rss_anon_bytes": rss.peak_anon_bytes,
        "peak_rss_file_bytes": rss.peak_file_bytes,
        "peak_cuda_bytes": torch.cuda.max_memory_allocated(device)
        if device.type == "cuda" else None,
        "system_version": versions(),
    }
