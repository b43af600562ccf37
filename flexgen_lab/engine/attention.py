"""Decode attention over a GPU batch's cache segments: on the compute side or delegated.

Each segment (gpu, cpu, disk share of the batch's sequences) attends on its own, over rows
engine/cache_io.py brought where this attention runs. With CPU delegation a cpu or disk
segment attends on the CPU: only the query, the new key/value row and the attention output
cross the link. The math (decode_attention, sparse_choice, sparse_combine) is pure.

Shapes: b batch, n a segment's sequences, p past positions, nh query heads, nkv key/value
heads, d head_dim; cache rows are token-major (p, n, nkv, d).
"""

from __future__ import annotations

import torch

from flexgen_lab.engine.cache_io import CacheIO
from flexgen_lab.engine.transfer import Links
from flexgen_lab.models import ops


class CacheAttention:
    """Decode attention over a GPU batch's cache segments, on the compute side or delegated;
    cache_io brings the rows it reads and takes the new rows home."""

    def __init__(self, io: CacheIO, sparsity: float = 1.0, renormalize: bool = False):
        self.io, self.delegate, self.device = io, io.delegate, io.device
        self.sparsity, self.renormalize = sparsity, renormalize

    def step(self, token: int, layer: int, batch: int, slot: int, q: torch.Tensor,
             k_new: torch.Tensor, v_new: torch.Tensor, state, scale: float, links: Links
             ) -> tuple[torch.Tensor, dict]:
        """One step's attention and the new rows it leaves to store: the prompt's causal
        attention over itself (prefill), or one query over the cache (decode).
        q (b, nh, t, d), k_new/v_new (b, nkv, t, d); state: the GPU batch (its masks)."""
        if token == 0:
            attn = ops.attention(q, k_new, v_new, state.mask, scale)
            return attn, self.io.prefill_rows(layer, batch, k_new, v_new)
        rows = {"k": k_new.permute(2, 0, 1, 3), "v": v_new.permute(2, 0, 1, 3)}
        return self.attend(token, layer, batch, slot, q, rows, state.key_mask, scale, links)

    def attend(self, token: int, layer: int, batch: int, slot: int, q: torch.Tensor,
               rows: dict[str, torch.Tensor], key_mask: torch.Tensor, scale: float,
               links: Links) -> tuple[torch.Tensor, dict]:
        """Decode: q (b, nh, 1, d), rows k/v (1, b, nkv, d) -> (b, 1, nh*d), pending stores."""
        p = self.io.past(token)
        outs, pending = [], {}
        for tier, seg in self.io.segments(layer, batch).items():
            a, b = seg.seqs
            fresh = {kv: r[:, a:b] for kv, r in rows.items()}
            cpu_side = self.delegate and tier != "gpu"
            q_seg = q[a:b]
            if cpu_side:  # only q and the new row cross the link, then the output back
                q_seg = self.io.to_cpu(q_seg, links, token)
                fresh = {kv: self.io.to_cpu(r, links, token) for kv, r in fresh.items()}
            if self.sparsity < 1.0:
                out = self._sparse(tier, seg, slot, p, q_seg, fresh, cpu_side,
                                   key_mask[a:b, :p + 1], scale, links, token)
                store = tier != "gpu"
            else:
                k, v, store = self.io.keys_values(tier, seg, slot, p, fresh, cpu_side)
                out = decode_attention(q_seg, k, v, key_mask[a:b, :p + 1], scale)
            if cpu_side:
                back = torch.empty(out.shape, dtype=out.dtype, device=self.device)
                links.copy(back, out, "cpu_to_gpu", token)
                out = back
            outs.append(out)
            if store:
                pending[tier] = (self.io.homes.stored(fresh["k"], fresh["v"]), cpu_side)
        return torch.cat(outs) if len(outs) > 1 else outs[0], pending

    def _sparse(self, tier, seg, slot, p, q, fresh, cpu_side, key_mask, scale, links, token):
        """Top-k over the value cache: all keys score, only the chosen k + 1 value rows load."""
        k, _, _ = self.io.keys_values(tier, seg, slot, p, fresh, cpu_side, kinds="k")
        probs, top, chosen = sparse_choice(q, k, key_mask, scale, self.sparsity)
        values = self.io.gather_values(tier, seg, chosen, slot, cpu_side, links, token)
        return sparse_combine(probs, top, values, fresh["v"], self.renormalize, q)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor,
            scale: float) -> torch.Tensor:
    """q (n, nh, 1, d), k/v (p+1, n, nkv, d) token-major, key_mask (n, p+1) -> (n, 1, nh*d).

    Runs in k's dtype where that is wider than q's (a compressed cache decoded into float32,
    cache_homes.decoded_dtype), else in q's."""
    compute_dtype = torch.promote_types(q.dtype, k.dtype)
    if q.device.type == "cpu" and compute_dtype == torch.float16:
        compute_dtype = torch.float32  # CPU half matmuls are slow; the original used fp32 too
    k = k.permute(1, 2, 0, 3).to(compute_dtype)
    v = v.permute(1, 2, 0, 3).to(compute_dtype)
    out = ops.attention(q.to(compute_dtype), k, v, key_mask[:, None, None, :], scale)
    return out.to(q.dtype)


def sparse_choice(q, k, key_mask, scale: float, sparsity: float):
    """Softmax over every key, then the top int(sparsity * p) past positions per head.

    q (n, nh, 1, d), k (p+1, n, nkv, d) -> probs (n, nh, p+1) fp32, top probs (n, nh, kk),
    chosen positions (n, nh, kk). The newest position (p) is always kept apart.
    """
    n, nh = q.shape[:2]
    p = k.shape[0] - 1
    keys = k.permute(1, 2, 0, 3).repeat_interleave(nh // k.shape[2], dim=1)  # (n, nh, p+1, d)
    scores = (q.float() @ keys.float().transpose(-1, -2))[:, :, 0] * scale  # (n, nh, p+1)
    scores = scores.masked_fill(~key_mask[:, None, :], torch.finfo(torch.float32).min)
    probs = torch.softmax(scores, dim=-1)
    top = probs[..., :p].topk(int(sparsity * p), dim=-1)
    return probs, top.values, top.indices


def sparse_combine(probs, top, values, v_new, renormalize: bool, q):
    """sum_k top_k v_k + p_new v_new (optionally / the kept mass) -> (n, 1, nh*d)."""
    n, nh = probs.shape[:2]
    group = nh // v_new.shape[2]
    new = v_new[0].repeat_interleave(group, dim=1).float()  # (n, nh, d)
    out = (top[..., None] * values.float()).sum(-2) + probs[..., -1:] * new
    if renormalize:
        out = out / (top.sum(-1, keepdim=True) + probs[..., -1:])
    return out.to(q.dtype).reshape(n, 1, nh * q.shape[-1])
