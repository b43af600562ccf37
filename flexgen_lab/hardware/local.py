"""`hardware=local`: this machine's capacities, read when a run starts.

A tier whose capacity is the word `local` gets: on CUDA, the device's memory for the gpu tier;
on the CPU, 40 % of MemAvailable at start for the gpu tier (there it is host memory too) and
40 % for the cpu tier (80 % on CUDA), the rest left to the process; divided by the joblib
launcher's n_jobs when several runs share the machine; and 80 % of the free space of the
offload directory's filesystem for the disk tier. The config hash keeps the word, the row the
bytes (runner.config_columns).
"""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

LOCAL = "local"
HOST_SHARE = 0.4  # of MemAvailable per host-memory tier on the CPU
DISK_SHARE = 0.8  # of the offload filesystem's free space


@functools.cache
def mem_available() -> int:
    """MemAvailable at the first call (the process's start, for a run): bytes."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise OSError("/proc/meminfo has no MemAvailable line")


def parallel_jobs() -> int:
    """Jobs Hydra's launcher runs at once (joblib's n_jobs), 1 outside a parallel sweep."""
    try:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            return 1
        n_jobs = HydraConfig.get().launcher.get("n_jobs") or 1
    except (ImportError, ValueError, AttributeError):
        return 1
    return max(1, int(n_jobs))


def capacity(tier: str, offload_dir: str) -> int:
    """Bytes for `tier` on this machine (the module's rule)."""
    import torch

    cuda = torch.cuda.is_available()
    if tier == "disk":
        return int(DISK_SHARE * shutil.disk_usage(existing_parent(offload_dir)).free)
    if tier == "gpu" and cuda:
        return torch.cuda.get_device_properties(0).total_memory
    share = 2 * HOST_SHARE if (tier == "cpu" and cuda) else HOST_SHARE
    return int(share * mem_available() / parallel_jobs())


def existing_parent(path: str) -> Path:
    """`path`, or its nearest existing parent (a directory not made yet is on that one's
    filesystem)."""
    p = Path(path or ".").resolve()
    while not p.exists():
        p = p.parent
    return p
