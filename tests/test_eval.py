"""Accuracy evaluation (flexgen_lab/evaluation.py) on SmolLM2-135M-Instruct and the Lee corpus.

Full precision through the engine's decode path equals transformers' own perplexity on the
same scored positions; every approximation changes the logits; the 4-bit cache is stored as
uint8 codes; the sparse variant moves only the chosen value rows.
"""

from __future__ import annotations

import math

import pytest
import torch

from flexgen_lab.engine import block_run as block_run_module
from flexgen_lab.engine.cache_homes import CacheHomes
from flexgen_lab.engine.engine import Engine
from flexgen_lab.engine.policy import Placement, Policy
from flexgen_lab.evaluation import last_word_passages, perplexity, perplexity_windows, score

PREFIX = 16
VARIANTS = {  # the Table 5 approximations (group 64), as eval's policy sets them
    "4-bit weights": dict(compress_weight=True),
    "4-bit cache": dict(compress_cache=True),
    "4-bit both": dict(compress_weight=True, compress_cache=True),
    "4-bit both + sparse 0.1": dict(compress_weight=True, compress_cache=True,
                                    attn_sparsity=0.1),
    "8-bit both": dict(compress_weight=True, compress_cache=True, compress_bits=8),
}


@pytest.fixture(scope="module")
def windows(smollm2, corpus_documents):
    _, tokenizer = smollm2
    return perplexity_windows(tokenizer, corpus_documents, 40, 40, 4)


@pytest.mark.slow
def test_full_precision_perplexity_equals_transformers(smollm2, smollm2_hf, windows):
    weights, _ = smollm2
    policy = Policy(gpu_batch_size=2, num_gpu_batches=2)
    ours = score(Engine(weights.spec, weights, policy), windows, PREFIX)
    with torch.no_grad():
        logits = smollm2_hf(input_ids=windows).logits.double()
    logp = torch.log_softmax(logits, dim=-1)[:, :-1].gather(2, windows[:, 1:, None])[..., 0]
    ref = logp[:, PREFIX:]  # predictions of tokens PREFIX + 1 .. L - 1: the decode steps'
    assert ours.logprob.shape == ref.shape == (4, 40 - PREFIX - 1)
    assert math.isclose(perplexity(ours), math.exp(-ref.mean().item()), rel_tol=1e-3)
    torch.testing.assert_close(ours.logprob, ref, atol=1e-3, rtol=0)
    argmax = logits[:, PREFIX:-1].argmax(-1) == windows[:, PREFIX + 1:]
    assert torch.equal(ours.correct, argmax)


def test_each_approximation_changes_the_logits(smollm2, windows):
    weights, _ = smollm2
    short = windows[:2, :PREFIX + 2]  # one decode-predicted token: enough to differ

    def logprob(**policy):
        return score(Engine(weights.spec, weights, Policy(gpu_batch_size=2, **policy)), short,
                     PREFIX).logprob

    full = logprob()
    for name, policy in VARIANTS.items():
        assert (logprob(**policy) - full).abs().max() > 1e-4, name


def test_cache_is_stored_as_uint8_codes_and_sparse_moves_k_values(smollm2, windows,
                                                                 monkeypatch, tmp_path):
    """The 4-bit-both + sparse variant with its cache on the cpu tier: segments hold uint8
    codes (two per byte) and fp16 scale/min pairs; decode loads every key row but only the
    top int(0.1 p) past value rows per (sequence, query head) (the (k + 1)-th is the new row,
    already on the compute side)."""
    weights, _ = smollm2
    spec, seqs = weights.spec, windows[:2, :PREFIX + 4]
    homes = []

    class Recorded(CacheHomes):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            homes.append(self)

    monkeypatch.setattr(block_run_module, "CacheHomes", Recorded)
    policy = Policy(gpu_batch_size=2, cache=Placement(0, 1), **VARIANTS["4-bit both + sparse 0.1"])
    with Engine(spec, weights, policy, offload_dir=tmp_path) as engine:
        scores = score(engine, seqs, PREFIX)
    segment = homes[0].segments[(0, 0)]["cpu"]
    assert segment.arrays["k.data"].dtype == segment.arrays["v.data"].dtype == torch.uint8
    assert segment.arrays["v.data"].shape[-1] == spec.head_dim // 2
    assert segment.arrays["v.scale_min"].dtype == torch.float16
    (generation,) = scores.generations
    moved = generation.link_bytes["decode"]
    row = spec.head_dim // 2 + 2 * 2  # one head's codes and its fp16 (scale, min) (group 64)
    steps = range(1, seqs.shape[1] - PREFIX)
    keys = sum(spec.num_layers * (PREFIX + i - 1) * 2 * spec.num_kv_heads * row for i in steps)
    values = sum(spec.num_layers * 2 * spec.num_heads * int(0.1 * (PREFIX + i - 1)) * row
                 for i in steps)
    assert moved["cpu_to_gpu"] == keys + values


def test_last_word_passages_end_with_the_word(smollm2, corpus_documents):
    _, tokenizer = smollm2
    passages, word_lens = last_word_passages(tokenizer, corpus_documents, 48, PREFIX, 6)
    assert passages.shape == (6, 48) and min(word_lens) >= 1
    for row, k, in zip(passages, word_lens, strict=True):
        word = tokenizer.decode(row[-k:]).strip()
        assert word.isalpha() and any(doc.rstrip(" .\"'").endswith(word)
                                      for doc in corpus_documents)


@pytest.mark.slow
def test_reproduce_table5_tiny_rows(smollm2, corpus_documents, tmp_path, monkeypatch, capsys):
    """Two rows of experiments/table5.yaml at the tiny scale: stored as eval runs, printed
    beside the paper's relative changes; a second reproduce runs nothing."""
    from flexgen_lab.reproduce import reproduce
    from flexgen_lab.results.store import ResultStore

    monkeypatch.chdir(tmp_path)
    args = ["experiment=table5", "reproduce.scale=tiny", "store.path=r.sqlite",
            "reproduce.only=full precision,4-bit cache"]
    path = reproduce(args)
    out = capsys.readouterr().out
    assert "| full precision | " in out and "| 4-bit cache | " in out and "+1.42" not in out
    store = ResultStore("r.sqlite")
    runs, evals = store.runs(), store.evals()
    assert list(runs.compress) == ["none", "cache"] and set(runs.status) == {"ok"}
    assert set(evals.metric) == {"perplexity", "last_word_accuracy", "scored_tokens"}
    assert (evals[evals.metric == "perplexity"].value > 1).all()
    assert path.read_text().startswith("# Table 5 analog")
    reproduce(args)
    assert len(ResultStore("r.sqlite").runs()) == 2
