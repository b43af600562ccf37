"""Model shapes and byte arithmetic against the paper's table (facts §9) and HF configs."""

from __future__ import annotations

import json

import pytest

from flexgen_lab.models.spec import PRESETS, ModelSpec

# facts §9: fp16 weight bytes in GB (the table's GB are decimal, rounded)
PAPER_FP16_GB = {"opt-125m": 0.25, "opt-1.3b": 2.6, "opt-6.7b": 13.3, "opt-13b": 25.7,
                 "opt-30b": 60, "opt-66b": 132, "opt-175b": 350}


@pytest.mark.parametrize("name,gb", PAPER_FP16_GB.items())
def test_opt_weight_bytes_match_the_paper(name, gb):
    assert ModelSpec.from_name(name).weight_bytes(2) / 1e9 == pytest.approx(gb, rel=0.03)


def test_llama_presets_have_published_parameter_counts():
    assert ModelSpec.from_name("llama-2-7b").num_params() == pytest.approx(6.74e9, rel=0.01)
    assert ModelSpec.from_name("llama-3-8b").num_params() == pytest.approx(8.03e9, rel=0.01)
    assert ModelSpec.from_name("tinyllama-1.1b").num_params() == pytest.approx(1.1e9, rel=0.01)
    assert ModelSpec.from_name("smollm2-135m").num_params() == pytest.approx(134.5e6, rel=0.01)


def test_kv_cache_and_hidden_bytes():
    spec = ModelSpec.from_name("opt-30b")
    # FlexGen's cache_bytes: 2 (K, V) x batch x seq x layers x hidden x 2 bytes
    assert spec.kv_cache_bytes(batch=144, seq=544, dtype_bytes=2) == 2 * 144 * 544 * 48 * 7168 * 2
    gqa = ModelSpec.from_name("llama-3-8b")
    assert gqa.kv_cache_bytes(1, 1, 2) == 2 * 32 * 8 * 128 * 2
    assert spec.hidden_bytes(4, 512, 2) == 4 * 512 * 7168 * 2


def test_every_preset_has_consistent_heads():
    for spec in PRESETS.values():
        assert spec.num_heads % spec.num_kv_heads == 0


def test_unknown_preset_and_unsupported_configs(tmp_path):
    with pytest.raises(ValueError, match="allowed"):
        ModelSpec.from_name("opt-350m")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="model_type='gpt2'"):
        ModelSpec.from_hf_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "opt", "hidden_size": 1024, "word_embed_proj_dim": 512}))
    with pytest.raises(ValueError, match="opt-350m"):
        ModelSpec.from_hf_config(tmp_path)
