"""The cpu-tier bytes the disk tier's bounce buffers may take, reserved like everything else.

disk.py moves the unaligned parts of a request through one bounce buffer per thread that does
O_DIRECT I/O, grown to the request (at most disk.BOUNCE_MAX, plus a block of alignment slack)
and kept while the thread lives: the engine's I/O workers, and the main thread, which writes
the weight cache while placing weights and runs I/O inline when overlap is off. A request is
never larger than the largest tensor the policy puts on disk, so small models reserve little.
"""

from __future__ import annotations

import math

import torch

from flexgen_lab.engine.disk import ALIGN, BOUNCE_MAX
from flexgen_lab.engine.policy import Policy
from flexgen_lab.models.spec import ModelSpec
from flexgen_lab.models.weights import PARTS, part_shapes
from flexgen_lab.units import round_up


def bounce_reserve(largest_request: int, io_workers: int) -> int:
    """Bytes for the bounce buffers of io_workers + 1 threads, for requests of at most
    `largest_request` bytes (0: nothing on disk)."""
    if largest_request <= 0:
        return 0
    per_thread = min(BOUNCE_MAX, round_up(largest_request, ALIGN) + ALIGN) + ALIGN
    return (io_workers + 1) * per_thread


def largest_weight_request(spec: ModelSpec, policy: Policy, dtype: torch.dtype) -> int:
    """The largest weight tensor, uncompressed (its stored form is no larger), when weights
    go to disk: the weight cache is written, and disk rows read, a tensor at a time."""
    if policy.weights.disk <= 0:
        return 0
    return max(math.prod(shape) * dtype.itemsize
               for part in PARTS for shape in part_shapes(spec, part).values())


def largest_block_request(spec: ModelSpec, policy: Policy, dtype: torch.dtype,
                          prompt_len: int, gen_len: int) -> int:
    """The largest request of a block: a weight tensor, a GPU batch's k and v of one layer
    (uncompressed, over every position), or a GPU batch's activations."""
    b, item = policy.gpu_batch_size, dtype.itemsize
    cache = (2 * (prompt_len + gen_len - 1) * b * spec.kv_dim * item
             if policy.cache.disk > 0 else 0)
    acts = b * prompt_len * spec.hidden * item if policy.activations.disk > 0 else 0
    return max(largest_weight_request(spec, policy, dtype), cache, acts)
