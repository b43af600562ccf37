"""Compressed runs equal the reference (tests/engine/reference.py), in which weights and stored
KV rows pass through compress.py's own round trip at the same points, for every placement
(delegation included: the combination the paper switched off)."""

from __future__ import annotations

import pytest
import torch

from flexgen_lab.engine.batch import Callbacks
from flexgen_lab.engine.engine import Engine
from flexgen_lab.engine.policy import Placement, Policy
from flexgen_lab.engine.tiers import Tiers
from flexgen_lab.models.spec import ModelSpec
from flexgen_lab.models.weights import DummyWeights
from flexgen_lab.planner.job import Job
from flexgen_lab.planner.memory_model import peak_bytes
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


class OneTensorChanged(DummyWeights):
    """Dummy weights with one tensor of layer 0 changed in place by `change` (to values a
    float32 model holds but float16 does not)."""

    def __init__(self, spec, seed, name, change):
        super().__init__(spec, seed)
        self.name, self.change = name, change

    def identity(self) -> str:  # other bytes: another weight cache
        return f"{super().identity()}:{self.name} changed"

    def part(self, part, layer, dtype):
        tensors = super().part(part, layer, dtype)
        if (part, layer) == ("layer", 0):
            self.change(tensors[self.name])
        return tensors


@pytest.mark.parametrize("placement", ["resident", "mixed"])  # mixed: the disk weight cache too
def test_weight_beyond_float16_is_refused_naming_it(placement, tmp_path):
    spec = ModelSpec.from_name("opt-tiny")
    source = OneTensorChanged(spec, 7, "fc1.weight", lambda w: w[5, 3].fill_(-7e4))
    policy = Policy(gpu_batch_size=BATCH, compress_weight=True, **PLACEMENTS[placement])
    with pytest.raises(ValueError, match=r"weight layer0000\.fc1\.weight holds \|x\| = 7e\+04"):
        Engine(spec, source, policy, offload_dir=tmp_path)
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]  # no half-built weight cache
    with Engine(spec, source, Policy(gpu_batch_size=BATCH), offload_dir=tmp_path) as engine:
        assert engine.placed["weights"]  # uncompressed, the same weights place fine


def test_cache_beyond_float16_saturates_as_the_reference_does(tmp_path):
    """The KV cache is quantized every step, unchecked: V rows at +-1e9 and -7e4 (a bias pushes
    them there) saturate at +-65504, as the reference's round trip does; nothing turns NaN."""
    spec = ModelSpec.from_name("opt-tiny")

    def push(bias):
        bias[0::2], bias[1::2] = 1e9, -7e4

    source = OneTensorChanged(spec, 7, "self_attn.v_proj.bias", push)
    ids, mask = synthetic_prompts(spec, BATCH, PROMPT_LEN, seed=3)
    policy = Policy(gpu_batch_size=BATCH, compress_cache=True, **PLACEMENTS["mixed"])
    ref_tokens, ref_logits = reference(spec, source, policy, ids, mask, GEN_LEN)
    seen = Logits()
    with Engine(spec, source, policy, callbacks=seen, offload_dir=tmp_path) as engine:
        out = engine.generate(ids, mask, GEN_LEN)
    ours = torch.stack([seen.seen[i] for i in range(GEN_LEN)], 1)
    assert torch.isfinite(ours).all() and torch.isfinite(ref_logits).all()
    assert torch.equal(out.output_ids, ref_tokens)
    torch.testing.assert_close(ours, ref_logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("placement", ["mixed", "delegated"])
def test_half_cache_decodes_into_float32_on_a_cpu(placement, tmp_path):
    """bfloat16 on a CPU: the compressed cache decodes into float32 buffers (where the CPU's
    decode attention is fast, cache_homes.decoded_dtype), which the engine accounts and the
    memory model counts to the byte (Job.compute_on_cpu); the logits stay those of the float32
    reference to bfloat16's precision, up to the first step whose greedy token differs (8-bit
    codes: a 4-bit code flipped by bfloat16 rounding would move them more than that)."""
    spec = ModelSpec.from_name("llama-tiny")
    source = DummyWeights(spec, seed=7)
    ids, mask = synthetic_prompts(spec, BATCH, PROMPT_LEN, seed=3, varied_lengths=True)
    policy = Policy(gpu_batch_size=BATCH, compress_cache=True, compress_bits=8,
                    **PLACEMENTS[placement])
    ref_tokens, ref_logits = reference(spec, source, policy, ids, mask, GEN_LEN)
    seen, tiers = Logits(), Tiers(1 << 50, 1 << 50, 1 << 50, "cpu")
    with Engine(spec, source, policy, dtype=torch.bfloat16, callbacks=seen, tiers=tiers,
                offload_dir=tmp_path) as engine:
        out = engine.generate(ids, mask, GEN_LEN)
    job = Job(spec, policy, "zigzag", None, PROMPT_LEN, GEN_LEN, 2, compute_on_cpu=True)
    assert peak_bytes(job) == tiers.peaks()
    assert peak_bytes(job.replace(compute_on_cpu=False)) != tiers.peaks()  # half buffers
    differs = (out.output_ids != ref_tokens).any(0).tolist() + [True]
    upto = differs.index(True) + 1  # that step's logits still come from the same inputs
    assert upto >= 3  # at least two decode steps over the decoded cache
    ours = torch.stack([seen.seen[i] for i in range(GEN_LEN)], 1).float()
    torch.testing.assert_close(ours[:, :upto], ref_logits[:, :upto], atol=HALF_LOGITS, rtol=0)


# bfloat16 keeps 8 bits of mantissa: these logits (magnitude up to 4) move by up to 0.08
# through the model in it (measured); an undecoded buffer or a lost new row moves them by units
HALF_LOGITS = 0.15
