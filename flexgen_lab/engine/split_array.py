"""A weight array split along dim 0 across gpu, cpu and disk: rows [0, g) on the gpu tier,
[g, g+c) on the cpu tier, the rest read from the weight cache on disk.

Loading assembles the rows on the compute side; every byte that crosses a link goes through
`Links` and is counted there.
"""

from __future__ import annotations

import torch

from flexgen_lab.engine.disk import ALIGN
from flexgen_lab.engine.tiers import Tiers, nbytes_of
from flexgen_lab.engine.transfer import Links


class SplitArray:
    """One array split along dim 0 across the tiers. `rows`: tier -> [start, stop)."""

    def __init__(self, tiers: Tiers, shape: tuple[int, ...], dtype: torch.dtype,
                 rows: dict[str, tuple[int, int]], what: str, disk=None, disk_offset: int = 0):
        self.tiers, self.shape, self.dtype, self.rows, self.what = tiers, shape, dtype, rows, what
        self.row_bytes = nbytes_of(shape[1:], dtype)
        self.parts: dict[str, torch.Tensor] = {}
        for tier in ("gpu", "cpu"):
            if tier in rows:
                start, stop = rows[tier]
                self.parts[tier] = tiers.empty(tier, (stop - start, *shape[1:]), dtype, what)
        self.disk, self.disk_offset = disk, disk_offset  # disk rows start at disk_offset
        if "disk" in rows:
            start, stop = rows["disk"]
            tiers["disk"].reserve((stop - start) * self.row_bytes, what)

    @property
    def only_gpu(self) -> torch.Tensor | None:
        """The whole array when it lives entirely on the gpu tier (no copy needed)."""
        return self.parts["gpu"] if list(self.rows) == ["gpu"] else None

    def tier_bytes(self) -> dict[str, int]:
        return {t: (b - a) * self.row_bytes for t, (a, b) in self.rows.items()}

    def fill(self, full: torch.Tensor) -> None:
        """Setup: place a whole CPU tensor's rows at home (not generation traffic)."""
        for tier, part in self.parts.items():
            start, stop = self.rows[tier]
            part.copy_(full[start:stop])
        # disk rows are already in the read-only weight cache, written once for every run

    def load(self, dst: torch.Tensor, stage: torch.Tensor | None, links: Links,
             token: int) -> None:
        """Assemble every row in dst, a compute-side tensor of the full shape.

        stage is a cpu-tier buffer at least as big as the disk rows: disk rows go
        disk -> cpu -> gpu, as they would over PCIe.
        """
        for tier, (start, stop) in self.rows.items():
            target = dst[start:stop]
            if tier == "gpu":
                target.copy_(self.parts["gpu"])  # device-local: no link crossed
            elif tier == "cpu":
                links.copy(target, self.parts["cpu"], "cpu_to_gpu", token)
            else:
                # start the buffer at the file offset's place within a 4 KiB block, so an
                # O_DIRECT read lands straight in it (stage is page-aligned, ALIGN bytes longer)
                shift = self.disk_offset % ALIGN
                buf = stage[shift:shift + target.nbytes].view(target.dtype).view(target.shape)
                links.read(self.disk, self.disk_offset, buf, token)
                links.copy(target, buf, "cpu_to_gpu", token)

