"""Shared fixtures: tiny transformers checkpoints saved to disk, and prompt batches."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Small random configs with a large init scale, so greedy tokens change from step to step.
OPT_CONFIGS = {
    # hidden 72 is not a multiple of 64
    "opt-odd": dict(vocab_size=300, hidden_size=72, num_hidden_layers=3, ffn_dim=200,
                    num_attention_heads=6, max_position_embeddings=128, init_std=0.2,
                    pad_token_id=1),
}
LLAMA_CONFIGS = {
    # grouped-query attention (6 query heads, 2 kv heads), untied head, rope_theta from config
    "llama-gqa": dict(vocab_size=300, hidden_size=72, num_hidden_layers=3, intermediate_size=200,
                      num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=128,
                      initializer_range=0.2, pad_token_id=0, tie_word_embeddings=False,
                      rope_theta=5000.0),
    # multi-query attention, tied head, biases, Llama-3-style rope scaling
    "llama-mqa-rope3": dict(vocab_size=256, hidden_size=96, num_hidden_layers=2,
                            intermediate_size=160, num_attention_heads=4, num_key_value_heads=1,
                            max_position_embeddings=128, initializer_range=0.2, pad_token_id=0,
                            tie_word_embeddings=True, attention_bias=True,
                            rope_parameters=dict(rope_type="llama3", rope_theta=10000.0,
                                                 factor=8.0, low_freq_factor=1.0,
                                                 high_freq_factor=4.0,
                                                 original_max_position_embeddings=32)),
}


def build_hf_model(name: str):
    from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    if name in OPT_CONFIGS:
        model = OPTForCausalLM(OPTConfig(**OPT_CONFIGS[name]))
    else:
        model = LlamaForCausalLM(LlamaConfig(**LLAMA_CONFIGS[name]))
    return model.eval()


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """name -> (directory with config.json + model.safetensors, the transformers model)."""
    cache = {}

    def get(name: str):
        if name not in cache:
            model = build_hf_model(name)
            path = tmp_path_factory.mktemp(name)
            model.save_pretrained(path)
            cache[name] = (path, model)
        return cache[name]

    return get


def left_padded_prompts(lengths: list[int], vocab: int, pad_id: int, seed: int = 1):
    """A batch of prompts with different lengths, left padded: (ids, mask)."""
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), pad_id)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        ids[row, width - length:] = torch.randint(3, vocab, (length,), generator=gen)
        mask[row, width - length:] = 1
    return ids, mask


def python_cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "flexgen_lab", *args]


@pytest.fixture(scope="session")
def tiny_reproductions(tmp_path_factory):
    """A directory where figure1 (simulated) and batch_sweep (measured) were reproduced at
    tiny scale: results/tables/*.csv and the store r.sqlite. Shared by the reproduce and
    notebook tests (each reproduction is real and takes seconds)."""
    where = tmp_path_factory.mktemp("reproduced")
    for name in ("figure1", "batch_sweep"):
        out = subprocess.run(python_cli("reproduce", f"experiment={name}",
                                        "reproduce.scale=tiny", f"store.path={where}/r.sqlite"),
                             capture_output=True, text=True, timeout=300, cwd=where)
        assert out.returncode == 0, out.stderr[-3000:]
    return where


def fetched(name: str):
    """A fetched artifact's path (flexgen_lab/fetch.py). Missing: the test fails under CI=true
    (CI runs the fetches first: `make test`), elsewhere it skips saying what to run."""
    from flexgen_lab.fetch import artifact_path, missing_hint

    path = artifact_path(name)
    if not path.is_file():
        message = f"{name} is not fetched: {missing_hint(name)}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct's GGUF weights (our reader) and its tokenizer."""
    from flexgen_lab.models.gguf import GGUFWeights

    weights = GGUFWeights(fetched("smollm2-135m-instruct"), name="smollm2-135m-instruct")
    return weights, weights.tokenizer


@pytest.fixture(scope="session")
def smollm2_hf():
    """The reference: transformers' own Llama, loaded from the same file with gguf_file=."""
    from transformers import AutoModelForCausalLM

    path = fetched("smollm2-135m-instruct")
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def corpus_documents():
    from flexgen_lab.corpus import load_documents

    return load_documents(fetched("corpus"))
