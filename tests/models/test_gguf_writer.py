"""The GGUF writer: its files read back through our reader to the same tensors, and load in
transformers' own GGUF reader (gguf_file=, which we did not write) to the engine's greedy
tokens; OPT and unwritable precisions refused by name."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flexgen_lab.engine.engine import Engine
from flexgen_lab.engine.policy import Policy
from flexgen_lab.models.gguf import GGUFWeights, open_reader, unpermute_rows
from flexgen_lab.models.gguf_writer import NoGGUFForm, permute_rows, synthetic_vocab, write_gguf
from flexgen_lab.models.spec import ModelSpec
from flexgen_lab.models.weights import DummyWeights, part_names
from flexgen_lab.workload import synthetic_prompts
from tests.models.test_gguf import llama_cpp_permute

PRECISIONS = [torch.float32, torch.float16, torch.bfloat16]


@settings(max_examples=25, deadline=None)
@given(n_head=st.integers(1, 6), half=st.integers(1, 8), cols=st.sampled_from([(), (3,), (5,)]))
def test_permute_is_llama_cpps_and_the_readers_inverse(n_head, half, cols):
    w = torch.randn(n_head * 2 * half, *cols)
    assert torch.equal(permute_rows(w, n_head), llama_cpp_permute(w, n_head))
    assert torch.equal(unpermute_rows(permute_rows(w, n_head), n_head), w)


@pytest.fixture(scope="module")
def tiny():
    spec = ModelSpec.from_name("llama-tiny")
    return spec, DummyWeights(spec, seed=3)


@pytest.mark.parametrize("dtype", PRECISIONS)
def test_round_trip_through_our_reader(tiny, dtype, tmp_path):
    spec, weights = tiny
    path = write_gguf(weights, spec, dtype, tmp_path / "m.gguf")
    back = GGUFWeights(path, name=spec.name)
    # the file stores rms eps as float32: everything else is exactly the spec
    assert back.spec == dataclasses.replace(spec, norm_eps=back.spec.norm_eps)
    assert back.spec.norm_eps == pytest.approx(spec.norm_eps, rel=1e-6)
    for part, layer in part_names(spec):
        ours, read = weights.part(part, layer, torch.float32), back.part(part, layer, torch.float32)
        assert ours.keys() == read.keys()
        for name, tensor in ours.items():  # 2-D in the file's precision, 1-D in F32
            expect = tensor.to(dtype).float() if tensor.dim() > 1 else tensor
            assert torch.equal(read[name], expect), (part, layer, name)
    types = {t.name: t.tensor_type.name for t in open_reader(path).tensors}
    assert types["blk.0.attn_q.weight"] == {torch.float32: "F32", torch.float16: "F16",
                                            torch.bfloat16: "BF16"}[dtype]
    assert types["blk.0.attn_norm.weight"] == "F32"


def test_tied_head_and_gqa_and_the_vocabulary(tmp_path):
    spec = dataclasses.replace(ModelSpec.from_name("llama-tiny"), tie_embeddings=True,
                               num_kv_heads=1, vocab=300, bos_token_id=5, eos_token_id=6)
    path = write_gguf(DummyWeights(spec, 0), spec, torch.float32, tmp_path / "t.gguf")
    reader = open_reader(path)
    assert "output.weight" not in {t.name for t in reader.tensors}
    assert GGUFWeights(path).spec.tie_embeddings and GGUFWeights(path).spec.num_kv_heads == 1
    tokens, scores, types = synthetic_vocab(spec)
    assert len(set(tokens)) == len(tokens) == len(scores) == len(types) == 300
    assert (tokens[0], tokens[5], tokens[6]) == ("<unk>", "<s>", "</s>")
    assert tokens.count("<0x0A>") == 1  # llama.cpp looks up the newline byte token


def test_transformers_reads_the_file_to_the_engines_greedy_tokens(tiny, tmp_path):
    """transformers' gguf_file= reader (its own un-permutation and config mapping) is an
    independent check of the writer: same greedy tokens as our engine on the same weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec, weights = tiny
    write_gguf(weights, spec, torch.float32, tmp_path / "m.gguf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf",
                                              dtype=torch.float32).eval()
    assert hf.config.num_key_value_heads == spec.num_kv_heads
    tokenizer = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")  # the vocabulary
    assert len(tokenizer) == spec.vocab and tokenizer.eos_token_id == spec.eos_token_id
    ids, mask = synthetic_prompts(spec, 3, 12, seed=2, varied_lengths=True)
    ours = Engine(spec, weights, Policy(gpu_batch_size=3), dtype=torch.float32).generate(
        ids, mask, 8).output_ids
    with torch.no_grad():
        theirs = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8,
                             min_new_tokens=8, do_sample=False, eos_token_id=None)
    assert torch.equal(theirs[:, ids.shape[1]:], ours)


def test_opt_and_unwritable_precisions_are_refused(tmp_path):
    opt = ModelSpec.from_name("opt-tiny")
    with pytest.raises(NoGGUFForm, match=r"model=opt-tiny is of the opt family.*allowed"):
        write_gguf(DummyWeights(opt, 0), opt, torch.float32, tmp_path / "o.gguf")
    llama = ModelSpec.from_name("llama-tiny")
    with pytest.raises(NoGGUFForm, match=r"dtype=float64.*allowed: float32, float16, bfloat16"):
        write_gguf(DummyWeights(llama, 0), llama, torch.float64, tmp_path / "l.gguf")
    assert list(tmp_path.iterdir()) == []
