"""Bytes per link that a policy moves, written from shapes: the cost model's I/O terms.

It mirrors the engine's semantics exactly (tests compare it with the engine's own counters
for a grid of policies): weights split by rows per tensor and streamed once per block
(zigzag) or once per batch (row_by_row) per token; KV cache split by sequences, decode loads
the past prefix and stores one row (not at the last token); delegation moves only q, the new
rows and the output; activations go home after every layer. Sparse attention on a disk cache
reads the union of chosen positions, which depends on the data: it is not modelled here.

    >>> link_bytes(spec, policy, "zigzag", prompt_len=512, gen_len=32, dtype_bytes=2)
    {"prefill": {"cpu_to_gpu": ..., ...}, "decode": {...}}
"""

from __future__ import annotations

from collections import Counter

import torch

from flexgen_lab.engine.cache_homes import stored_shapes
from flexgen_lab.engine.compress import CompressionConfig
from flexgen_lab.engine.placement import batch_ranges, split_units
from flexgen_lab.engine.policy import Policy
from flexgen_lab.engine.tiers import nbytes_of
from flexgen_lab.engine.transfer import LINKS
from flexgen_lab.models.spec import ModelSpec
from flexgen_lab.models.weights import part_names, part_shapes

DTYPES = {1: torch.uint8, 2: torch.float16, 4: torch.float32}


def weight_tier_bytes(spec: ModelSpec, policy: Policy, dtype: torch.dtype) -> list[Counter]:
    """Per part (embed, layers, head; the head with a tied embedding again): bytes per tier."""
    config = (CompressionConfig(policy.compress_bits, policy.compress_group_size, 0)
              if policy.compress_weight else None)
    parts = []
    for part, _ in part_names(spec):
        shapes = dict(part_shapes(spec, part))
        if part == "head" and spec.tie_embeddings:
            shapes["embed_tokens.weight"] = (spec.vocab, spec.hidden)
        tiers: Counter = Counter()
        for shape in shapes.values():
            for array_shape, array_dtype, rows_per_unit in _stored(shape, dtype, config):
                units = -(-array_shape[0] // rows_per_unit)
                row_bytes = nbytes_of(array_shape[1:], array_dtype)
                for tier, (a, b) in split_units(units, policy.weights).ranges().items():
                    rows = min(b * rows_per_unit, array_shape[0]) - a * rows_per_unit
                    tiers[tier] += rows * row_bytes
        parts.append(tiers)
    return parts


def _stored(shape, dtype, config):
    """(array shape, dtype, rows per unit) of a tensor's stored form (as weight_homes)."""
    if config is None or len(shape) < 2:
        return [(shape, dtype, 1)]
    groups = -(-shape[0] // config.group_size)
    rows_per_group = config.group_size * config.bits // 8
    return [((groups * rows_per_group, *shape[1:]), torch.uint8, rows_per_group),
            ((groups, 2, *shape[1:]), torch.float16, 1)]


def link_bytes(spec: ModelSpec, policy: Policy, schedule: str, prompt_len: int, gen_len: int,
               dtype_bytes: int, num_blocks: int = 1) -> dict[str, dict[str, int]]:
    """Bytes per link and phase (prefill = token 0) for num_blocks blocks of prompts."""
    dtype = DTYPES[dtype_bytes]
    moved = {"prefill": Counter(), "decode": Counter()}
    _weights(moved, spec, policy, schedule, gen_len, dtype)
    for k in range(policy.num_gpu_batches):
        _cache(moved, spec, policy, k, prompt_len, gen_len, dtype)
        _activations(moved, spec, policy, k, prompt_len, gen_len, dtype)
    return {phase: {link: counts[link] * num_blocks for link in LINKS}
            for phase, counts in moved.items()}


def _weights(moved, spec, policy, schedule, gen_len, dtype) -> None:
    loads = 1 if schedule == "zigzag" else policy.num_gpu_batches
    for tiers in weight_tier_bytes(spec, policy, dtype):
        if set(tiers) <= {"gpu"}:
            continue  # resident part: nothing moves
        for token in range(gen_len):
            phase = moved["prefill" if token == 0 else "decode"]
            phase["cpu_to_gpu"] += loads * (tiers["cpu"] + tiers["disk"])
            phase["disk_to_cpu"] += loads * tiers["disk"]


def _cache(moved, spec, policy, k, prompt_len, gen_len, dtype) -> None:
    config = (CompressionConfig(policy.compress_bits, policy.compress_group_size, -1)
              if policy.compress_cache else None)
    split = split_units(policy.block_size, policy.cache)
    item, layers = dtype.itemsize, spec.num_layers
    sparse, delegate = policy.attn_sparsity < 1.0, policy.cpu_delegation
    for tier, (a, b) in batch_ranges(split, k, policy.gpu_batch_size).items():
        if tier == "gpu":
            continue
        n = b - a
        row = {name: nbytes_of(shape[1:], dt) for name, (shape, dt) in
               stored_shapes(1, n, spec, dtype, config).items()}
        stored = sum(row.values())
        loaded = sum(v for name, v in row.items() if name.startswith("k") or not sparse)
        _store(moved["prefill"], tier, layers * prompt_len * stored, rows_on_cpu=False)
        for token in range(1, gen_len):
            phase, past = moved["decode"], prompt_len + token - 1
            if not delegate:
                phase["cpu_to_gpu"] += layers * past * loaded
            if tier == "disk":
                phase["disk_to_cpu"] += layers * past * loaded
            if delegate:
                phase["gpu_to_cpu"] += layers * n * (spec.q_dim + 2 * spec.kv_dim) * item
                phase["cpu_to_gpu"] += layers * n * spec.q_dim * item
            if sparse and not delegate:  # the chosen value vectors, stored form
                per_vector = sum(v for name, v in row.items() if name.startswith("v"))
                per_vector //= n * spec.num_kv_heads
                chosen = int(policy.attn_sparsity * past)
                phase["cpu_to_gpu"] += layers * n * spec.num_heads * chosen * per_vector
            needs_store = tier == "disk" or not delegate or config is not None or sparse
            if token < gen_len - 1 and needs_store:
                _store(phase, tier, layers * stored, rows_on_cpu=delegate)


def _store(phase: Counter, tier: str, nbytes: int, rows_on_cpu: bool) -> None:
    if not rows_on_cpu:
        phase["gpu_to_cpu"] += nbytes
    if tier == "disk":
        phase["cpu_to_disk"] += nbytes


def _activations(moved, spec, policy, k, prompt_len, gen_len, dtype) -> None:
    split = split_units(policy.block_size, policy.activations)
    for tier, (a, b) in batch_ranges(split, k, policy.gpu_batch_size).items():
        if tier == "gpu":
            continue
        for token in range(gen_len):
            phase = moved["prefill" if token == 0 else "decode"]
            t = prompt_len if token == 0 else 1
            nbytes = (spec.num_layers + 1) * (b - a) * t * spec.hidden * dtype.itemsize
            phase["gpu_to_cpu"] += nbytes  # stores after embed and every decoder layer
            phase["cpu_to_gpu"] += nbytes  # loads before every decoder layer and the head
            if tier == "disk":
                phase["cpu_to_disk"] += nbytes
                phase["disk_to_cpu"] += nbytes
