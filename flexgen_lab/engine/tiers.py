"""Memory tiers (gpu, cpu, disk): capacities, accounted use, peaks, and BudgetExceeded.

Every byte the engine keeps is reserved on a tier first: weight, cache and activation homes,
staging and double buffers, workspaces and intermediates. Going over a capacity raises
BudgetExceeded naming the tier, the bytes asked and what held the rest, before allocating.
Without a GPU the gpu tier is the compute side's budget in host memory, enforced alike.

    >>> tiers = Tiers(gpu=2 * 2**30, cpu=4 * 2**30, disk=64 * 2**30, device="cpu")
    >>> x = tiers.empty("cpu", (1024, 1024), torch.float16, "weights home")
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch

from flexgen_lab.engine.disk import aligned_empty

TIER_NAMES = ("gpu", "cpu", "disk")


class BudgetExceeded(RuntimeError):
    """An allocation would take a tier past its capacity."""

    def __init__(self, tier: str, asked: int, used: int, capacity: int, what: str):
        super().__init__(f"{tier} tier: {what} asks {asked} bytes with {used} of {capacity} "
                         f"bytes already used ({capacity - used} free)")
        self.tier, self.asked, self.used, self.capacity = tier, asked, used, capacity


@dataclass
class Tier:
    name: str
    capacity: int
    used: int = 0
    peak: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)  # what holds the bytes, for reports
    peak_by_kind: dict[str, int] = field(default_factory=dict)

    def reserve(self, nbytes: int, what: str) -> None:
        if self.used + nbytes > self.capacity:
            raise BudgetExceeded(self.name, nbytes, self.used, self.capacity, what)
        self.used += nbytes
        self.peak = max(self.peak, self.used)
        kind = what.split(":")[0]
        self.by_kind[kind] = self.by_kind.get(kind, 0) + nbytes
        self.peak_by_kind[kind] = max(self.peak_by_kind.get(kind, 0), self.by_kind[kind])

    def release(self, nbytes: int, what: str) -> None:
        self.used -= nbytes
        kind = what.split(":")[0]
        self.by_kind[kind] = self.by_kind.get(kind, 0) - nbytes

    @contextlib.contextmanager
    def hold(self, nbytes: int, what: str):
        """Reserve for the duration of a block (intermediates of one compute step)."""
        self.reserve(nbytes, what)
        try:
            yield
        finally:
            self.release(nbytes, what)


class Tiers:
    """The three tiers of one run, and tensor allocation on the gpu and cpu tiers."""

    def __init__(self, gpu: int, cpu: int, disk: int, device: torch.device | str,
                 pin_memory: bool = True):
        self.device = torch.device(device)
        self.pin = pin_memory and self.device.type == "cuda"
        self.tiers = {name: Tier(name, cap) for name, cap in zip(TIER_NAMES, (gpu, cpu, disk),
                                                                   strict=True)}

    def __getitem__(self, name: str) -> Tier:
        return self.tiers[name]

    def empty(self, tier: str, shape: tuple[int, ...], dtype: torch.dtype,
              what: str) -> torch.Tensor:
        """An accounted tensor on the gpu tier (compute device) or the cpu tier (host)."""
        nbytes = nbytes_of(shape, dtype)
        self.tiers[tier].reserve(nbytes, what)
        if tier == "gpu":
            return torch.empty(shape, dtype=dtype, device=self.device)
        if tier == "cpu":
            if self.pin:
                return torch.empty(shape, dtype=dtype, pin_memory=True)  # page-aligned
            # page-aligned, so O_DIRECT reads and writes go straight in, no bounce copy
            return aligned_empty(nbytes).view(dtype).view(shape)
        raise ValueError(f"tier {tier!r} holds no tensors; disk data lives in DiskFiles")

    def checkpoint(self) -> dict[str, int]:
        """Bytes in use now; `restore` releases everything reserved after this point."""
        return {name: tier.used for name, tier in self.tiers.items()}

    def restore(self, used: dict[str, int]) -> None:
        for name, tier in self.tiers.items():
            tier.used = used[name]
            for kind in ("cache", "activations"):  # what a block reserved is gone with it
                tier.by_kind.pop(kind, None)

    def peaks(self) -> dict[str, int]:
        return {name: tier.peak for name, tier in self.tiers.items()}


def nbytes_of(shape, dtype: torch.dtype) -> int:
    """Bytes of a tensor of this shape and dtype (without making one)."""
    return math.prod(shape) * dtype.itemsize
