"""Top-k sparse attention over the value cache equals a reference written here, dense-cache
and compressed; only the chosen value rows cross the link."""

from __future__ import annotations

import pytest
import torch

from flexgen_lab.engine.batch import BatchState
from flexgen_lab.engine.compress import CompressionConfig, roundtrip
from flexgen_lab.engine.engine import Engine
from flexgen_lab.engine.policy import Placement, Policy
from flexgen_lab.models import families, ops
from flexgen_lab.models.spec import ModelSpec
from flexgen_lab.models.weights import DummyWeights, part_names
from flexgen_lab.workload import synthetic_prompts

GEN_LEN, PROMPT_LEN, BATCH, SPARSITY = 6, 16, 2, 0.5
CACHE_RT = CompressionConfig(4, 64, -1)


def topk_attention(q, past_k, past_v, k_new, v_new, key_mask, scale, sparsity, renormalize):
    """q (b, nh, 1, d); past (b, nkv, p, d); new (b, nkv, 1, d); key_mask (b, p+1)."""
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


def reference(spec, source, ids, mask, compressed: bool, renormalize: bool):
    fam, scale = families.get(spec.family), families.score_scale(spec)
    parts = [source.part(part, j, torch.float32) for part, j in part_names(spec)]
    if spec.tie_embeddings:
        parts[-1]["embed_tokens.weight"] = parts[0]["embed_tokens.weight"]
    stored = (lambda x: roundtrip(x, CACHE_RT)) if compressed else (lambda x: x)
    batch = BatchState(ids, mask, GEN_LEN, torch.device("cpu"))
    cache = [{"k": None, "v": None} for _ in range(spec.num_layers)]  # (b, nkv, p, d)
    for i in range(GEN_LEN):
        start, t = batch.window(i)
        positions = batch.positions[:, start:start + t]
        x = fam.embed(spec, parts[0], batch.ids if i == 0 else batch.outputs[:, i - 1:i],
                      positions)
        for j in range(spec.num_layers):
            w = parts[j + 1]
            q, k, v = fam.attention_inputs(spec, w, x, positions)
            if i == 0:
                mask_i = ops.attention_mask(batch.key_mask[:, :t], 0, t)
                attn = ops.attention(q, k, v, mask_i, scale)
                cache[j] = {"k": stored(k), "v": stored(v)}  # groups along head_dim
            else:
                attn = topk_attention(q, cache[j]["k"], cache[j]["v"], k, v,
                                      batch.key_mask[:, :start + 1], scale, SPARSITY,
                                      renormalize)
                for name, new in (("k", k), ("v", v)):
                    cache[j][name] = torch.cat([cache[j][name], stored(new)], 2)
            x = fam.mlp(spec, w, fam.attention_output(spec, w, attn, x))
        batch.outputs[:, i] = fam.head(spec, parts[-1], x[:, -1:])[:, 0].argmax(-1)
    return batch.outputs


PLACEMENTS = {
    "gpu": {}, "cpu": dict(cache=Placement(0, 1)), "disk": dict(cache=Placement(0, 0)),
    "mixed delegated": dict(cache=Placement(0.5, 0.25), cpu_delegation=True),
}


@pytest.mark.parametrize("model", ["opt-tiny", "llama-tiny"])
@pytest.mark.parametrize("compressed", [False, True], ids=["dense-cache", "compressed"])
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_sparse_engine_equals_topk_reference(model, compressed, placement, tmp_path):
    spec = ModelSpec.from_name(model)
    source = DummyWeights(spec, seed=1)
    ids, mask = synthetic_prompts(spec, BATCH * 2, PROMPT_LEN, seed=4, varied_lengths=True)
    renormalize = placement == "cpu"
    ref = torch.cat([reference(spec, source, ids[r:r + BATCH], mask[r:r + BATCH], compressed,
                               renormalize) for r in (0, BATCH)])
    policy = Policy(gpu_batch_size=BATCH, num_gpu_batches=2, attn_sparsity=SPARSITY,
                    attn_renormalize=renormalize, compress_cache=compressed,
                    **PLACEMENTS[placement])
    with Engine(spec, source, policy, offload_dir=tmp_path) as engine:
        out = engine.generate(ids, mask, GEN_LEN)
    assert torch.equal(out.output_ids, ref)


def test_sparsity_changes_the_tokens_it_should():
    spec = ModelSpec.from_name("llama-tiny")
    source = DummyWeights(spec, seed=1)
    ids, mask = synthetic_prompts(spec, BATCH, PROMPT_LEN, seed=4)
    dense = Engine(spec, source, Policy(gpu_batch_size=BATCH)).generate(ids, mask, GEN_LEN)
    sparse = Engine(spec, source, Policy(gpu_batch_size=BATCH, attn_sparsity=0.1)).generate(
        ids, mask, GEN_LEN)
    assert not torch.equal(dense.output_ids, sparse.output_ids)


def test_only_the_chosen_value_rows_are_loaded(tmp_path):
    spec = ModelSpec.from_name("opt-tiny")
    ids, mask = synthetic_prompts(spec, BATCH, PROMPT_LEN, seed=0)
    policy = Policy(gpu_batch_size=BATCH, cache=Placement(0, 1), attn_sparsity=SPARSITY)
    with Engine(spec, DummyWeights(spec, 0), policy, offload_dir=tmp_path) as engine:
        moved = engine.generate(ids, mask, GEN_LEN).link_bytes["decode"]["cpu_to_gpu"]
    L, kv, nh, d, f32 = spec.num_layers, spec.kv_dim, spec.num_heads, spec.head_dim, 4
    keys = sum(L * (PROMPT_LEN + i - 1) * BATCH * kv * f32 for i in range(1, GEN_LEN))
    # per (sequence, head): int(0.5 p) past value rows; the (k + 1)-th is the new row itself
    values = sum(L * BATCH * nh * int(SPARSITY * (PROMPT_LEN + i - 1)) * d * f32
                 for i in range(1, GEN_LEN))
    assert moved == keys + values
