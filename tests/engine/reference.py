"""What any policy must generate, written here without the engine: a plain greedy loop over
all prompts at once, in which weights and stored KV rows pass through compress.py's own round
trip where the policy compresses them, and decode attention keeps the top-k past positions
where it is sparse. Placement, schedule, overlap and delegation must not change the result.
"""

from __future__ import annotations

import torch

from flexgen_lab.engine.batch import BatchState
from flexgen_lab.engine.cache_homes import cache_config
from flexgen_lab.engine.compress import CompressionConfig, roundtrip
from flexgen_lab.engine.policy import Policy
from flexgen_lab.models import families, ops
from flexgen_lab.models.spec import ModelSpec
from flexgen_lab.models.weights import part_names


def reference_parts(spec: ModelSpec, source, policy: Policy) -> list[dict]:
    """Every part's tensors in float32 as the engine computes with them (round-tripped when
    weights are compressed; norms and biases never are)."""
    config = CompressionConfig(policy.compress_bits, policy.compress_group_size, 0)
    parts = []
    for part, layer in part_names(spec):
        tensors = source.part(part, layer, torch.float32)
        parts.append({n: roundtrip(t, config) if policy.compress_weight and t.dim() >= 2 else t
                      for n, t in tensors.items()})
    if spec.tie_embeddings:
        parts[-1]["embed_tokens.weight"] = parts[0]["embed_tokens.weight"]
    return parts


def topk_attention(q, past_k, past_v, k_new, v_new, key_mask, scale, sparsity, renormalize):
    """q (b, nh, 1, d); past (b, nkv, p, d); new (b, nkv, 1, d); key_mask (b, p+1): softmax
    over every key, then only the top int(sparsity p) past positions and the newest one."""
    group = q.shape[1] // past_k.shape[1]
    keys = torch.cat([past_k, k_new], 2).repeat_interleave(group, 1)
    vals = torch.cat([past_v, v_new], 2).repeat_interleave(group, 1)
    scores = torch.einsum("bhqd,bhkd->bhk", q.float(), keys.float()) * scale
    scores = scores.masked_fill(~key_mask[:, None, :], torch.finfo(torch.float32).min)
    probs = scores.softmax(-1)
    p = past_k.shape[2]
    keep = probs[..., :p].topk(int(sparsity * p), dim=-1)
    weights = torch.zeros_like(probs)
    weights.scatter_(-1, keep.indices, keep.values)
    weights[..., p] = probs[..., p]
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    out = torch.einsum("bhk,bhkd->bhd", weights, vals.float())
    return out.reshape(q.shape[0], 1, -1).to(q.dtype)


def reference(spec: ModelSpec, source, policy: Policy, ids: torch.Tensor, mask: torch.Tensor,
              gen_len: int, batch_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy tokens (n, gen_len) and last-position logits (n, gen_len, vocab), float32.

    Sequences are independent; batch_size rows at a time (all by default) gives the matrix
    products the engine's GPU batches have, so float rounding, and with it a quantised cache
    value on a rounding boundary, comes out the same.
    """
    parts = reference_parts(spec, source, policy)
    step = batch_size or ids.shape[0]
    results = [_greedy(spec, parts, policy, ids[r:r + step], mask[r:r + step], gen_len)
               for r in range(0, ids.shape[0], step)]
    return torch.cat([t for t, _ in results]), torch.cat([lg for _, lg in results])


def _greedy(spec, parts, policy, ids, mask, gen_len):
    fam, scale = families.get(spec.family), families.score_scale(spec)
    config = cache_config(policy, spec)

    def stored(rows):  # what a past row reads back as: groups along head_dim
        return roundtrip(rows, config) if policy.compress_cache else rows

    batch = BatchState(ids, mask, gen_len, torch.device("cpu"))
    cache = [{"k": None, "v": None} for _ in range(spec.num_layers)]  # stored (b, nkv, p, d)
    logits_seen = []
    for i in range(gen_len):
        start, t = batch.window(i)
        positions = batch.positions[:, start:start + t]
        ids_i = batch.ids if i == 0 else batch.outputs[:, i - 1:i]
        mask_i = ops.attention_mask(batch.key_mask[:, :start + t], start, t)
        x = fam.embed(spec, parts[0], ids_i, positions)
        for j in range(spec.num_layers):
            w = parts[j + 1]
            q, k, v = fam.attention_inputs(spec, w, x, positions)
            if i == 0:
                attn = ops.attention(q, k, v, mask_i, scale)
            elif policy.attn_sparsity < 1.0:
                attn = topk_attention(q, cache[j]["k"], cache[j]["v"], k, v,
                                      batch.key_mask[:, :start + 1], scale,
                                      policy.attn_sparsity, policy.attn_renormalize)
            else:  # past rows from storage, the new row exact
                attn = ops.attention(q, torch.cat([cache[j]["k"], k], 2),
                                     torch.cat([cache[j]["v"], v], 2), mask_i, scale)
            for name, rows in (("k", k), ("v", v)):
                old = cache[j][name]
                cache[j][name] = stored(rows) if old is None else torch.cat([old, stored(rows)],
                                                                            2)
            x = fam.mlp(spec, w, fam.attention_output(spec, w, attn, x))
        logits = fam.head(spec, parts[-1], x[:, -1:])[:, 0]
        logits_seen.append(logits)
        batch.outputs[:, i] = logits.argmax(-1)
    return batch.outputs, torch.stack(logits_seen, 1)
