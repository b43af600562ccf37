"""Weight sources: deterministic dummy weights, local safetensors only, clear errors."""

from __future__ import annotations

import pytest
import torch

from flexgen_lab.models.spec import ModelSpec
from flexgen_lab.models.weights import DummyWeights, LocalWeights, part_names


def test_dummy_weights_are_deterministic_per_seed_and_order_free():
    spec = ModelSpec.from_name("llama-tiny")
    a, b = DummyWeights(spec, 0), DummyWeights(spec, 0)
    b.part("head", None, torch.float32)  # asking in another order changes nothing
    for name, tensor in a.part("layer", 1, torch.float32).items():
        assert torch.equal(tensor, b.part("layer", 1, torch.float32)[name])
    other = DummyWeights(spec, 1).part("layer", 1, torch.float32)
    assert not torch.equal(other["mlp.up_proj.weight"],
                           a.part("layer", 1, torch.float32)["mlp.up_proj.weight"])


def test_dummy_weights_are_not_constant_and_layers_differ():
    spec = ModelSpec.from_name("opt-tiny")
    src = DummyWeights(spec, 0)
    l0, l1 = (src.part("layer", j, torch.float32) for j in (0, 1))
    assert l0["fc1.weight"].std() > 0.05
    assert not torch.equal(l0["fc1.weight"], l1["fc1.weight"])
    assert l0["final_layer_norm.weight"].mean() == pytest.approx(1.0, abs=0.05)


def test_part_names_cover_the_model_in_order():
    spec = ModelSpec.from_name("opt-tiny")
    assert part_names(spec) == [("embed", None), ("layer", 0), ("layer", 1), ("head", None)]


def test_local_weights_refuse_pickle_only_checkpoints(tmp_path, hf_checkpoint):
    path, _ = hf_checkpoint("opt-odd")
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match="pickle"):
        LocalWeights(tmp_path)


def test_local_weights_give_the_checkpoint_tensors(hf_checkpoint):
    path, model = hf_checkpoint("opt-odd")
    layer = LocalWeights(path).part("layer", 2, torch.float32)
    torch.testing.assert_close(layer["fc2.weight"], model.model.decoder.layers[2].fc2.weight,
                               rtol=0, atol=0)
