"""Activations between layers at home: each GPU batch's sequences split across the tiers.

After a layer computes batch k, its output (b, t, h) goes home (store_hidden): gpu rows stay
where they are, cpu rows are copied to host memory, disk rows go through a cpu bounce buffer
to a scratch file. Before the next layer computes batch k, load_hidden assembles them again.
With everything on the gpu tier both are no-ops and the tensor just waits on the device.
"""

from __future__ import annotations

import torch

from flexgen_lab.engine.placement import batch_ranges, split_units
from flexgen_lab.engine.policy import Placement
from flexgen_lab.engine.tiers import Tiers
from flexgen_lab.engine.transfer import Links


class ActivationHomes:
    """Homes of every GPU batch's hidden state; rows of at most max_tokens x hidden each."""

    def __init__(self, spec, share: Placement, batch_size: int, num_batches: int,
                 max_tokens: int, tiers: Tiers, dtype: torch.dtype, disk_dir, tag: str = ""):
        """tag: prefixes scratch file names (a pipeline stage holds several blocks at once)."""
        self.tag = tag
        self.batch_size, self.dtype, self.tiers, self.hidden = batch_size, dtype, tiers, spec.hidden
        self.row_elems = max_tokens * spec.hidden  # one sequence's activations, prefill size
        split = split_units(batch_size * num_batches, share)
        self.ranges = [batch_ranges(split, k, batch_size) for k in range(num_batches)]
        self.resident = all(list(r) == ["gpu"] for r in self.ranges)
        self.live: list[torch.Tensor | None] = [None] * num_batches  # outputs kept on the gpu
        self.cpu: dict[int, torch.Tensor] = {}
        self.disk: dict[int, object] = {}
        for k, ranges in enumerate(self.ranges):
            self._allocate(k, ranges, disk_dir)
        self._slots: dict[str, torch.Tensor] = {}
        if not self.resident:  # made now, so the accounting holds them from the start
            for name, tier in (("load 0", "gpu"), ("load 1", "gpu")):
                self._slot(name, tier)
            if self.disk:
                for name in ("store bounce", "load bounce 0", "load bounce 1"):
                    self._slot(name, "cpu")

    def _allocate(self, k: int, ranges: dict, disk_dir) -> None:
        for tier, (a, b) in ranges.items():
            elems = (b - a) * self.row_elems
            what = f"activations: batch {k} {tier}"
            if tier == "gpu":  # the live output tensor's rows: accounted, not copied
                self.tiers["gpu"].reserve(elems * self.dtype.itemsize, what)
            elif tier == "cpu":
                self.cpu[k] = self.tiers.empty("cpu", (elems,), self.dtype, what)
            else:
                self.tiers["disk"].reserve(elems * self.dtype.itemsize, what)
                self.disk[k] = disk_dir.file(f"{self.tag}activations_batch{k}",
                                             elems * self.dtype.itemsize)

    def home_bytes(self) -> dict[str, int]:
        """Bytes at home per tier, sized for prefill (the largest activations)."""
        total: dict[str, int] = {}
        for ranges in self.ranges:
            for tier, (a, b) in ranges.items():
                n = (b - a) * self.row_elems * self.dtype.itemsize
                total[tier] = total.get(tier, 0) + n
        return total

    def store(self, k: int, x: torch.Tensor, links: Links, token: int) -> None:
        """x (b, t, h) on the compute side -> batch k's home."""
        for tier, (a, b) in self.ranges[k].items():
            rows = x[a:b]
            if tier == "gpu":
                self.live[k] = x
            elif tier == "cpu":
                links.copy(self.cpu[k][:rows.numel()].view(rows.shape), rows, "gpu_to_cpu", token)
            else:
                bounce = self._slot("store bounce", "cpu")[:rows.numel()]
                bounce = bounce.view(rows.shape)
                links.copy(bounce, rows, "gpu_to_cpu", token)
                links.write(self.disk[k], 0, bounce, token)

    def load(self, k: int, tokens: int, links: Links, token: int, slot: int) -> torch.Tensor:
        """Batch k's hidden (b, tokens, h) on the compute side."""
        if self.resident:
            return self.live[k]
        shape = (self.batch_size, tokens, self.hidden)
        numel = self.batch_size * tokens * self.hidden
        out = self._slot(f"load {slot}", "gpu")[:numel].view(shape)
        for tier, (a, b) in self.ranges[k].items():
            rows = out[a:b]
            if tier == "gpu":
                rows.copy_(self.live[k][a:b])  # device-local: no link crossed
            elif tier == "cpu":
                links.copy(rows, self.cpu[k][:rows.numel()].view(rows.shape), "cpu_to_gpu", token)
            else:
                bounce = self._slot(f"load bounce {slot}", "cpu")
                bounce = bounce[:rows.numel()].view(rows.shape)
                links.read(self.disk[k], 0, bounce, token)
                links.copy(rows, bounce, "cpu_to_gpu", token)
        return out

    def _slot(self, name: str, tier: str) -> torch.Tensor:
        """A reusable flat buffer sized for the largest use (prefill rows of a full batch)."""
        if name not in self._slots:
            elems = self.batch_size * self.row_elems
            self._slots[name] = self.tiers.empty(tier, (elems,), self.dtype,
                                                 f"activations: {name}")
        return self._slots[name]
