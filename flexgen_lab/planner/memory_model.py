"""Peak bytes per tier that the engine will reserve for a policy, written from shapes.

The same items the engine accounts (engine/tiers.py), as a constant plus a linear function of
the placement fractions, so the LP can constrain it: homes of weights, KV cache and
activations (share x total), compute-side slots for offloaded weights, cache staging and
bounce buffers, activation slots, and the largest step's intermediates (engine/workspace.py).
Compressed weights and cache count their packed sizes, plus the dequantised copies.

    >>> peak = memory_terms(Job(spec, policy, "zigzag", None, prompt_len=512, gen_len=32))
    >>> peak["gpu"].at(policy)     # bytes
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field

from flexgen_lab.engine.bounce import bounce_reserve, largest_block_request, largest_weight_request
from flexgen_lab.engine.cache_homes import cache_config, decoded_dtype, stored_shapes
from flexgen_lab.engine.compress import CompressionConfig, compressed_nbytes
from flexgen_lab.engine.disk import ALIGN
from flexgen_lab.engine.placement import batch_ranges, split_units
from flexgen_lab.engine.policy import Placement, Policy
from flexgen_lab.engine.split_array import STAGE_MAX, stage_bytes
from flexgen_lab.engine.tiers import nbytes_of
from flexgen_lab.engine.transfer import IO_THREADS
from flexgen_lab.engine.weight_homes import slot_layout, stored_forms
from flexgen_lab.engine.workspace import step_workspace_bytes
from flexgen_lab.models.spec import ModelSpec
from flexgen_lab.models.weights import loaded_shapes, part_shapes
from flexgen_lab.planner.job import Job
from flexgen_lab.units import FLOAT_OF_SIZE as DTYPES
from flexgen_lab.units import ceil_div, round_up

# fraction variables, in the paper's names: weights w*, cache c*, activations h*
VARIABLES = ("wg", "wc", "wd", "cg", "cc", "cd", "hg", "hc", "hd")


@dataclass
class Linear:
    """const + sum(coef[v] * v) over the placement fractions (bytes)."""

    const: float = 0.0
    coef: dict[str, float] = field(default_factory=dict)

    def add(self, var: str | None, value: float) -> None:
        if var is None:
            self.const += value
        else:
            self.coef[var] = self.coef.get(var, 0.0) + value

    def at(self, policy: Policy) -> float:
        values = fractions(policy)
        return self.const + sum(c * values[v] for v, c in self.coef.items())


def fractions(policy: Policy) -> dict[str, float]:
    w, c, a = policy.weights, policy.cache, policy.activations
    return dict(wg=w.gpu, wc=w.cpu, wd=w.disk, cg=c.gpu, cc=c.cpu, cd=c.disk, hg=a.gpu,
                hc=a.cpu, hd=a.disk)


def _stored_bytes(shape, dtype, config) -> int:
    return sum(nbytes_of(s, d) for s, d, _ in stored_forms(shape, dtype, config))


def part_bytes(spec: ModelSpec, part: str, dtype, config) -> tuple[int, int]:
    """(bytes of a part's stored tensors, bytes of its largest tensor); the head counts a tied
    embedding, which it loads again."""
    shapes = loaded_shapes(spec, part)
    sizes = [_stored_bytes(s, dtype, config) for s in shapes.values()]
    return sum(sizes), max(sizes)


def memory_terms(job: Job, offloaded_weights: bool = True, offloaded_cache: bool = True,
                 offloaded_acts: bool = True, disk: bool = True,
                 io_workers: int = IO_THREADS) -> dict[str, Linear]:
    """Peak bytes per tier, linear in the placement fractions (the LP's view; peak_bytes is
    the exact figure of one concrete policy); offloaded_* say whether that kind may leave the
    gpu tier (slots and staging exist only then), `disk` whether it may go to disk."""
    spec, policy, prompt_len, gen_len = job.spec, job.policy, job.prompt_len, job.gen_len
    dtype = DTYPES[job.dtype_bytes]
    out = {tier: Linear() for tier in ("gpu", "cpu", "disk")}
    _weights(out, spec, policy, dtype, offloaded_weights)
    _cache(out, spec, policy, prompt_len + gen_len - 1, dtype, offloaded_cache,
           job.compute_on_cpu)
    _activations(out, spec, policy, prompt_len, dtype, offloaded_acts)
    out["gpu"].add(None, step_workspace_bytes(spec, policy.gpu_batch_size, prompt_len,
                                              prompt_len, dtype))
    # bounce buffers, in case what may leave the gpu tier goes to disk
    if disk:
        on_disk = _all_on_disk(policy, offloaded_weights, offloaded_cache, offloaded_acts)
        out["cpu"].add(None, bounce_reserve(
            largest_block_request(spec, on_disk, dtype, prompt_len, gen_len), io_workers))
    return out


def placing_terms(job: Job, offloaded: bool = True, io_workers: int = IO_THREADS) -> Linear:
    """cpu bytes while weights are placed, linear: the cpu homes of every part (wc x total,
    an upper bound of the homes filled so far) plus the source's copy of the largest part,
    and the bounce buffers when weights may go to disk (`offloaded`)."""
    spec, policy, dtype = job.spec, job.policy, DTYPES[job.dtype_bytes]
    homes, term = Linear(), Linear()
    _weights({"gpu": Linear(), "cpu": homes, "disk": Linear()}, spec, policy, dtype, False)
    term.coef["wc"] = homes.coef.get("wc", 0.0)
    term.const = max(sum(nbytes_of(shape, dtype) for shape in part_shapes(spec, p).values())
                     for p in ("embed", "layer", "head"))
    if offloaded:
        on_disk = _all_on_disk(policy, True, False, False)
        term.const += bounce_reserve(largest_weight_request(spec, on_disk, dtype), io_workers)
    return term


def _all_on_disk(policy: Policy, weights: bool, cache: bool, acts: bool) -> Policy:
    """`policy` with the named kinds wholly on disk: the most its bounce buffers may take."""
    disk = Placement(0, 0)
    return dataclasses.replace(policy, weights=disk if weights else policy.weights,
                               cache=disk if cache else policy.cache,
                               activations=disk if acts else policy.activations)


def _weights(out, spec, policy, dtype, offloaded) -> None:
    config = (CompressionConfig(policy.compress_bits, policy.compress_group_size, 0)
              if policy.compress_weight else None)
    total = sum(part_bytes(spec, p, dtype, config)[0] for p in ("embed", "head"))
    total -= part_bytes(spec, "embed", dtype, config)[1] if spec.tie_embeddings else 0
    layer, layer_max = part_bytes(spec, "layer", dtype, config)
    total += spec.num_layers * layer
    for tier, var in (("gpu", "wg"), ("cpu", "wc"), ("disk", "wd")):
        out[tier].add(var, total)
    if not offloaded:
        return
    largest = max(part_bytes(spec, p, dtype, config)[0] for p in ("embed", "layer", "head"))
    out["gpu"].add(None, 2 * largest)  # the two slots every loaded part streams through
    if config is not None:  # the workspace every part's weights dequantise into
        out["gpu"].add(None, max(part_bytes(spec, p, dtype, None)[0]
                                 for p in ("embed", "layer", "head")))
    # disk rows bounce through a cpu stage per slot, sized by the largest array's disk rows up
    # to STAGE_MAX (split_array.stage_bytes): linear in wd below it, at most STAGE_MAX above
    stage = max(part_bytes(spec, p, dtype, config)[1] for p in ("embed", "layer", "head"))
    if stage <= STAGE_MAX:
        out["cpu"].add("wd", 2 * stage)
    else:
        out["cpu"].add(None, 2 * STAGE_MAX)
    out["cpu"].add(None, 4 * ALIGN)


def _cache(out, spec, policy, positions, dtype, offloaded, compute_on_cpu) -> None:
    b, block = policy.gpu_batch_size, policy.block_size
    if policy.compress_cache:
        row = compressed_nbytes((spec.num_kv_heads, spec.head_dim), cache_config(policy, spec))
    else:
        row = spec.kv_dim * dtype.itemsize
    per_seq = 2 * positions * row  # k and v of one sequence, one layer
    home = spec.num_layers * block * per_seq
    for tier, var in (("gpu", "cg"), ("cpu", "cc"), ("disk", "cd")):
        out[tier].add(var, home)
    if not offloaded:
        return
    # per-batch buffers hold a tier's largest segment: share x gbs sequences in this linear
    # view (the engine's is ceil(share x gbs): peak_bytes has it exactly)
    for var in ("cc", "cd"):
        if not policy.cpu_delegation:  # two staging slots per off-gpu tier
            out["gpu"].add(var, 2 * b * per_seq)
    out["cpu"].add("cd", 4 * b * per_seq)  # read bounce + store stage
    if policy.compress_cache:  # dequantised k, v of each tier's segment, where it attends
        def plain(place: str) -> int:
            decoded = decoded_dtype(dtype, place, compute_on_cpu)
            return 2 * positions * spec.kv_dim * decoded.itemsize * b
        out["gpu"].add("cg", plain("gpu"))
        for var in ("cc", "cd"):
            place = "cpu" if policy.cpu_delegation else "gpu"
            out[place].add(var, plain(place))


def _activations(out, spec, policy, prompt_len, dtype, offloaded) -> None:
    per_seq = prompt_len * spec.hidden * dtype.itemsize
    home = policy.block_size * per_seq
    for tier, var in (("gpu", "hg"), ("cpu", "hc"), ("disk", "hd")):
        out[tier].add(var, home)
    if offloaded:
        batch = policy.gpu_batch_size * per_seq
        out["gpu"].add(None, 2 * batch)  # two load slots
        out["cpu"].add("hd", 3 * batch)  # store bounce and two load bounces


def peak_bytes(job: Job, io_workers: int = IO_THREADS) -> dict[str, float]:
    """Tier -> the peak bytes the engine accounts for this concrete policy, item by item as
    the engine makes them: homes split as placement.py splits them (disk cache files rounded
    to 4 KiB per array), compute-side slots and cpu stages of offloaded weights, cache staging,
    bounce and dequantisation buffers sized for a tier's largest segment, activation slots,
    and the largest step's intermediates. Everything but the intermediates is made before
    generating, so the peak is their sum plus the widest step (on the cpu tier, or the peak
    while placing the weights, if that is higher)."""
    parts = peak_breakdown(job, io_workers)
    total: Counter = Counter()
    for kind in ("weights", "cache", "activations", "step"):
        total.update(parts[kind])
    total["cpu"] = max(total["cpu"] + parts["io"]["cpu"], parts["placing"]["cpu"])
    return {tier: float(total[tier]) for tier in ("gpu", "cpu", "disk")}


def peak_breakdown(job: Job, io_workers: int = IO_THREADS) -> dict[str, Counter]:
    """peak_bytes by kind: weights, cache, activations (homes and buffers), the widest step's
    intermediates (gpu), the peak while placing weights (cpu, with the bounce buffers weight
    requests need) and the disk tier's bounce buffers while a block runs (cpu), each tier ->
    bytes."""
    spec, policy, prompt_len, gen_len = job.spec, job.policy, job.prompt_len, job.gen_len
    dtype = DTYPES[job.dtype_bytes]
    return {"weights": _weight_items(spec, policy, dtype),
            "cache": _cache_items(spec, policy, prompt_len, gen_len, dtype, job.compute_on_cpu),
            "activations": _activation_items(spec, policy, prompt_len, dtype),
            "step": Counter({"gpu": _widest_step(spec, policy, prompt_len, gen_len, dtype)}),
            "placing": Counter({"cpu": _placing_peak(spec, policy, dtype) + bounce_reserve(
                largest_weight_request(spec, policy, dtype), io_workers)}),
            "io": Counter({"cpu": bounce_reserve(largest_block_request(
                spec, policy, dtype, prompt_len, gen_len), io_workers)})}


def _placing_peak(spec: ModelSpec, policy: Policy, dtype) -> int:
    """cpu bytes while weights are placed: the homes filled so far plus the source's copy of
    the part being placed (embedding, each decoder layer, head in turn)."""
    homes, peak = 0, 0
    for part, count in (("embed", 1), ("layer", spec.num_layers), ("head", 1)):
        home = sum(dict(a.tier_bytes).get("cpu", 0)
                   for a in _part_arrays(spec, part, policy, dtype, loaded=False))
        source = sum(nbytes_of(shape, dtype) for shape in part_shapes(spec, part).values())
        homes += count * home  # the last part of a kind is the widest point
        peak = max(peak, homes + source)
    return peak


@dataclass(frozen=True)
class StoredArray:
    """One stored array of a weight tensor (its value, or compressed codes / scales)."""

    nbytes: int
    tier_bytes: tuple[tuple[str, int], ...]
    compressed: bool
    stage: int  # cpu-tier bytes that stage its disk rows (split_array.stage_bytes)

    @property
    def only_gpu(self) -> bool:
        return [tier for tier, _ in self.tier_bytes] == ["gpu"]


def _part_arrays(spec: ModelSpec, part: str, policy: Policy, dtype,
                 loaded: bool = True) -> list[StoredArray]:
    """A part's stored arrays as weight_homes splits them; `loaded`: as its load assembles
    them (the head with a tied embedding loads that again), else its own homes."""
    config = (CompressionConfig(policy.compress_bits, policy.compress_group_size, 0)
              if policy.compress_weight else None)
    shapes = loaded_shapes(spec, part) if loaded else part_shapes(spec, part)
    out = []
    for shape in shapes.values():
        stored = stored_forms(shape, dtype, config)
        for array_shape, array_dtype, rows_per_unit in stored:
            units = ceil_div(array_shape[0], rows_per_unit)
            row_bytes = nbytes_of(array_shape[1:], array_dtype)
            tiers = tuple((tier, (min(b * rows_per_unit, array_shape[0]) - a * rows_per_unit)
                           * row_bytes)
                          for tier, (a, b) in split_units(units, policy.weights).ranges().items())
            out.append(StoredArray(nbytes_of(array_shape, array_dtype), tiers, len(stored) > 1,
                                   stage_bytes(dict(tiers).get("disk", 0), row_bytes)))
    return out


def _weight_items(spec: ModelSpec, policy: Policy, dtype) -> Counter:
    """Homes (a tied embedding once), then the compute-side slots every part that is not
    resident streams through (weight_homes._reserve_slots: two once two or more parts load,
    each holding the largest part's loaded arrays), a cpu stage per slot for disk rows and,
    for compressed weights, the workspace the largest part dequantises into."""
    out: Counter = Counter()
    slot, stage, loading = 0, 0, 0
    for part, count in (("embed", 1), ("layer", spec.num_layers), ("head", 1)):
        for array in _part_arrays(spec, part, policy, dtype, loaded=False):
            for tier, nbytes in array.tier_bytes:
                out[tier] += count * nbytes
        arrays = _part_arrays(spec, part, policy, dtype)
        if all(a.only_gpu and not a.compressed for a in arrays):
            continue  # resident: compute reads the homes
        loading += count
        slot = max(slot, slot_layout([a.nbytes for a in arrays if not a.only_gpu])[1])
        stage = max(stage, *(a.stage for a in arrays))
    slots = min(2, loading)
    out["gpu"] += slots * slot
    out["cpu"] += slots * stage
    if policy.compress_weight:  # the workspace every part dequantises into
        out["gpu"] += max(sum(nbytes_of(shape, dtype) for shape in _compressed_shapes(spec, part))
                          for part in ("embed", "layer", "head"))
    return out


def _cache_items(spec: ModelSpec, policy: Policy, prompt_len: int, gen_len: int,
                 dtype, compute_on_cpu: bool) -> Counter:
    """Every (layer, batch) segment at home, then the block's buffers (cache_io.py
    reserve_buffers), each sized for its tier's largest segment."""
    config = cache_config(policy, spec)
    S = prompt_len + gen_len - 1
    out: Counter = Counter()
    largest: dict[str, int] = {}
    split = split_units(policy.block_size, policy.cache)
    for k in range(policy.num_gpu_batches):
        for tier, (a, b) in batch_ranges(split, k, policy.gpu_batch_size).items():
            sizes = [nbytes_of(*shape) for shape in
                     stored_shapes(S, b - a, spec, dtype, config).values()]
            if tier == "disk":  # each array's file region starts on a 4 KiB boundary
                sizes = [round_up(n, ALIGN) for n in sizes]
            out[tier] += spec.num_layers * sum(sizes)
            largest[tier] = max(largest.get(tier, 0), b - a)
    if gen_len < 2:
        return out  # nothing is stored for later or read back
    for tier, n in largest.items():
        stored = sum(nbytes_of(*x) for x in stored_shapes(S, n, spec, dtype, config).values())
        if tier == "disk":
            out["cpu"] += 4 * stored  # two store stages, two read bounces
        if tier != "gpu" and not policy.cpu_delegation:
            out["gpu"] += 2 * stored  # two staging slots
        if config is not None:
            place = "cpu" if policy.cpu_delegation and tier != "gpu" else "gpu"
            decoded = decoded_dtype(dtype, place, compute_on_cpu)
            out[place] += sum(nbytes_of(*x) for x in stored_shapes(S, n, spec, decoded,
                                                                  None).values())
    return out


def _activation_items(spec: ModelSpec, policy: Policy, prompt_len: int, dtype) -> Counter:
    """Homes sized for prefill, then two load slots and, with disk rows, three bounces."""
    per_seq = prompt_len * spec.hidden * dtype.itemsize
    split = split_units(policy.block_size, policy.activations)
    out = Counter({"gpu": split.gpu * per_seq, "cpu": split.cpu * per_seq,
                   "disk": split.disk * per_seq})
    if split.gpu < policy.block_size:
        out["gpu"] += 2 * policy.gpu_batch_size * per_seq
        if split.disk:
            out["cpu"] += 3 * policy.gpu_batch_size * per_seq
    return out


def _widest_step(spec: ModelSpec, policy: Policy, prompt_len: int, gen_len: int,
                 dtype) -> int:
    """The largest compute step's intermediates: prefill, or the last decode step (most
    keys)."""
    b, S = policy.gpu_batch_size, prompt_len + gen_len - 1
    widest = step_workspace_bytes(spec, b, prompt_len, prompt_len, dtype)
    if gen_len > 1:
        widest = max(widest, step_workspace_bytes(spec, b, 1, S, dtype))
    return widest


def _compressed_shapes(spec: ModelSpec, part: str) -> list[tuple]:
    return [shape for shape in loaded_shapes(spec, part).values() if len(shape) >= 2]
