"""Model weights at home on the tiers, and their assembly on the compute side, part by part.

Parts are the input embedding, each decoder layer and the output head (models/weights.py).
Every tensor of two or more dimensions may be stored compressed (4-bit groups along dim 0,
the output channel); norms and biases never are. A tensor splits along dim 0 in units (rows,
or quantisation groups) by the policy's weight shares. Disk rows are read from a read-only
weight cache (engine/weight_cache.py): files of the stored form, keyed by everything that
changes their bytes (model identity, dtype, compression), written once and reused by later
runs.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from flexgen_lab.engine import compress
from flexgen_lab.engine.disk import ALIGN
from flexgen_lab.engine.placement import split_units
from flexgen_lab.engine.policy import Placement
from flexgen_lab.engine.split_array import SplitArray
from flexgen_lab.engine.tiers import Tiers, nbytes_of
from flexgen_lab.engine.transfer import Links
from flexgen_lab.models.weights import part_names

if TYPE_CHECKING:  # weight_cache.py imports this module's stored form
    from flexgen_lab.engine.weight_cache import WeightCache


def stored_arrays(tensor: torch.Tensor, config: compress.CompressionConfig | None):
    """A tensor's stored form: {"value"} or, compressed, {"data", "scale_min"}; rows per unit."""
    if config is None or tensor.dim() < 2:
        return {"value": (tensor, 1)}
    packed = compress.quantize(tensor, config)
    rows_per_group = config.group_size * config.bits // 8
    return {"data": (packed.data, rows_per_group), "scale_min": (packed.scale_min, 1)}


def part_key(part: str, layer: int | None) -> str:
    return part if layer is None else f"{part}{layer:04d}"


@dataclass
class TensorHome:
    shape: tuple[int, ...]
    dtype: torch.dtype
    arrays: dict[str, SplitArray]
    config: compress.CompressionConfig | None  # set when stored compressed


class PartHome:
    """One part's tensors at home, and the compute-side slot(s) they are assembled into."""

    def __init__(self, tensors: dict[str, TensorHome]):
        self.tensors = tensors

    @functools.cached_property
    def resident(self) -> bool:
        """Everything on the gpu tier, uncompressed: compute reads the homes directly."""
        return all(t.config is None and t.arrays["value"].only_gpu is not None
                   for t in self.tensors.values())

    @functools.cached_property
    def resident_view(self) -> dict[str, torch.Tensor]:
        return {name: t.arrays["value"].only_gpu for name, t in self.tensors.items()}

    def stage_bytes(self) -> int:
        """cpu-tier bytes needed to stage this part's disk rows on their way to the gpu (the
        largest array's, plus a block of slack to match the file offset's alignment)."""
        need = max((a.tier_bytes().get("disk", 0) for t in self.tensors.values()
                    for a in t.arrays.values()), default=0)
        return need + ALIGN if need else 0


class WeightHomes:
    """Every part of the model at home; `load` assembles one part, `compute_view` unpacks it."""

    def __init__(self, spec, source, share: Placement, tiers: Tiers, dtype: torch.dtype,
                 config: compress.CompressionConfig | None, cache: WeightCache | None):
        self.spec, self.tiers, self.dtype, self.config = spec, tiers, dtype, config
        self.parts: list[PartHome] = []
        for part, layer in part_names(spec):
            tensors = source.part(part, layer, dtype)
            key = part_key(part, layer)
            # the source's copy of the part sits in host memory while its homes fill
            placing = sum(t.nbytes for t in tensors.values())
            with tiers["cpu"].hold(placing, f"weights: placing {key}"):
                self.parts.append(PartHome({
                    name: self._home(key, name, tensor, share, cache)
                    for name, tensor in tensors.items()}))
        if spec.tie_embeddings:  # one home, loaded by both ends (the original stored two)
            embedding = self.parts[0].tensors["embed_tokens.weight"]
            self.parts[-1].tensors["embed_tokens.weight"] = embedding
        self._slots: dict[tuple[str, int], dict] = {}
        self._stages: dict[tuple[str, int], torch.Tensor] = {}
        self._reserve_slots()

    def _reserve_slots(self) -> None:
        """Every compute-side slot and cpu stage a load will use, made now: the first of each
        kind of part (decoder layers alike) gets its slots (two for decoder layers, which
        alternate), so the accounting holds them from the start and a plan that cannot fit
        fails before generating."""
        firsts = {self.kind(i): i for i in reversed(range(len(self.parts)))}
        for kind, index in firsts.items():
            if not self.parts[index].resident:
                for slot in range(2 if kind == "layer" else 1):
                    self._slot(index, slot)
                    self._stage(index, slot)

    def _home(self, key, name, tensor, share, cache) -> TensorHome:
        arrays = {}
        for array, (value, rows_per_unit) in stored_arrays(tensor, self.config).items():
            units = -(-value.shape[0] // rows_per_unit)
            split = split_units(units, share)
            rows = {t: (a * rows_per_unit, min(b * rows_per_unit, value.shape[0]))
                    for t, (a, b) in split.ranges().items()}
            disk, offset = None, 0
            if "disk" in rows:
                row_bytes = value[0].nbytes
                disk = cache.file(key)
                offset = cache.offset(key, name, array) + rows["disk"][0] * row_bytes
            home = SplitArray(self.tiers, tuple(value.shape), value.dtype, rows,
                              f"weights:{key}.{name}", disk, offset)
            home.fill(value)
            arrays[array] = home
        config = self.config if len(arrays) > 1 else None
        return TensorHome(tuple(tensor.shape), tensor.dtype, arrays, config)

    def kind(self, index: int) -> str:
        return "embed" if index == 0 else "head" if index == len(self.parts) - 1 else "layer"

    def load(self, index: int, slot: int, links: Links, token: int) -> dict | None:
        """Assemble part `index` in compute-side slot `slot`; None when it is resident."""
        part = self.parts[index]
        if part.resident:
            return None
        buffers = self._slot(index, slot)
        stage = self._stage(index, slot)
        for name, tensor in part.tensors.items():
            for array, home in tensor.arrays.items():
                if home.only_gpu is None:
                    home.load(buffers[name][array], stage, links, token)
        return buffers

    def compute_view(self, index: int, buffers: dict | None) -> dict[str, torch.Tensor]:
        """Tensors compute can use: homes, loaded slots, or dequantised copies of them."""
        part = self.parts[index]
        if part.resident:
            return part.resident_view
        out = {}
        for name, tensor in part.tensors.items():
            arrays = {a: (h.only_gpu if h.only_gpu is not None else buffers[name][a])
                      for a, h in tensor.arrays.items()}
            if tensor.config is None:
                out[name] = arrays["value"]
            else:
                packed = compress.Compressed(arrays["data"], arrays["scale_min"], tensor.shape,
                                             tensor.dtype, tensor.config)
                out[name] = compress.dequantize(packed)
        return out

    def dequant_bytes(self, index: int) -> int:
        """gpu-tier bytes of the dequantised weights of one part (an intermediate)."""
        part = self.parts[index]
        return sum(nbytes_of(t.shape, t.dtype) for t in part.tensors.values() if t.config)

    def _slot(self, index: int, slot: int) -> dict:
        key = (self.kind(index), slot)
        if key not in self._slots:
            self._slots[key] = {
                name: {a: self.tiers.empty("gpu", h.shape, h.dtype, f"weights:slot {key}")
                       for a, h in t.arrays.items() if h.only_gpu is None}
                for name, t in self.parts[index].tensors.items()}
        return self._slots[key]

    def _stage(self, index: int, slot: int) -> torch.Tensor | None:
        need = self.parts[index].stage_bytes()
        key = (self.kind(index), slot)
        if need and key not in self._stages:
            need = max(p.stage_bytes() for i, p in enumerate(self.parts)
                       if self.kind(i) == key[0])
            self._stages[key] = self.tiers.empty("cpu", (need,), torch.uint8,
                                                 f"weights:stage {key}")
        return self._stages.get(key)

    def tier_bytes(self) -> dict[str, int]:
        """Bytes at home per tier (a tied embedding counted once)."""
        total: dict[str, int] = {}
        seen = set()
        for part in self.parts:
            for tensor in part.tensors.values():
                for array in tensor.arrays.values():
                    if id(array) in seen:
                        continue
                    seen.add(id(array))
                    for tier, n in array.tier_bytes().items():
                        total[tier] = total.get(tier, 0) + n
        return total
