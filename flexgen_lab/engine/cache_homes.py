"""The KV cache at home: per (layer, GPU batch), each tier holds a segment of the sequences.

The block's sequences split by the policy's cache shares (placement.batch_ranges), so a GPU
batch may have a gpu, a cpu and a disk segment. Segments are token-major, (S, n, nkv, d) with
S = prompt_len + gen_len - 1 positions: one token's rows for all n sequences are contiguous, so
an append is one sequential write, on disk too, and a decode load reads one prefix [0, p).
Compressed, a segment is the pair (data (S, n, nkv, d/2) uint8, scale_min (S, n, nkv, G, 2)).

Attention runs per segment (attention never mixes sequences), so nothing is ever concatenated:
gpu segments are read in place, cpu and disk segments are copied to compute-side staging, or,
with CPU delegation in decode, attended on the CPU where they live.
"""

from __future__ import annotations

import torch

from flexgen_lab.engine import compress
from flexgen_lab.engine.disk import ALIGN
from flexgen_lab.engine.placement import batch_ranges, split_units
from flexgen_lab.engine.policy import Placement, Policy
from flexgen_lab.engine.tiers import Tiers, nbytes_of
from flexgen_lab.engine.transfer import Links
from flexgen_lab.units import ceil_div, round_up


class Segment:
    """One tier's share of one (layer, batch) cache: arrays k and v in stored form."""

    def __init__(self, tier: str, seqs: tuple[int, int], shapes: dict, tiers: Tiers,
                 what: str, disk_dir=None):
        self.tier, self.seqs = tier, seqs
        self.shapes = shapes  # array name -> (shape, dtype), e.g. "k.data" -> ((S, n, ...), u8)
        self.arrays: dict[str, torch.Tensor] = {}
        self.offsets: dict[str, int] = {}
        self.row_bytes = {name: nbytes_of(shape[1:], dtype) for name, (shape, dtype) in
                          shapes.items()}
        self.what = what
        if tier == "disk":
            offset = 0
            for name, (shape, _) in shapes.items():
                self.offsets[name] = offset
                offset += round_up(shape[0] * self.row_bytes[name], ALIGN)
            tiers["disk"].reserve(offset, what)
            self.file = disk_dir.file(what.replace(":", "_").replace(" ", "_"), offset)
        else:
            self.arrays = {name: tiers.empty(tier, shape, dtype, what)
                           for name, (shape, dtype) in shapes.items()}

    def read_rows(self, dst: dict[str, torch.Tensor], positions: list[int], links: Links,
                  token: int, names: list[str]) -> None:
        """Disk: dst[name][r] <- row positions[r], one read per position (sparse values)."""
        for name in names:
            for r, pos in enumerate(positions):
                offset = self.offsets[name] + pos * self.row_bytes[name]
                links.read(self.file, offset, dst[name][r], token)

    def write_rows(self, rows: dict[str, torch.Tensor], start: int, links: Links, token: int,
                   stage: dict[str, torch.Tensor] | None, rows_on_cpu: bool) -> None:
        """Put token-major rows [start, start + t) of every array in place.

        rows are on the compute side, or already on the cpu tier (rows_on_cpu) when decode
        attention was delegated there (that move was counted when it happened).
        """
        for name, value in rows.items():
            stop = start + value.shape[0]
            if self.tier == "gpu":
                self.arrays[name][start:stop].copy_(value)
                continue
            if self.tier == "cpu":
                target = self.arrays[name][start:stop]
                if rows_on_cpu:
                    target.copy_(value)  # already on this tier: no link crossed
                else:
                    links.copy(target, value, "gpu_to_cpu", token)
                continue
            buf = value
            if not rows_on_cpu:
                buf = stage[name][:value.shape[0]]
                links.copy(buf, value, "gpu_to_cpu", token)
            offset = self.offsets[name] + start * self.row_bytes[name]
            links.write(self.file, offset, buf.contiguous(), token)

    def read_prefix(self, dst: dict[str, torch.Tensor], length: int, links: Links, token: int,
                    stage: dict[str, torch.Tensor] | None, to_compute: bool,
                    names: list[str] | None = None) -> None:
        """dst[name][:length] <- rows [0, length) of each array (all, or `names`);
        to_compute: dst is on the compute side."""
        for name in names or self.shapes:
            target = dst[name][:length]
            if self.tier == "cpu":
                links.copy(target, self.arrays[name][:length], "cpu_to_gpu", token)
            elif self.tier == "disk":
                buf = stage[name][:length] if to_compute else target
                links.read(self.file, self.offsets[name], buf, token)
                if to_compute:
                    links.copy(target, buf, "cpu_to_gpu", token)


def cache_group(head_dim: int, group_size: int) -> int:
    """The cache's group size: the largest even divisor of head_dim not above the policy's
    group_size, so no head's row pads. Groups run along head_dim and a padded group repeats
    the row's last value, so where head_dim <= group_size this decodes to the same values in
    fewer bytes; where it is not a multiple (opt-2.7b: 80 with 64), groups of 64 would pad
    the row to 128 codes and store a third more than groups of 40. An odd head_dim keeps
    group_size (padded)."""
    evens = [g for g in range(2, min(head_dim, group_size) + 1, 2) if head_dim % g == 0]
    return evens[-1] if evens else group_size


def cache_config(policy: Policy, spec) -> compress.CompressionConfig | None:
    """How a policy's KV cache is compressed (None: it is not): groups along head_dim."""
    if not policy.compress_cache:
        return None
    return compress.CompressionConfig(policy.compress_bits,
                                      cache_group(spec.head_dim, policy.compress_group_size), -1)


def decoded_dtype(dtype: torch.dtype, place: str, compute_on_cpu: bool) -> torch.dtype:
    """The dtype a compressed cache decodes into for attention at `place` ("gpu": the compute
    side; "cpu": delegated attention; compute_on_cpu: the compute side is a CPU as well).

    float32 where attention runs on a CPU and the compute dtype is a half type (the decode's own
    math is float32, and a CPU's decode attention over the token-major rows runs about 2x faster
    in float32 than in bfloat16: 38 vs 67 ms decoding and attending b=16, 520 keys, 32 heads of
    80, measured on this project's 2-core machine), else the compute dtype (a GPU's half
    attention is its fast path). The engine's buffers and the memory model both ask here."""
    on_cpu = place == "cpu" or compute_on_cpu
    return torch.float32 if on_cpu and dtype.itemsize < 4 else dtype


def stored_shapes(S: int, n: int, spec, dtype: torch.dtype,
                  config: compress.CompressionConfig | None) -> dict:
    """Array name -> (shape, dtype) of one segment of n sequences."""
    shape = (S, n, spec.num_kv_heads, spec.head_dim)
    if config is None:
        return {"k": (shape, dtype), "v": (shape, dtype)}
    groups = ceil_div(spec.head_dim, config.group_size)
    packed = (*shape[:-1], groups * config.group_size * config.bits // 8)
    scales = (*shape[:-1], groups, 2)
    return {f"{kv}.{a}": s for kv in "kv" for a, s in
            (("data", (packed, torch.uint8)), ("scale_min", (scales, torch.float16)))}


class CacheHomes:
    """Every (layer, batch) cache segment of one block, allocated for the whole generation."""

    def __init__(self, spec, share: Placement, batch_size: int, num_batches: int, S: int,
                 tiers: Tiers, dtype: torch.dtype, config: compress.CompressionConfig | None,
                 disk_dir, layers: range | None = None, tag: str = ""):
        """layers: the 0-based decoder layers this process computes (a pipeline stage's);
        tag: prefixes scratch file names (a pipeline stage holds several blocks at once)."""
        self.spec, self.S, self.dtype, self.config = spec, S, dtype, config
        self.layers = range(spec.num_layers) if layers is None else layers
        split = split_units(batch_size * num_batches, share)
        self.ranges = [batch_ranges(split, k, batch_size) for k in range(num_batches)]
        self.segments = {
            (layer, k): {tier: Segment(tier, seqs, stored_shapes(S, seqs[1] - seqs[0], spec,
                                                                dtype, config),
                                       tiers, f"{tag}cache: layer {layer} batch {k} {tier}",
                                       disk_dir)
                         for tier, seqs in self.ranges[k].items()}
            for layer in self.layers for k in range(num_batches)}

    def stored(self, k: torch.Tensor, v: torch.Tensor) -> dict[str, torch.Tensor]:
        """Token-major (t, n, nkv, d) rows in stored form (quantised on the compute side)."""
        rows = {"k": k, "v": v}
        if self.config is None:
            return rows
        out = {}
        for kv, value in rows.items():
            packed = compress.quantize(value, self.config)
            out[f"{kv}.data"], out[f"{kv}.scale_min"] = packed.data, packed.scale_min
        return out

    def unpack(self, arrays: dict[str, torch.Tensor], length: int, kinds: str = "kv",
               into: dict[str, torch.Tensor] | None = None) -> tuple:
        """(k, v) (or the `kinds` asked), each (length, n, nkv, d) in the compute dtype;
        compressed rows decode into `into[kv]` where given (a buffer of that shape)."""
        if self.config is None:
            return tuple(arrays[kv][:length] for kv in kinds)
        out = []
        for kv in kinds:
            data, scales = arrays[f"{kv}.data"][:length], arrays[f"{kv}.scale_min"][:length]
            shape = (length, *data.shape[1:-1], self.spec.head_dim)
            packed = compress.Compressed(data, scales, shape, self.dtype, self.config)
            out.append(compress.dequantize(packed, out=None if into is None else into[kv]))
        return tuple(out)

    def home_bytes(self) -> dict[str, int]:
        """Bytes of cache at home per tier (disk files round each array up to 4 KiB more)."""
        total: dict[str, int] = {}
        for segs in self.segments.values():
            for tier, seg in segs.items():
                n = sum(nbytes_of(shape, dtype) for shape, dtype in seg.shapes.values())
                total[tier] = total.get(tier, 0) + n
        return total
