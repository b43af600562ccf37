"""Policy: how a run places and schedules its tensors. Every share is a fraction in [0, 1].

The planner produces one, a preset or the command line sets one, and the engine executes it.
Disk shares are derived (1 - gpu - cpu), never set, so a placement cannot fail to sum to 1.

    >>> Policy(gpu_batch_size=8, num_gpu_batches=3, weights=Placement(gpu=0.2, cpu=0.8))
"""

from __future__ import annotations

from dataclasses import dataclass, field

TOLERANCE = 1e-9  # float slack on fractions


@dataclass(frozen=True)
class Placement:
    """Share of one kind of tensor on each tier; disk gets the rest."""

    gpu: float = 1.0
    cpu: float = 0.0

    @property
    def disk(self) -> float:
        return max(0.0, 1.0 - self.gpu - self.cpu)

    @property
    def all_gpu(self) -> bool:
        return self.gpu >= 1.0 - TOLERANCE


@dataclass(frozen=True)
class Policy:
    """FlexGen's policy (facts §3) with named, unit-consistent fields."""

    gpu_batch_size: int = 4
    num_gpu_batches: int = 1
    weights: Placement = field(default_factory=Placement)
    cache: Placement = field(default_factory=Placement)
    activations: Placement = field(default_factory=Placement)
    overlap: bool = True
    cpu_delegation: bool = False
    attn_sparsity: float = 1.0
    attn_renormalize: bool = False
    compress_weight: bool = False
    compress_cache: bool = False
    compress_bits: int = 4
    compress_group_size: int = 64
    pin_memory: bool = True

    @property
    def block_size(self) -> int:
        """Prompts in one block: gpu_batch_size x num_gpu_batches."""
        return self.gpu_batch_size * self.num_gpu_batches

    @property
    def uses_disk(self) -> bool:
        """Anything placed on the disk tier (the engine's test for a weight cache, scratch
        files and bounce buffers)."""
        return any(p.disk > 0 for p in (self.weights, self.cache, self.activations))
