"""Pure tensor math shared by the model families: norms, attention, RoPE, masks.

Shapes: b batch, t new tokens, s keys (past + new), h hidden, nh query heads, nkv key/value
heads, d head_dim. No function here knows about devices, tiers or placement.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float):
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in fp32 and cast back before the scale, as Llama's reference does."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    return F.linear(x, weight, bias)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(b, t, heads*d) -> (b, heads, t, d)"""
    b, t, _ = x.shape
    return x.view(b, t, heads, -1).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(b, heads, t, d) -> (b, t, heads*d)"""
    b, heads, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, heads * d)


def attention_mask(key_mask: torch.Tensor, query_start: int, num_queries: int) -> torch.Tensor:
    """Boolean mask (b, 1, t, s): True where query i may attend key j.

    key_mask (b, s) marks real (non-padding) keys. Queries sit at absolute positions
    query_start .. query_start + t - 1 of the s keys (causal). A query that would attend nothing
    (a left-padding row) is allowed its own key, so no row is empty: an empty row gives NaN in
    softmax, and NaN in a padded row's K/V would poison real rows through 0 * NaN.
    """
    s = key_mask.shape[1]
    q_pos = torch.arange(query_start, query_start + num_queries, device=key_mask.device)
    k_pos = torch.arange(s, device=key_mask.device)
    causal = k_pos[None, :] <= q_pos[:, None]  # (t, s)
    allowed = causal[None] & key_mask[:, None, :].bool()  # (b, t, s)
    allowed |= (k_pos[None, :] == q_pos[:, None])[None]
    return allowed[:, None]


# The most bytes of attention scores one call may hold (b x nh x queries x s): queries are
# taken in chunks under it, so a step's workspace is bounded by a block, not by s^2 (SDPA's
# fused kernels hold less; its math path, e.g. CUDA before sm80 with a mask, holds this).
SCORE_BLOCK_BYTES = 64 * 2**20


def query_chunk(batch: int, heads: int, queries: int, keys: int, itemsize: int) -> int:
    """Queries per attention call: all of them, or as many as keep the scores under
    SCORE_BLOCK_BYTES (at least one)."""
    per_query = batch * heads * keys * itemsize
    return max(1, min(queries, SCORE_BLOCK_BYTES // max(per_query, 1)))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
              scale: float) -> torch.Tensor:
    """Scaled dot-product attention with grouped-query heads, in chunks of queries (each
    query's softmax is its own, so the result does not depend on the chunking).

    q (b, nh, t, d), k and v (b, nkv, s, d), mask (b, 1, t, s) bool -> (b, t, nh*d).
    """
    b, nh, t, d = q.shape
    chunk = query_chunk(b, nh, t, k.shape[2], q.element_size())
    gqa = nh != k.shape[1]
    if chunk == t:
        return merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                                          enable_gqa=gqa))
    out = q.new_empty(b, t, nh, d)
    for start in range(0, t, chunk):
        end = min(start + chunk, t)
        part = F.scaled_dot_product_attention(q[:, :, start:end], k, v,
                                              attn_mask=mask[:, :, start:end], scale=scale,
                                              enable_gqa=gqa)
        out[:, start:end] = part.transpose(1, 2)
    return out.view(b, t, nh * d)


def rope_inv_freq(head_dim: int, theta: float,
                  scaling: dict[str, float] | None = None) -> torch.Tensor:
    """Inverse frequencies (d/2,) of rotary embeddings; `scaling` applies Llama 3's rule."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
    if scaling is None:
        return inv_freq
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """positions (b, t) -> cos, sin (b, 1, t, d), computed in fp32 then cast."""
    freqs = positions[..., None].float() * inv_freq.to(positions.device)  # (b, t, d/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (b, heads, t, d): rotate pairs (i, i + d/2) by the position's angle."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids (b, s) from a padding mask (b, s): 0.. over real tokens, -1 on padding."""
    mask = mask.long()
    return torch.cumsum(mask, dim=1) * mask - 1
