"""The KV cache's I/O for one block: past rows loaded where attention reads them, new rows
stored home, the staging, bounce and dequantisation buffers they pass through, and the value
rows sparse attention gathers. Beside the homes (cache_homes.py) it moves; the attention math
that reads what it brings is in attention.py.

Each segment (gpu, cpu, disk share of a GPU batch's sequences) is read and written on its
own. A gpu segment is read in place. A cpu or disk segment is loaded to compute-side staging
(load op) or, with CPU delegation, read on the CPU where the attention then runs. Past rows
come from storage (round-tripped when the cache is compressed); the current token's own
key/value row is always the exact one.

Shapes: n a segment's sequences, p past positions, nkv key/value heads, d head_dim; cache
rows are token-major (p, n, nkv, d).
"""

from __future__ import annotations

import math

import torch

from flexgen_lab.engine import compress
from flexgen_lab.engine.cache_homes import CacheHomes, Segment, decoded_dtype, stored_shapes
from flexgen_lab.engine.tiers import Tiers
from flexgen_lab.engine.transfer import Links


class CacheIO:
    """Loads and stores the KV cache of one block, with its reusable buffers."""

    def __init__(self, homes: CacheHomes, tiers: Tiers, delegate: bool, sparsity: float = 1.0):
        self.homes, self.tiers, self.delegate = homes, tiers, delegate
        # sparse decode loads only keys: values are gathered after the top-k is known
        names = stored_shapes(1, 1, homes.spec, homes.dtype, homes.config)
        self.load_names = [n for n in names if n.startswith("k") or sparsity >= 1.0]
        self.device, self.dtype = tiers.device, homes.dtype
        self._buffers: dict[tuple, dict[str, torch.Tensor]] = {}
        self._prompt_len = 0

    def reserve_buffers(self, gen_len: int) -> None:
        """Make now every buffer the block will use, so the accounting holds them from the
        start and a plan that cannot fit fails before generating. With one new token nothing
        is stored for later or read back: no buffer at all."""
        if gen_len < 2:
            return
        for tier, seg in self._largest_segments().items():
            roles = []
            if tier == "disk":  # stores, and reads on their way to the attention
                roles += [("store", s, "cpu", True) for s in (0, 1)]
                roles += [("bounce", s, "cpu", True) for s in (0, 1)]
            if tier != "gpu" and not self.delegate:
                roles += [("stage", s, "gpu", True) for s in (0, 1)]
            if self.homes.config is not None:
                place = "cpu" if self.delegate and tier != "gpu" else "gpu"
                roles.append((f"dequant on {place}", 0, place, False))
            for role, slot, place, stored in roles:
                self.buffer(role, seg, slot, place, stored)

    def _largest_segments(self) -> dict[str, Segment]:
        """Tier -> one segment of the first layer with the most sequences on that tier."""
        out: dict[str, Segment] = {}
        first = self.homes.layers.start
        for k in range(len(self.homes.ranges)):
            for tier, seg in self.homes.segments[(first, k)].items():
                if tier not in out or seg.seqs[1] - seg.seqs[0] > out[tier].seqs[1] - out[
                        tier].seqs[0]:
                    out[tier] = seg
        return out

    def buffer(self, role: str, seg: Segment, slot: int, place: str, stored: bool) -> dict:
        """Reusable arrays viewed as (S, n, ...) for a segment of n sequences: in stored form,
        or plain rows (a dequant buffer, in the dtype the cache decodes into at `place`).

        Each array is one flat allocation sized for the tier's largest segment (all S
        positions): GPU batches may hold different numbers of a tier's sequences, and a
        token-major view must be contiguous for its own n, so it is not a slice of a
        bigger (S, n_max, ...) array.
        """
        tier, n = seg.tier, seg.seqs[1] - seg.seqs[0]
        key = (role, tier, slot)
        config = self.homes.config if stored else None
        dtype = self.dtype if stored else decoded_dtype(self.dtype, place,
                                                        self.device.type == "cpu")
        if key not in self._buffers:
            n_max = max(r[tier][1] - r[tier][0] for r in self.homes.ranges if tier in r)
            shapes = stored_shapes(self.homes.S, n_max, self.homes.spec, dtype, config)
            self._buffers[key] = {name: self.tiers.empty(place, (math.prod(shape),), dtype,
                                                         f"cache: {role} {tier} {slot}")
                                  for name, (shape, dtype) in shapes.items()}
        flat = self._buffers[key]
        shapes = stored_shapes(self.homes.S, n, self.homes.spec, dtype, config)
        return {name: flat[name][:math.prod(shape)].view(shape)
                for name, (shape, _) in shapes.items()}

    def segments(self, layer: int, batch: int) -> dict[str, Segment]:
        return self.homes.segments[(layer, batch)]

    def load(self, token: int, layer: int, batch: int, slot: int, links: Links) -> None:
        """Bring past rows [0, p) of the off-gpu segments where attention will read them."""
        past = self.past(token)
        for tier, seg in self.segments(layer, batch).items():
            if tier == "gpu" or (self.delegate and tier == "cpu"):
                continue  # read in place
            bounce = self.buffer("bounce", seg, slot, "cpu", True) if tier == "disk" else None
            if self.delegate:  # disk rows land in a cpu workspace, next to the CPU attention
                seg.read_prefix(bounce, past, links, token, None, False, self.load_names)
            else:
                stage = self.buffer("stage", seg, slot, "gpu", True)
                seg.read_prefix(stage, past, links, token, bounce, True, self.load_names)

    def past(self, token: int) -> int:
        """Positions already in the cache when token step `token` (>= 1) runs."""
        return self._prompt_len + token - 1

    def start_block(self, prompt_len: int) -> None:
        self._prompt_len = prompt_len

    def keys_values(self, tier: str, seg: Segment, slot: int, p: int, fresh: dict,
                     cpu_side: bool, kinds: str = "kv"):
        """(k, v) rows [0, p] for attention, and whether the new row still needs storing.

        kinds="k" (sparse decode) prepares keys only; v is then None.
        """
        if tier == "gpu":
            source = seg.arrays
        elif cpu_side:
            source = seg.arrays if tier == "cpu" else self.buffer("bounce", seg, slot,
                                                                   "cpu", True)
        else:
            source = self.buffer("stage", seg, slot, "gpu", True)
        if self.homes.config is None:
            writes = "kv" if tier == "gpu" or cpu_side else kinds  # homes get both rows
            for kv in writes:  # the exact new row joins the past in place
                source[kv][p:p + 1].copy_(fresh[kv])
            needs_store = tier == "disk" or (tier == "cpu" and not cpu_side)
            rows = [source[kv][:p + 1] if kv in kinds else None for kv in "kv"]
            return rows[0], rows[1], needs_store
        place = "cpu" if cpu_side else "gpu"
        work = self.buffer(f"dequant on {place}", seg, 0, place, False)
        self.homes.unpack(source, p, kinds, into={kv: work[kv][:p] for kv in kinds})
        for kv in kinds:  # the exact new row joins the decoded past
            work[kv][p:p + 1].copy_(fresh[kv])
        if tier == "gpu":  # its store is a device-local write: do it now
            seg.write_rows(self.homes.stored(fresh["k"], fresh["v"]), p, links=None, token=0,
                           stage=None, rows_on_cpu=False)
        rows = [work[kv][:p + 1] if kv in kinds else None for kv in "kv"]
        return rows[0], rows[1], tier != "gpu"

    def gather_values(self, tier, seg, chosen, slot, cpu_side, links, token):
        """Value rows at `chosen` (n, nh, k) positions -> (n, nh, k, d) where attention runs."""
        n, nh, _ = chosen.shape
        group = nh // self.homes.spec.num_kv_heads
        names = [name for name in seg.shapes if name.startswith("v")]
        if tier == "disk":  # read each chosen position's row once, then pick the vectors
            positions = torch.unique(chosen.cpu())
            bounce = self.buffer("bounce", seg, slot, "cpu", True)
            seg.read_rows(bounce, positions.tolist(), links, token, names)
            source = {name: bounce[name][:len(positions)] for name in names}
            chosen = torch.searchsorted(positions, chosen.cpu())
        else:
            source = {name: seg.arrays[name] for name in names}
        where = source[names[0]].device
        idx = chosen.to(where)
        seqs = torch.arange(n, device=where)[:, None, None]
        heads = (torch.arange(nh, device=where) // group)[None, :, None]
        picked = {name: source[name][idx, seqs, heads] for name in names}  # (n, nh, k, ...)
        if tier != "gpu" and not cpu_side:  # only the chosen rows cross to the compute side
            moved = {}
            for name, value in picked.items():
                moved[name] = torch.empty(value.shape, dtype=value.dtype, device=self.device)
                links.copy(moved[name], value, "cpu_to_gpu", token)
            picked = moved
        if self.homes.config is None:
            return picked["v"]
        data, scales = picked["v.data"], picked["v.scale_min"]
        shape = (*data.shape[:-1], self.homes.spec.head_dim)
        return compress.dequantize(compress.Compressed(data, scales, shape, self.dtype,
                                                       self.homes.config))

    def to_cpu(self, x: torch.Tensor, links: Links, token: int) -> torch.Tensor:
        out = torch.empty(x.shape, dtype=x.dtype, device="cpu")
        links.copy(out, x, "gpu_to_cpu", token)
        return out

    def prefill_rows(self, layer: int, batch: int, k: torch.Tensor, v: torch.Tensor) -> dict:
        """Prefill: the prompt's rows, token-major; the gpu segment is written now."""
        rows = {"k": k.permute(2, 0, 1, 3), "v": v.permute(2, 0, 1, 3)}  # (s, b, nkv, d)
        pending = {}
        for tier, seg in self.segments(layer, batch).items():
            a, b = seg.seqs
            stored = self.homes.stored(rows["k"][:, a:b], rows["v"][:, a:b])
            if tier == "gpu":
                seg.write_rows(stored, 0, links=None, token=0, stage=None, rows_on_cpu=False)
            else:
                pending[tier] = (stored, False)
        return pending

    def store(self, layer: int, batch: int, start: int, pending: dict, slot: int,
              links: Links, token: int) -> None:
        """Write pending new rows (from attend or prefill_rows) to their cpu and disk homes."""
        for tier, (rows, on_cpu) in pending.items():
            seg = self.segments(layer, batch)[tier]
            stage = self.buffer("store", seg, slot, "cpu", True) if tier == "disk" else None
            seg.write_rows(rows, start, links, token, stage, on_cpu)
