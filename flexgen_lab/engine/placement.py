"""Policy -> exact placement: fractions become unit counts per tier, split inside tensors.

A weight tensor splits along dim 0 by units (rows, or quantisation groups of rows when
compressed): the first units go to the gpu tier, the next to the cpu tier, the rest to disk,
so each tier gets its share within one unit. The original FlexGen placed whole tensors by a
midpoint rule (facts §8: "20 % on GPU" put about 8 % there). KV cache and activations split a
block's sequences the same way. Every split reports asked and achieved bytes.

    >>> split_units(100, Placement(gpu=0.2, cpu=0.5))
    UnitSplit(gpu=20, cpu=50, disk=30)
"""

from __future__ import annotations

from dataclasses import dataclass

from flexgen_lab.engine.policy import Placement

TIERS = ("gpu", "cpu", "disk")


@dataclass(frozen=True)
class UnitSplit:
    """How many consecutive units (rows, groups, sequences) each tier holds, in tier order."""

    gpu: int
    cpu: int
    disk: int

    @property
    def total(self) -> int:
        return self.gpu + self.cpu + self.disk

    def ranges(self) -> dict[str, tuple[int, int]]:
        """Tier -> [start, stop) of its units; tiers with none are left out."""
        out, start = {}, 0
        for tier in TIERS:
            count = getattr(self, tier)
            if count:
                out[tier] = (start, start + count)
            start += count
        return out


def split_units(units: int, share: Placement) -> UnitSplit:
    """Nearest unit counts to the shares; boundaries rounded once, so the error is < 1 unit."""
    first = round(share.gpu * units)
    second = max(first, min(units, round((share.gpu + share.cpu) * units)))
    return UnitSplit(gpu=first, cpu=second - first, disk=units - second)


def batch_ranges(block_split: UnitSplit, batch: int, batch_size: int) -> dict[str, tuple]:
    """Tier -> [start, stop) of a GPU batch's own sequences (local indices) under a block split.

    The block's sequences are split (so gbs = 1 with several batches still honours the shares)
    and dealt to the batches round-robin in tier order: every batch gets its tiers' sequences
    contiguous, and a tier's count differs by at most one between batches, so per-batch buffers
    are sized by ceil(share x gbs), not by a whole block's share.
    """
    num_batches = block_split.total // batch_size
    labels = [tier for tier, (a, b) in block_split.ranges().items() for _ in range(a, b)]
    mine = labels[batch::num_batches]
    out, start = {}, 0
    for tier in TIERS:
        count = mine.count(tier)
        if count:
            out[tier] = (start, start + count)
        start += count
    return out
