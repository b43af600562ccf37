"""Peak bytes per tier that the engine will reserve for a policy, written from shapes.

The same items the engine accounts (engine/tiers.py), as a constant plus a linear function of
the placement fractions, so the LP can constrain it: homes of weights, KV cache and
activations (share x total), compute-side slots for offloaded weights, cache staging and
bounce buffers, activation slots, and the largest step's intermediates (engine/workspace.py).
Compressed weights and cache count their packed sizes, plus the dequantised copies.

    >>> peak = memory_terms(spec, policy, prompt_len=512, gen_len=32, dtype_bytes=2)
    >>> peak["gpu"].at(policy)     # bytes
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from flexgen_lab.engine.compress import CompressionConfig, compressed_nbytes
from flexgen_lab.engine.disk import ALIGN
from flexgen_lab.engine.placement import batch_ranges, split_units
from flexgen_lab.engine.policy import Policy
from flexgen_lab.engine.workspace import step_workspace_bytes
from flexgen_lab.models.spec import ModelSpec
from flexgen_lab.models.weights import part_shapes

DTYPES = {2: torch.float16, 4: torch.float32}
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
    if config is None or len(shape) < 2:
        return int(torch.tensor(shape).prod()) * dtype.itemsize
    return compressed_nbytes(shape, config)


def part_bytes(spec: ModelSpec, part: str, dtype, config) -> tuple[int, int]:
    """(bytes of a part's stored tensors, bytes of its largest tensor); the head counts a tied
    embedding, which it loads again."""
    shapes = dict(part_shapes(spec, part))
    if part == "head" and spec.tie_embeddings:
        shapes["embed_tokens.weight"] = (spec.vocab, spec.hidden)
    sizes = [_stored_bytes(s, dtype, config) for s in shapes.values()]
    return sum(sizes), max(sizes)


def memory_terms(spec: ModelSpec, policy: Policy, prompt_len: int, gen_len: int,
                 dtype_bytes: int, offloaded_weights: bool = True,
                 offloaded_cache: bool = True, offloaded_acts: bool = True,
                 exact: bool = False) -> dict[str, Linear]:
    """Peak bytes per tier; offloaded_* say whether that kind may leave the gpu tier (slots
    and staging exist only then); exact sizes per-batch buffers for this very policy."""
    dtype = DTYPES[dtype_bytes]
    out = {tier: Linear() for tier in ("gpu", "cpu", "disk")}
    _weights(out, spec, policy, dtype, offloaded_weights)
    _cache(out, spec, policy, prompt_len + gen_len - 1, dtype, offloaded_cache, exact)
    _activations(out, spec, policy, prompt_len, dtype, offloaded_acts)
    out["gpu"].add(None, step_workspace_bytes(spec, policy.gpu_batch_size, prompt_len,
                                              prompt_len, dtype))
    return out


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
    slots = 2 * layer + sum(part_bytes(spec, p, dtype, config)[0] for p in ("embed", "head"))
    out["gpu"].add(None, slots)  # compute-side copies of the parts being loaded
    if config is not None:  # a part's dequantised weights during its compute step
        out["gpu"].add(None, max(part_bytes(spec, p, dtype, None)[0]
                                 for p in ("embed", "layer", "head")))
    stages = 2 * layer_max + sum(part_bytes(spec, p, dtype, config)[1]
                                 for p in ("embed", "head"))
    out["cpu"].add("wd", stages)  # disk rows bounce through the cpu tier
    out["cpu"].add(None, 4 * ALIGN)


def _cache(out, spec, policy, positions, dtype, offloaded, exact) -> None:
    b, block = policy.gpu_batch_size, policy.block_size
    if policy.compress_cache:
        config = CompressionConfig(policy.compress_bits, policy.compress_group_size, -1)
        row = compressed_nbytes((spec.num_kv_heads, spec.head_dim), config)
    else:
        row = spec.kv_dim * dtype.itemsize
    per_seq = 2 * positions * row  # k and v of one sequence, one layer
    home = spec.num_layers * block * per_seq
    for tier, var in (("gpu", "cg"), ("cpu", "cc"), ("disk", "cd")):
        out[tier].add(var, home)
    if not offloaded:
        return
    # per-batch buffers hold a tier's largest segment: share x gbs sequences in the LP's
    # linear view, the exact ceil(share x gbs) for a concrete policy
    seqs = _largest_segments(policy) if exact else None
    for tier, var in (("cpu", "cc"), ("disk", "cd")):
        if not policy.cpu_delegation:  # two staging slots per off-gpu tier
            _add(out["gpu"], var, seqs, tier, 2 * per_seq, b)
    _add(out["cpu"], "cd", seqs, "disk", 4 * per_seq, b)  # read bounce + store stage
    if policy.compress_cache:  # dequantised k, v of one segment, where attention runs
        plain = 2 * positions * spec.kv_dim * dtype.itemsize * b
        out["cpu" if policy.cpu_delegation else "gpu"].add(None, plain)


def _largest_segments(policy: Policy) -> dict[str, int]:
    """Tier -> the most sequences any GPU batch holds there (as the engine deals them)."""
    split = split_units(policy.block_size, policy.cache)
    out: dict[str, int] = {}
    for k in range(policy.num_gpu_batches):
        for tier, (a, b) in batch_ranges(split, k, policy.gpu_batch_size).items():
            out[tier] = max(out.get(tier, 0), b - a)
    return out


def _add(term: Linear, var: str, seqs: dict | None, tier: str, per_seq: float, b: int) -> None:
    if seqs is None:
        term.add(var, b * per_seq)
    else:
        term.add(None, seqs.get(tier, 0) * per_seq)


def _activations(out, spec, policy, prompt_len, dtype, offloaded) -> None:
    per_seq = prompt_len * spec.hidden * dtype.itemsize
    home = policy.block_size * per_seq
    for tier, var in (("gpu", "hg"), ("cpu", "hc"), ("disk", "hd")):
        out[tier].add(var, home)
    if offloaded:
        batch = policy.gpu_batch_size * per_seq
        out["gpu"].add(None, 2 * batch)  # two load slots
        out["cpu"].add("hd", 3 * batch)  # store bounce and two load bounces


def peak_bytes(spec: ModelSpec, policy: Policy, prompt_len: int, gen_len: int,
               dtype_bytes: int) -> dict[str, float]:
    """Tier -> modelled peak bytes of one concrete policy (buffers exist only for what moves)."""
    terms = memory_terms(spec, policy, prompt_len, gen_len, dtype_bytes,
                         not policy.weights.all_gpu, not policy.cache.all_gpu,
                         not policy.activations.all_gpu, exact=True)
    return {tier: term.at(policy) for tier, term in terms.items()}
