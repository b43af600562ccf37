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
from flexgen_lab.engine.placement import split_units
from flexgen_lab.engine.policy import Placement
from flexgen_lab.engine.split_array import SplitArray
from flexgen_lab.engine.tiers import Tiers, nbytes_of
from flexgen_lab.engine.transfer import Links
from flexgen_lab.models.weights import part_names
from flexgen_lab.units import ceil_div, round_up

if TYPE_CHECKING:  # weight_cache.py imports this module's stored form
    from flexgen_lab.engine.weight_cache import WeightCache


def stored_arrays(tensor: torch.Tensor, config: compress.CompressionConfig | None, name: str):
    """A tensor's stored form: {"value"} or, compressed, {"data", "scale_min"}; rows per unit."""
    if config is None or tensor.dim() < 2:
        return {"value": (tensor, 1)}
    compress.check_fp16_range(tensor, f"weight {name}")  # refused, not saturated
    packed = compress.quantize(tensor, config)
    rows_per_group = config.group_size * config.bits // 8
    return {"data": (packed.data, rows_per_group), "scale_min": (packed.scale_min, 1)}


def stored_forms(shape, dtype, config) -> list[tuple[tuple[int, ...], torch.dtype, int]]:
    """(array shape, dtype, rows per unit) of each array of a tensor's stored form, from its
    shape alone: what stored_arrays makes. The one home of stored weight bytes (the traffic
    and memory models count with it; tests compare it with stored_arrays)."""
    if config is None or len(shape) < 2:
        return [(tuple(shape), dtype, 1)]
    groups = ceil_div(shape[0], config.group_size)
    rows_per_group = config.group_size * config.bits // 8
    return [((groups * rows_per_group, *shape[1:]), torch.uint8, rows_per_group),
            ((groups, 2, *shape[1:]), torch.float16, 1)]


# each array's view in a slot starts on this boundary: any dtype's alignment, and the 256
# bytes CUDA's allocator gives (its kernels may vectorise on it)
SLOT_ALIGN = 256


def slot_layout(sizes: list[int]) -> tuple[list[int], int]:
    """Offsets of arrays of `sizes` bytes packed in one slot, and the slot's size."""
    offsets, end = [], 0
    for size in sizes:
        offsets.append(end)
        end += round_up(size, SLOT_ALIGN)
    return offsets, end


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

    def loaded_arrays(self) -> list[tuple[str, str, SplitArray]]:
        """(tensor, array, home) of every array a load assembles (not read in place)."""
        return [(name, array, home) for name, t in self.tensors.items()
                for array, home in t.arrays.items() if home.only_gpu is None]

    def loaded_sizes(self) -> list[int]:
        return [nbytes_of(home.shape, home.dtype) for _, _, home in self.loaded_arrays()]

    def views(self, slot: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
        """This part's loaded arrays as views into a slot's bytes (slot_layout)."""
        offsets, _ = slot_layout(self.loaded_sizes())
        out: dict[str, dict[str, torch.Tensor]] = {}
        for (name, array, home), start in zip(self.loaded_arrays(), offsets, strict=True):
            raw = slot[start:start + nbytes_of(home.shape, home.dtype)]
            out.setdefault(name, {})[array] = raw.view(home.dtype).view(home.shape)
        return out

    def stage_bytes(self) -> int:
        """cpu-tier bytes needed to stage this part's disk rows on their way to the gpu (the
        largest array's need, split_array.stage_bytes)."""
        return max((a.stage_bytes() for t in self.tensors.values() for a in t.arrays.values()),
                   default=0)


class WeightHomes:
    """Every part of the model at home; `load` assembles one part, `compute_view` unpacks it."""

    def __init__(self, spec, source, share: Placement, tiers: Tiers, dtype: torch.dtype,
                 config: compress.CompressionConfig | None, cache: WeightCache | None,
                 parts: range | None = None):
        """parts: the part indices this process computes (a pipeline stage's), else all."""
        self.spec, self.tiers, self.dtype, self.config = spec, tiers, dtype, config
        self.parts: dict[int, PartHome] = {}  # part index (0 embedding .. L + 1 head) -> home
        names = part_names(spec)
        for index in range(len(names)) if parts is None else parts:
            part, layer = names[index]
            tensors = source.part(part, layer, dtype)
            key = part_key(part, layer)
            # the source's copy of the part sits in host memory while its homes fill
            placing = sum(t.nbytes for t in tensors.values())
            with tiers["cpu"].hold(placing, f"weights: placing {key}"):
                self.parts[index] = PartHome({
                    name: self._home(key, name, tensor, share, cache)
                    for name, tensor in tensors.items()})
        head = len(names) - 1
        if spec.tie_embeddings and head in self.parts:
            self.parts[head].tensors["embed_tokens.weight"] = self._tied_embedding(
                source, share, cache)
        self._reserve_slots()
        self._view, self._view_key = None, None  # see compute_view

    def _tied_embedding(self, source, share: Placement, cache) -> TensorHome:
        """The head's tied embedding: the embedding part's home where this process has one
        (the original stored two), else a home of its own (a pipeline's last stage, as a
        separate machine would hold it)."""
        if 0 in self.parts:
            return self.parts[0].tensors["embed_tokens.weight"]
        tensor = source.part("embed", None, self.dtype)["embed_tokens.weight"]
        with self.tiers["cpu"].hold(tensor.nbytes, "weights: placing the tied embedding"):
            return self._home("embed", "embed_tokens.weight", tensor, share, cache)

    def _reserve_slots(self) -> None:
        """The compute-side slots every load assembles a part in, and their cpu stages, made
        now so the accounting holds them from the start and a plan that cannot fit fails
        before generating. Embedding, decoder layers and head stream through the same slots
        (two when two or more parts load, which alternate, each as large as the largest
        part's loaded arrays): a load is issued only after the part two loads back has been
        computed (schedule.ops), so no part needs a slot of its own."""
        loaded = [part for part in self.parts.values() if not part.resident]
        self.num_slots = min(2, len(loaded))
        size = max((slot_layout(part.loaded_sizes())[1] for part in loaded), default=0)
        stage = max((part.stage_bytes() for part in loaded), default=0)
        self._slots = [self.tiers.empty("gpu", (size,), torch.uint8, f"weights:slot {s}")
                       for s in range(self.num_slots)]
        self._stages = [self.tiers.empty("cpu", (stage,), torch.uint8, f"weights:stage {s}")
                        if stage else None for s in range(self.num_slots)]
        # compressed weights dequantise into one workspace, reused by every part: a fresh
        # buffer per part cost its page faults every step (half of the dequantisation's time)
        dequant = max((self.dequant_bytes(index) for index in self.parts), default=0)
        self._dequant = (self.tiers.empty("gpu", (dequant,), torch.uint8,
                                          "workspace: dequantised weights") if dequant else None)

    def _home(self, key, name, tensor, share, cache) -> TensorHome:
        arrays, stored = {}, stored_arrays(tensor, self.config, f"{key}.{name}")
        for array, (value, rows_per_unit) in stored.items():
            units = ceil_div(value.shape[0], rows_per_unit)
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

    def load(self, index: int, slot: int, links: Links, token: int) -> dict | None:
        """Assemble part `index` in compute-side slot `slot`; None when it is resident."""
        part = self.parts[index]
        if part.resident:
            return None
        buffers = part.views(self._slots[slot])
        stage = self._stages[slot]
        for name, tensor in part.tensors.items():
            for array, home in tensor.arrays.items():
                if home.only_gpu is None:
                    home.load(buffers[name][array], stage, links, token)
        return buffers

    def compute_view(self, token: int, index: int, buffers: dict | None
                     ) -> dict[str, torch.Tensor]:
        """Part `index`'s tensors as compute uses them: its homes (resident), the slot its
        load filled, or dequantised copies of it. Compressed weights are dequantised once per
        (token, part) and reused by the next GPU batches of that part (zig-zag runs them back
        to back; row-by-row never does), in the gpu-tier workspace until another part's
        replace them."""
        if self._view_key != (token, index):
            self.release_view()
            self._view = self._unpack(index, buffers)
            self._view_key = (token, index)
        return self._view

    def release_view(self) -> None:
        self._view, self._view_key = None, None

    def _unpack(self, index: int, buffers: dict | None) -> dict[str, torch.Tensor]:
        part = self.parts[index]
        if part.resident:
            return part.resident_view
        out, start = {}, 0
        for name, tensor in part.tensors.items():
            arrays = {a: (h.only_gpu if h.only_gpu is not None else buffers[name][a])
                      for a, h in tensor.arrays.items()}
            if tensor.config is None:
                out[name] = arrays["value"]
                continue
            packed = compress.Compressed(arrays["data"], arrays["scale_min"], tensor.shape,
                                         tensor.dtype, tensor.config)
            size = nbytes_of(tensor.shape, tensor.dtype)  # a multiple of the item size
            into = self._dequant[start:start + size].view(tensor.dtype).view(tensor.shape)
            out[name] = compress.dequantize(packed, out=into)
            start += size
        return out

    def dequant_bytes(self, index: int) -> int:
        """gpu-tier bytes of the dequantised weights of one part (an intermediate)."""
        part = self.parts[index]
        return sum(nbytes_of(t.shape, t.dtype) for t in part.tensors.values() if t.config)

    def tier_bytes(self) -> dict[str, int]:
        """Bytes at home per tier (a tied embedding counted once)."""
        total: dict[str, int] = {}
        seen = set()
        for part in self.parts.values():
            for tensor in part.tensors.values():
                for array in tensor.arrays.values():
                    if id(array) in seen:
                        continue
                    seen.add(id(array))
                    for tier, n in array.tier_bytes().items():
                        total[tier] = total.get(tier, 0) + n
        return total
