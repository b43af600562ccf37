"""GGUF weights: llama.cpp's Q/K permutation undone, bad files refused, and SmolLM2-135M-Instruct
(the fetched Q4_1 file) generating transformers' own greedy tokens through the engine.

The reference is transformers' LlamaForCausalLM loaded from the same file with gguf_file=
(its own dequantisation and un-permutation); ours reads the file with models/gguf.py.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flexgen_lab.engine.engine import Engine
from flexgen_lab.engine.policy import Placement, Policy
from flexgen_lab.engine.tiers import Tiers
from flexgen_lab.models.gguf import GGUFWeights, open_reader, unpermute_rows
from flexgen_lab.workload import corpus_prompts

GEN_LEN = 8


def llama_cpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """convert_hf_to_gguf.py's LlamaModel.permute, written out as llama.cpp has it."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


@settings(max_examples=25, deadline=None)
@given(n_head=st.integers(1, 6), half=st.integers(1, 8), cols=st.sampled_from([(), (3,), (5,)]))
def test_unpermute_inverts_llama_cpp_permute(n_head, half, cols):
    w = torch.randn(n_head * 2 * half, *cols)
    assert torch.equal(unpermute_rows(llama_cpp_permute(w, n_head), n_head), w)
    if half > 1:  # a permutation that changed nothing would pass the line above too
        assert not torch.equal(llama_cpp_permute(w, n_head), w)


@pytest.mark.parametrize("content", [b"", b"GGUF" + bytes(40), b"not a gguf file at all"])
def test_bad_file_names_file_and_key(tmp_path, content):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(content)
    with pytest.raises(ValueError, match=r"model.path=.*broken\.gguf"):
        open_reader(bad)


def test_spec_from_metadata(smollm2):
    weights, _ = smollm2
    s = weights.spec
    assert (s.num_layers, s.hidden, s.num_heads, s.num_kv_heads, s.ffn) == (30, 576, 9, 3, 1536)
    assert (s.vocab, s.tie_embeddings, s.rope_theta) == (49152, True, 100000.0)


def test_weights_equal_transformers_dequantised(smollm2, smollm2_hf):
    """Q4_1 layers, the Q8_0 embedding and F32 norms: ours equal transformers' tensors."""
    weights, _ = smollm2
    ref = smollm2_hf.state_dict()
    for name, tensor in weights.part("layer", 7, torch.float32).items():
        torch.testing.assert_close(tensor, ref[f"model.layers.7.{name}"], rtol=0, atol=0)
    torch.testing.assert_close(weights.part("embed", None, torch.float32)["embed_tokens.weight"],
                               ref["model.embed_tokens.weight"], rtol=0, atol=0)


POLICIES = {
    "resident": (Policy(gpu_batch_size=2, num_gpu_batches=2), "zigzag"),
    "offloaded": (Policy(gpu_batch_size=2, num_gpu_batches=2, weights=Placement(0.2, 0.8),
                         cache=Placement(0.0, 1.0), activations=Placement(0.0, 1.0),
                         cpu_delegation=True), "row_by_row"),
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", POLICIES)
def test_greedy_tokens_equal_transformers(smollm2, smollm2_hf, corpus_documents, kind,
                                          tmp_path):
    """Four corpus passages of different lengths, left padded, float32."""
    weights, tokenizer = smollm2
    ids, mask = corpus_prompts(tokenizer, weights.spec, 4, 16, seed=3, documents=corpus_documents)
    assert len(set(mask.sum(1).tolist())) > 1, "the prompts must differ in length"
    with torch.no_grad():
        ref = smollm2_hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=GEN_LEN,
                                  min_new_tokens=GEN_LEN, do_sample=False, eos_token_id=None)
    policy, schedule = POLICIES[kind]
    tiers = Tiers(2**33, 2**33, 2**34, torch.device("cpu"), pin_memory=False)
    with Engine(weights.spec, weights, policy, schedule, tiers=tiers,
                offload_dir=str(tmp_path)) as engine:
        ours = engine.generate(ids, mask, GEN_LEN)
    assert torch.equal(ours.output_ids, ref[:, ids.shape[1]:])


def test_identity_follows_the_file_and_truncation_is_refused(tmp_path):
    """The weight cache's key names the file, its size and mtime (as for directories); a
    truncated copy (the whole header, a part of the tensors) is refused naming the file."""
    from tests.conftest import fetched

    path = fetched("smollm2-135m-instruct")
    weights = GGUFWeights(path)
    st = path.stat()
    assert all(str(x) in weights.identity() for x in (path.resolve(), st.st_size,
                                                      st.st_mtime_ns))
    cut = tmp_path / "m.gguf"
    with open(path, "rb") as f:
        cut.write_bytes(f.read(4 << 20))  # the metadata ends near 1.8 MB
    with pytest.raises(ValueError, match=r"model.path=.*m\.gguf.*truncated"):
        open_reader(cut)
