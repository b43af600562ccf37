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

# Disk rows cross the cpu stage in pieces of at most this many bytes (whole rows): the stage is
# budgeted memory, and one stage per weight slot sized for a whole array would be sized by the
# embedding (opt-1.3b float32 at 80 % on disk: 330 MB a stage, where a layer needs 54 MB)
STAGE_MAX = 64 << 20


def stage_rows(row_bytes: int) -> int:
    """Rows per staged piece: as many as fit STAGE_MAX, at least one."""
    return max(1, STAGE_MAX // row_bytes)


def stage_bytes(disk_bytes: int, row_bytes: int) -> int:
    """cpu-tier bytes that stage an array's `disk_bytes` of disk rows: its largest piece, plus
    a block of slack to match the file offset's alignment (0 when nothing is on disk)."""
    if disk_bytes <= 0:
        return 0
    return min(disk_bytes, stage_rows(row_bytes) * row_bytes) + ALIGN


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

        stage is a cpu-tier buffer of at least stage_bytes(): disk rows go disk -> cpu ->
        gpu, as they would over PCIe, a piece at a time.
        """
        for tier, (start, stop) in self.rows.items():
            target = dst[start:stop]
            if tier == "gpu":
                target.copy_(self.parts["gpu"])  # device-local: no link crossed
            elif tier == "cpu":
                links.copy(target, self.parts["cpu"], "cpu_to_gpu", token)
            else:
                self._load_disk_rows(target, stage, links, token)

    def stage_bytes(self) -> int:
        """cpu-tier bytes `load` needs in `stage` for this array's disk rows."""
        return stage_bytes(self.tier_bytes().get("disk", 0), self.row_bytes)

    def _load_disk_rows(self, target: torch.Tensor, stage: torch.Tensor, links: Links,
                        token: int) -> None:
        """disk -> cpu stage -> target, a piece of at most STAGE_MAX bytes at a time."""
        step = stage_rows(self.row_bytes)
        for first in range(0, target.shape[0], step):
            piece = target[first:first + step]
            offset = self.disk_offset + first * self.row_bytes
            # start the buffer at the file offset's place within a 4 KiB block, so an
            # O_DIRECT read lands straight in it (stage is page-aligned, ALIGN bytes longer)
            shift = offset % ALIGN
            buf = stage[shift:shift + piece.nbytes].view(piece.dtype).view(piece.shape)
            links.read(self.disk, offset, buf, token)
            links.copy(piece, buf, "cpu_to_gpu", token)

