"""Compressed runs equal a resident reference written here, in which weights and stored KV
rows pass through compress.py's own round trip at the same points, for every placement
(delegation included: the combination the paper switched off)."""

from __future__ import annotations

import pytest
import torch

from flexgen_lab.engine.batch import BatchState, Callbacks
from flexgen_lab.engine.compress import CompressionConfig, roundtrip
from flexgen_lab.engine.engine import Engine
from flexgen_lab.engine.policy import Placement, Policy
from flexgen_lab.models import families, ops
from flexgen_lab.models.spec import ModelSpec
from flexgen_lab.models.weights import DummyWeights, part_names
from flexgen_lab.workload import synthetic_prompts

GEN_LEN, PROMPT_LEN, BATCH = 6, 12, 4
WEIGHT_RT = CompressionConfig(4, 64, 0)
CACHE_RT = CompressionConfig(4, 64, -1)


def reference(spec, source, ids, mask, compress_weight: bool, compress_cache: bool):
    """Greedy generation: exact compute, except weights and cache rows read from storage."""
    fam, scale = families.get(spec.family), families.score_scale(spec)
    parts = []
    for part, layer in part_names(spec):
        tensors = source.part(part, layer, torch.float32)
        parts.append({n: roundtrip(t, WEIGHT_RT) if compress_weight and t.dim() >= 2 else t
                      for n, t in tensors.items()})
    if spec.tie_embeddings:
        parts[-1]["embed_tokens.weight"] = parts[0]["embed_tokens.weight"]
    stored = (lambda x: roundtrip(x, CACHE_RT)) if compress_cache else (lambda x: x)
    batch = BatchState(ids, mask, GEN_LEN, torch.device("cpu"))
    cache = [{"k": [], "v": []} for _ in range(spec.num_layers)]  # stored rows (1, b, nkv, d)
    logits_seen = []
    for i in range(GEN_LEN):
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
            else:  # past rows from storage, the new row exact
                past_k = torch.cat(cache[j]["k"]).permute(1, 2, 0, 3)
                past_v = torch.cat(cache[j]["v"]).permute(1, 2, 0, 3)
                attn = ops.attention(q, torch.cat([past_k, k], 2), torch.cat([past_v, v], 2),
                                     mask_i, scale)
            for name, rows in (("k", k), ("v", v)):
                cache[j][name] += list(stored(rows.permute(2, 0, 1, 3)).split(1))
            x = fam.mlp(spec, w, fam.attention_output(spec, w, attn, x))
        logits = fam.head(spec, parts[-1], x[:, -1:])[:, 0]
        logits_seen.append(logits)
        batch.outputs[:, i] = logits.argmax(-1)
    return batch.outputs, torch.stack(logits_seen, 1)


class Logits(Callbacks):
    def __init__(self):
        self.seen = {}

    def on_logits(self, token, batch, logits):
        self.seen[token] = logits.clone()


PLACEMENTS = {
    "resident": {},
    "mixed": dict(weights=Placement(0.3, 0.4), cache=Placement(0.25, 0.25)),
    "delegated": dict(weights=Placement(0, 0.5), cache=Placement(0.25, 0.5),
                      cpu_delegation=True),
}


@pytest.mark.parametrize("model", ["opt-tiny", "llama-tiny"])
@pytest.mark.parametrize("compress", [(True, False), (False, True), (True, True)],
                         ids=["weight", "cache", "both"])
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_compressed_engine_equals_round_trip_reference(model, compress, placement, tmp_path):
    spec = ModelSpec.from_name(model)
    source = DummyWeights(spec, seed=7)
    ids, mask = synthetic_prompts(spec, BATCH, PROMPT_LEN, seed=3, varied_lengths=True)
    ref_tokens, ref_logits = reference(spec, source, ids, mask, *compress)
    policy = Policy(gpu_batch_size=BATCH, compress_weight=compress[0],
                    compress_cache=compress[1], **PLACEMENTS[placement])
    seen = Logits()
    with Engine(spec, source, policy, callbacks=seen, offload_dir=tmp_path) as engine:
        out = engine.generate(ids, mask, GEN_LEN)
    assert torch.equal(out.output_ids, ref_tokens)
    ours = torch.stack([seen.seen[i] for i in range(GEN_LEN)], 1)
    torch.testing.assert_close(ours, ref_logits, atol=1e-4, rtol=0)


def test_compression_changes_the_logits():
    """The reference is not vacuous: round trips really perturb what the model computes."""
    spec = ModelSpec.from_name("llama-tiny")
    source = DummyWeights(spec, seed=7)
    ids, mask = synthetic_prompts(spec, BATCH, PROMPT_LEN, seed=3)
    _, exact = reference(spec, source, ids, mask, False, False)
    _, packed = reference(spec, source, ids, mask, True, True)
    assert (exact - packed).abs().max() > 1e-3
