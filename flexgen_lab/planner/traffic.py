"""Bytes per link that a policy moves, written from shapes: the cost model's I/O terms.

It mirrors the engine's semantics exactly (tests compare it with the engine's own counters
for a grid of policies): weights split by rows per tensor and streamed once per block
(zigzag) or once per batch (row_by_row) per token; KV cache split by sequences, decode loads
the past prefix and stores one row (not at the last token); delegation moves only q, the new
rows and the output; activations go home after every layer. Sparse attention on a disk cache
reads the union of chosen positions, which depends on the data: it is not modelled here.

    >>> link_bytes(Job(spec, policy, "zigzag", None, prompt_len=512, gen_len=32))
    {"prefill": {"cpu_to_gpu": ..., ...}, "decode": {...}}
"""

from __future__ import annotations

import functools
from collections import Counter

import torch

from flexgen_lab.engine.cache_homes import cache_config, stored_shapes
from flexgen_lab.engine.compress import CompressionConfig
from flexgen_lab.engine.placement import batch_ranges, split_units
from flexgen_lab.engine.policy import Placement, Policy
from flexgen_lab.engine.tiers import nbytes_of
from flexgen_lab.engine.transfer import LINKS
from flexgen_lab.engine.weight_homes import stored_forms
from flexgen_lab.models.spec import ModelSpec
from flexgen_lab.models.weights import loaded_shapes, part_names
from flexgen_lab.planner.job import Ends, Job
from flexgen_lab.units import FLOAT_OF_SIZE, ceil_div


def weight_tier_bytes(spec: ModelSpec, policy: Policy, dtype: torch.dtype) -> list[Counter]:
    """Per part (embed, layers, head; the head with a tied embedding again): bytes per tier.
    Every decoder layer splits alike, so each kind of part is computed once (and cached: the
    search asks for the same placements many times)."""
    config = (CompressionConfig(policy.compress_bits, policy.compress_group_size, 0)
              if policy.compress_weight else None)
    kinds = {part: _part_tier_bytes(spec, part, policy.weights, dtype, config)
             for part in ("embed", "layer", "head")}
    return [Counter(dict(kinds[part])) for part, _ in part_names(spec)]


@functools.lru_cache(maxsize=4096)
def _part_tier_bytes(spec: ModelSpec, part: str, share: Placement, dtype: torch.dtype,
                     config: CompressionConfig | None) -> tuple[tuple[str, int], ...]:
    shapes = loaded_shapes(spec, part)
    tiers: Counter = Counter()
    for shape in shapes.values():
        for array_shape, array_dtype, rows_per_unit in stored_forms(shape, dtype, config):
            units = ceil_div(array_shape[0], rows_per_unit)
            row_bytes = nbytes_of(array_shape[1:], array_dtype)
            for tier, (a, b) in split_units(units, share).ranges().items():
                rows = min(b * rows_per_unit, array_shape[0]) - a * rows_per_unit
                tiers[tier] += rows * row_bytes
    return tuple(tiers.items())


WINDOWS = ("embed", "layer", "last", "head")  # whose compute a transfer overlaps, see below


def link_bytes(job: Job) -> dict[str, dict[str, int]]:
    """Bytes per link and phase (prefill = token 0) for the job's blocks of prompts. A
    pipeline stage's job has a spec with its own decoder layers and `ends` (window_bytes)."""
    windows = window_bytes(job)
    return {phase: {link: sum(w[link] for w in by_window.values()) for link in LINKS}
            for phase, by_window in windows.items()}


def window_bytes(job: Job, kinds: tuple[str, ...] = ("weights", "cache", "activations"),
                 requests: bool = False) -> dict[str, dict[str, dict[str, int]]]:
    """Bytes per link, phase and window: the compute steps a transfer runs beside.

    Windows: "embed", "layer" (decoder layers 1 .. L-1), "last" (layer L), "head". The
    engine prefetches the next part's weights while a part computes, so a part's weights
    belong to the window before it (the embedding's to the head's: the next token's); cache
    and activation traffic belongs to the step that reads or writes it. `kinds` selects
    whose traffic is counted. With `requests`, copies instead of bytes: each op (or a
    segment of one, as the engine copies them) counts once on every link it moves bytes on,
    which is what a per-copy latency multiplies.

    A pipeline stage (pipeline/stages.py) is the same with spec.num_layers its own decoder
    layers and `ends` saying whether it computes the embedding and the head: its parts form
    the same cycle (its first part's weights load in its last part's window), the
    embedding's output goes home only where the embedding runs, and the head loads its
    input only where the head runs.
    """
    unit = _copies if requests else Counter
    moved = {phase: {w: Counter() for w in WINDOWS} for phase in ("prefill", "decode")}
    if "weights" in kinds:
        _weights(moved, job, unit)
    for k in range(job.policy.num_gpu_batches):
        if "cache" in kinds:
            _cache(moved, job, k, unit)
        if "activations" in kinds:
            _activations(moved, job, k, unit)
    return {phase: {w: {link: counts[link] * job.blocks for link in LINKS}
                    for w, counts in by_window.items()} for phase, by_window in moved.items()}


def _copies(moved: Counter) -> Counter:
    """One copy on every link that moves bytes."""
    return Counter({link: 1 for link, nbytes in moved.items() if nbytes})


def stage_windows(spec: ModelSpec, ends: Ends) -> list[str]:
    """The windows of a stage's parts in compute order (WINDOWS for the whole model)."""
    return [*["embed"][:ends[0]], *["layer"] * (spec.num_layers - 1), "last",
            *["head"][:ends[1]]]


def _weights(moved, job: Job, unit=Counter) -> None:
    spec, policy, gen_len, ends = job.spec, job.policy, job.gen_len, job.ends
    dtype = FLOAT_OF_SIZE[job.dtype_bytes]
    loads = 1 if job.schedule == "zigzag" else policy.num_gpu_batches
    parts = weight_tier_bytes(spec, policy, dtype)
    parts = parts[(not ends[0]):len(parts) - (not ends[1])]
    windows = stage_windows(spec, ends)
    before = [windows[-1], *windows[:-1]]  # a part's weights load beside the part before it
    for tiers, window in zip(parts, before, strict=True):
        if set(tiers) <= {"gpu"}:
            continue  # resident part: nothing moves
        load = unit(Counter({"cpu_to_gpu": tiers["cpu"] + tiers["disk"],
                             "disk_to_cpu": tiers["disk"]}))
        for phase, tokens in (("prefill", 1), ("decode", gen_len - 1)):
            _add(moved[phase][window], load, tokens * loads)


def _per_layer(moved_phase: dict, part: Counter, spec: ModelSpec) -> None:
    """One decoder layer's traffic, for all L layers: L-1 in "layer", one in "last"."""
    _add(moved_phase["layer"], part, spec.num_layers - 1)
    _add(moved_phase["last"], part)


def _cache(moved, job: Job, k: int, unit=Counter) -> None:
    """Batch k's cache traffic, op by op (an op moves every off-gpu segment of the batch).
    Summed over decode tokens in closed form where an op's bytes are constant or linear in
    the past length (the search evaluates this hundreds of times per model)."""
    spec, policy, prompt_len, gen_len = job.spec, job.policy, job.prompt_len, job.gen_len
    dtype = FLOAT_OF_SIZE[job.dtype_bytes]
    rows = cache_rows(spec, policy, k, dtype)
    if not rows or gen_len < 2:
        return
    decode, steps = moved["decode"], gen_len - 1
    _per_layer(moved["prefill"], unit(_total(cache_store(tier, row, prompt_len, False)
                                             for tier, row in rows.items())), spec)
    # a load moves past x (bytes per position): all steps' pasts add up to s (n-1) + (n-1)(n-2)/2
    per_position = _total(cache_load(policy, tier, row, 1) for tier, row in rows.items())
    pasts = prompt_len * steps + steps * (steps - 1) // 2
    _per_layer(decode, _times(unit(per_position), steps if unit is _copies else pasts), spec)
    if policy.attn_sparsity < 1.0 and not policy.cpu_delegation:  # int(share x past) per step
        for past in range(prompt_len, prompt_len + steps):
            _per_layer(decode, unit(_total(cache_attend(spec, policy, row, past, dtype)
                                           for row in rows.values())), spec)
    else:
        attend = _total(cache_attend(spec, policy, row, prompt_len, dtype) for row in rows.values())
        _per_layer(decode, _times(unit(attend), steps), spec)
    store = _total(cache_store(tier, row, 1, policy.cpu_delegation) for tier, row in rows.items()
                   if cache_needs_store(policy, tier))
    _per_layer(decode, _times(unit(store), steps - 1), spec)  # the last token's is not stored


def _times(counter: Counter, n: int) -> Counter:
    return Counter({link: n * value for link, value in counter.items()})


def _total(counters) -> Counter:
    total = Counter()
    for counter in counters:
        _add(total, counter)
    return total


def _add(total: Counter, part: Counter, times: int = 1) -> None:
    for link, nbytes in part.items():
        total[link] += times * nbytes


def cache_rows(spec: ModelSpec, policy: Policy, k: int, dtype: torch.dtype) -> dict[str, dict]:
    """GPU batch k's off-gpu cache segments: tier -> {"n": sequences, array: bytes per
    position} in the stored form (compressed or not)."""
    config = cache_config(policy, spec)
    split = split_units(policy.block_size, policy.cache)
    out = {}
    for tier, (a, b) in batch_ranges(split, k, policy.gpu_batch_size).items():
        if tier != "gpu":
            shapes = stored_shapes(1, b - a, spec, dtype, config)
            out[tier] = {"n": b - a, **{name: nbytes_of(shape[1:], dt)
                                        for name, (shape, dt) in shapes.items()}}
    return out


def _arrays(row: dict) -> dict[str, int]:
    return {name: v for name, v in row.items() if name != "n"}


def cache_load(policy: Policy, tier: str, row: dict, past: int) -> Counter:
    """One layer's load_cache op: the past rows the attention reads (keys only when sparse);
    in place on the cpu when delegated, through the cpu from disk."""
    sparse = policy.attn_sparsity < 1.0
    loaded = sum(v for name, v in _arrays(row).items() if name.startswith("k") or not sparse)
    moved = Counter()
    if not policy.cpu_delegation:
        moved["cpu_to_gpu"] += past * loaded
    if tier == "disk":
        moved["disk_to_cpu"] += past * loaded
    return moved


def cache_attend(spec: ModelSpec, policy: Policy, row: dict, past: int,
                 dtype: torch.dtype) -> Counter:
    """What one layer's decode compute moves for one off-gpu segment: with delegation q and
    the new k, v rows to the cpu and the output back; sparse without it, the chosen values."""
    n, item, moved = row["n"], dtype.itemsize, Counter()
    if policy.cpu_delegation:
        moved["gpu_to_cpu"] += n * (spec.q_dim + 2 * spec.kv_dim) * item
        moved["cpu_to_gpu"] += n * spec.q_dim * item
    elif policy.attn_sparsity < 1.0:  # the chosen value vectors, stored form
        per_vector = sum(v for name, v in _arrays(row).items() if name.startswith("v"))
        per_vector //= n * spec.num_kv_heads
        chosen = int(policy.attn_sparsity * past)
        moved["cpu_to_gpu"] += n * spec.num_heads * chosen * per_vector
    return moved


def cache_needs_store(policy: Policy, tier: str) -> bool:
    """Whether a decode step's new row must go home (an uncompressed delegated cpu segment
    receives it in place during attention)."""
    return (tier == "disk" or not policy.cpu_delegation or policy.compress_cache
            or policy.attn_sparsity < 1.0)


def cache_store(tier: str, row: dict, positions: int, rows_on_cpu: bool) -> Counter:
    """One layer's store_cache op for `positions` new rows of one segment."""
    nbytes, moved = positions * sum(_arrays(row).values()), Counter()
    if not rows_on_cpu:
        moved["gpu_to_cpu"] += nbytes
    if tier == "disk":
        moved["cpu_to_disk"] += nbytes
    return moved


def activation_rows(spec: ModelSpec, policy: Policy, k: int, dtype: torch.dtype) -> dict:
    """GPU batch k's off-gpu activation homes: tier -> bytes per token position."""
    split = split_units(policy.block_size, policy.activations)
    return {tier: (b - a) * spec.hidden * dtype.itemsize
            for tier, (a, b) in batch_ranges(split, k, policy.gpu_batch_size).items()
            if tier != "gpu"}


def hidden_move(tier: str, nbytes: int, store: bool) -> Counter:
    """One store_hidden (gpu -> cpu [-> disk]) or load_hidden ([disk ->] cpu -> gpu) op."""
    moved = Counter({"gpu_to_cpu" if store else "cpu_to_gpu": nbytes})
    if tier == "disk":
        moved["cpu_to_disk" if store else "disk_to_cpu"] += nbytes
    return moved


def _activations(moved, job: Job, k: int, unit=Counter) -> None:
    """Batch k's activation traffic, op by op (an op moves every off-gpu segment); every
    decode token moves the same, so it is counted once and multiplied."""
    spec, policy, prompt_len, gen_len = job.spec, job.policy, job.prompt_len, job.gen_len
    dtype, ends = FLOAT_OF_SIZE[job.dtype_bytes], job.ends
    homes = activation_rows(spec, policy, k, dtype)
    if not homes:
        return
    for phase, tokens, times in (("prefill", prompt_len, 1), ("decode", 1, gen_len - 1)):
        if times < 1:
            continue
        windows = moved[phase]
        store = _times(unit(_total(hidden_move(tier, tokens * per_token, True)
                                   for tier, per_token in homes.items())), times)
        load = _times(unit(_total(hidden_move(tier, tokens * per_token, False)
                                  for tier, per_token in homes.items())), times)
        if ends[0]:
            _add(windows["embed"], store)  # the embedding's output goes home
        _per_layer(windows, store + load, spec)  # each layer loads and stores
        if ends[1]:
            _add(windows["head"], load)  # the head loads the last layer's output


class OpTraffic:
    """Bytes per link of each op of a schedule's stream: the engine's counters, op by op.

    A compute op carries what its attention moves itself (delegation's q, rows and output;
    sparse value gathers). Summed over a run's ops this equals `link_bytes`.

        >>> traffic = OpTraffic(Job(spec, policy, "zigzag", None, prompt_len=512, gen_len=32))
        >>> traffic(Op("load_weight", 1, 3, 0))
        Counter({'cpu_to_gpu': ..., 'disk_to_cpu': ...})
    """

    def __init__(self, job: Job):
        """Reads the job's spec, policy, lengths and element size (its schedule only orders
        the ops, which the caller streams; its profile is not needed)."""
        spec, policy, dtype = job.spec, job.policy, FLOAT_OF_SIZE[job.dtype_bytes]
        self.spec, self.policy, self.prompt_len = spec, policy, job.prompt_len
        self.gen_len = job.gen_len
        self.parts = weight_tier_bytes(spec, policy, dtype)
        self.cache = [cache_rows(spec, policy, k, dtype) for k in range(policy.num_gpu_batches)]
        self.acts = [activation_rows(spec, policy, k, dtype)
                     for k in range(policy.num_gpu_batches)]
        self.dtype, self.head = dtype, spec.num_layers + 1

    def __call__(self, op) -> Counter:
        return getattr(self, op.kind)(op)

    def load_weight(self, op) -> Counter:
        tiers = self.parts[op.layer]
        return Counter({"cpu_to_gpu": tiers["cpu"] + tiers["disk"], "disk_to_cpu": tiers["disk"]})

    def load_cache(self, op) -> Counter:
        moved = Counter()
        for tier, row in self.cache[op.batch].items():
            _add(moved, cache_load(self.policy, tier, row, self.prompt_len + op.token - 1))
        return moved

    def compute(self, op) -> Counter:
        moved = Counter()
        if op.token > 0 and 0 < op.layer < self.head:
            for row in self.cache[op.batch].values():
                _add(moved, cache_attend(self.spec, self.policy, row,
                                         self.prompt_len + op.token - 1, self.dtype))
        return moved

    def store_cache(self, op) -> Counter:
        moved, first = Counter(), op.token == 0
        for tier, row in self.cache[op.batch].items():
            if first or cache_needs_store(self.policy, tier):
                positions = self.prompt_len if first else 1
                on_cpu = self.policy.cpu_delegation and not first
                _add(moved, cache_store(tier, row, positions, on_cpu))
        return moved

    def _hidden(self, op, store: bool) -> Counter:
        moved, tokens = Counter(), self.prompt_len if op.token == 0 else 1
        for tier, per_token in self.acts[op.batch].items():
            _add(moved, hidden_move(tier, tokens * per_token, store))
        return moved

    def load_hidden(self, op) -> Counter:
        return self._hidden(op, store=False)

    def store_hidden(self, op) -> Counter:
        return self._hidden(op, store=True)
