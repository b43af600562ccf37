"""Compressed runs equal the reference (tests/engine/reference.py), in which weights and stored
KV rows pass through compress.py's own round trip at the same points, for every placement
(delegation included: the combination the paper switched off)."""

from __future__ import annotations

import pytest
import torch

from flexgen_lab.engine.batch import Callbacks
from flexgen_lab.engine.engine import Engine
from flexgen_lab.engine.policy import Placement, Policy
from flexgen_lab.models.spec import ModelSpec
from flexgen_lab.models.weights import DummyWeights
from flexgen_lab.workload import synthetic_prompts
from tests.engine.reference import reference

GEN_LEN, PROMPT_LEN, BATCH = 6, 12, 4


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
    policy = Policy(gpu_batch_size=BATCH, compress_weight=compress[0],
                    compress_cache=compress[1], **PLACEMENTS[placement])
    ref_tokens, ref_logits = reference(spec, source, policy, ids, mask, GEN_LEN)
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
    _, exact = reference(spec, source, Policy(), ids, mask, GEN_LEN)
    _, packed = reference(spec, source, Policy(compress_weight=True, compress_cache=True), ids,
                          mask, GEN_LEN)
    assert (exact - packed).abs().max() > 1e-3
