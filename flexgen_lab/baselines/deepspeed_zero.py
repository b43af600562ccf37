"""Baseline `system=deepspeed`: DeepSpeed ZeRO-Inference (ZeRO stage 3 parameter offload).

UNVERIFIED: this path has not run yet; no CUDA GPU was available where it was written. It
counts as verified once a row from a CUDA machine is quoted in a closing note (README,
"Baselines"). Until then conf/policy/deepspeed-* in our engine remain the labelled stand-in.

ZeRO-Inference is DeepSpeed's own API for models bigger than the GPU: with a
`HfDeepSpeedConfig` alive while transformers builds the model, `from_pretrained` partitions
each parameter as it loads (zero.Init) and `deepspeed.initialize` keeps them on the offload
device, `cpu` (pinned host memory) or `nvme` (files in a directory, read with async I/O);
each layer's parameters are gathered onto the GPU when it runs and released after, as the
FlexGen paper's DeepSpeed baseline ran (its benchmark hf_ds). Parameters live on the cpu tier
when the whole model fits the cpu budget and on the disk tier (nvme) otherwise: ZeRO offloads
all of them or none, so w_cpu or w_disk is 1. The nvme folder is an owner-named scratch
directory in engine.offload_dir, removed when the run ends (engine/owners.py).

Refused before any work where CUDA is absent (checks.check_deepspeed: exit 2, names CUDA);
needs the extra: pip install 'flexgen_lab[deepspeed]'.

    python -m flexgen_lab run system=deepspeed model=opt-6.7b hardware=local
"""

from __future__ import annotations

import json
import os
import socket
from contextlib import contextmanager

import torch

from flexgen_lab.baselines import hf_generate
from flexgen_lab.baselines.accelerate_offload import TIERS, meta_model, scratch_dir
from flexgen_lab.baselines.export import checkpoint_dir


def versions() -> str:
    import deepspeed
    import transformers

    return f"deepspeed {deepspeed.__version__}; transformers {transformers.__version__}"


def ds_config(dtype: torch.dtype, hidden: int, batch_size: int, offload: str,
              nvme_path: str | None) -> dict:
    """ZeRO stage 3 with every parameter offloaded (threshold 0: none stays on the GPU)."""
    param = {"device": offload, "pin_memory": True}
    if offload == "nvme":
        param |= {"nvme_path": nvme_path, "buffer_count": 5, "buffer_size": 2 * hidden * hidden
                  * 4 * 2}  # two of the largest (4h x h) matrices per buffer, with margin
    return {
        "fp16": {"enabled": dtype == torch.float16},
        "bf16": {"enabled": dtype == torch.bfloat16},
        "zero_optimization": {"stage": 3, "stage3_prefetch_bucket_size": hidden * hidden,
                              "stage3_param_persistence_threshold": 0, "offload_param": param},
        "train_batch_size": batch_size,  # required by the config; nothing trains
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def _single_process_env() -> None:
    """torch.distributed's rendezvous for one process, as a launcher would set it."""
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("RANK", "0"), ("LOCAL_RANK", "0"),
                       ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)


@contextmanager
def loaded(spec, weights, dtype: torch.dtype, budgets: dict[str, int], offload_dir: str,
           batch_size: int):
    """The model partitioned onto its offload device (ZeRO stage 3), alive for the block:
    yields (model, the tier holding the parameters, their bytes). Loading is the slow part
    (every parameter partitioned and pinned), so a benchmark generates several times in it."""
    import deepspeed
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    path = checkpoint_dir(weights, spec, dtype, offload_dir)
    total = sum(p.numel() * p.element_size() for p in meta_model(path, dtype).parameters())
    offload = "cpu" if total <= budgets["cpu"] else "nvme"
    _single_process_env()
    deepspeed.init_distributed()
    with scratch_dir(offload_dir) as nvme:
        config = ds_config(dtype, spec.hidden, batch_size, offload, str(nvme))
        keep = HfDeepSpeedConfig(config)  # noqa: F841 (must be alive while the model loads)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        engine = deepspeed.initialize(model=model, config_params=config)[0]
        engine.module.eval()
        try:
            yield engine.module, "cpu" if offload == "cpu" else "disk", total
        finally:
            del engine, model


def run(spec, weights, ids, mask, gen_len: int, batch_size: int, device: torch.device,
        dtype: torch.dtype, budgets: dict[str, int], offload_dir: str):
    """Load partitioned onto the offload device, generate, report (Generation, columns)."""
    from flexgen_lab.baselines.rss import PeakRssSplit

    torch.cuda.reset_peak_memory_stats(device)
    with PeakRssSplit() as rss, loaded(spec, weights, dtype, budgets, offload_dir,
                                       batch_size) as (model, tier, total):
        gen = hf_generate.generate(model, ids, mask, gen_len, batch_size, device)
    report = {"weights": {t: {"asked": None, "achieved": total if t == tier else 0}
                          for t in TIERS}}
    return gen, {
        "placement_json": json.dumps(report),
        **{f"w_{t}": float(t == tier) for t in TIERS},
        "peak_rss_bytes": rss.peak_bytes, "peak_rss_anon_bytes": rss.peak_anon_bytes,
        "peak_rss_file_bytes": rss.peak_file_bytes,
        "peak_cuda_bytes": torch.cuda.max_memory_allocated(device),
        "system_version": versions(),
    }
