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

    @property
    def compress_label(self) -> str:
        """The store's `compress` column: none, weight, cache or weight+cache."""
        kinds = [k for k, on in (("weight", self.compress_weight),
                                 ("cache", self.compress_cache)) if on]
        return "+".join(kinds) or "none"

    def store_columns(self) -> dict:
        """The store's policy columns (docs/architecture.md, store schema)."""
        return dict(
            compress=self.compress_label, compress_bits=self.compress_bits,
            compress_group=self.compress_group_size, gpu_batch_size=self.gpu_batch_size,
            num_gpu_batches=self.num_gpu_batches,
            **{f"{prefix}_{tier}": getattr(getattr(self, kind), tier)
               for kind, prefix in (("weights", "w"), ("cache", "c"), ("activations", "a"))
               for tier in ("gpu", "cpu", "disk")},
            cpu_delegation=self.cpu_delegation, overlap=self.overlap,
            attn_sparsity=self.attn_sparsity)

    @staticmethod
    def from_store_row(row) -> Policy:
        """The policy a stored run ran (the inverse of store_columns)."""
        return Policy(
            gpu_batch_size=int(row["gpu_batch_size"]),
            num_gpu_batches=int(row["num_gpu_batches"]),
            weights=Placement(row["w_gpu"], row["w_cpu"]),
            cache=Placement(row["c_gpu"], row["c_cpu"]),
            activations=Placement(row["a_gpu"], row["a_cpu"]), overlap=bool(row["overlap"]),
            cpu_delegation=bool(row["cpu_delegation"]), attn_sparsity=float(row["attn_sparsity"]),
            compress_weight="weight" in row["compress"],
            compress_cache="cache" in row["compress"], compress_bits=int(row["compress_bits"]),
            compress_group_size=int(row["compress_group"]))
