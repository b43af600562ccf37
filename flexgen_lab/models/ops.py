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


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
              scale: float) -> torch.Tensor:
    """Scaled dot-product attention with grouped-query heads.

    q (b, nh, t, d), k and v (b, nkv, s, d), mask (b, 1, t, s) bool -> (b, t, nh*d).
    """
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                         enable_gqa=q.shape[1] != k.shape[1])
    return merge_heads(out)


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
