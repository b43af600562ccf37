"""Top-k sparse attention over the value cache equals the reference (tests/engine/reference.py),
dense-cache and compressed; only the chosen value rows cross the link."""

from __future__ import annotations

import pytest
import torch

from flexgen_lab.engine.engine import Engine
from flexgen_lab.engine.policy import Placement, Policy
from flexgen_lab.models.spec import ModelSpec
from flexgen_lab.models.weights import DummyWeights
from flexgen_lab.workload import synthetic_prompts
from tests.engine.reference import reference

GEN_LEN, PROMPT_LEN, BATCH, SPARSITY = 6, 16, 2, 0.5
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
    policy = Policy(gpu_batch_size=BATCH, num_gpu_batches=2, attn_sparsity=SPARSITY,
                    attn_renormalize=renormalize, compress_cache=compressed,
                    **PLACEMENTS[placement])
    ref, _ = reference(spec, source, policy, ids, mask, GEN_LEN, BATCH)
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
