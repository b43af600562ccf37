"""The original's midpoint rule: the digest's worked examples, and every -asrun preset."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from flexgen_lab.compose import CONF_DIR, compose_run_config
from flexgen_lab.config import PolicyConfig, RunConfig
from flexgen_lab.engine.policy import Placement
from flexgen_lab.models.spec import ModelSpec
from flexgen_lab.planner.asrun import (
    as_run_activations,
    as_run_cache,
    as_run_policy,
    as_run_weights,
    layer_objects,
    midpoint_homes,
    midpoint_percents,
    paper_pin_weight,
)
from flexgen_lab.runner import to_policy

OPT_30B = ModelSpec.from_name("opt-30b")
PRESET_ROUNDING = 1e-6  # -asrun presets hold gpu and gpu + cpu rounded to 6 decimals
STATED = sorted(p.stem for p in (Path(CONF_DIR) / "policy").glob("paper-*.yaml")
                if not p.stem.endswith("-asrun"))


def load_policy(name: str):
    """The preset `policy=NAME` as a Policy: its YAML over the PolicyConfig schema, which is
    what composing it does (one real compose below; twelve would take seconds)."""
    yaml = OmegaConf.load(Path(CONF_DIR) / "policy" / f"{name}.yaml")
    policy = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(PolicyConfig), yaml))
    return to_policy(RunConfig(policy=policy))


def sizes(tensors: list[tuple[str, int]]) -> list[int]:
    return [size for _, size in tensors]


def test_matrix_midpoints_are_the_digests():
    """Digest §2.2: attention's four h x h matrices sit at 12.5/37.5/62.5/87.5 %, the MLP's
    two 4h^2 matrices at about 25 and 75 %."""
    attention, mlp = layer_objects(OPT_30B)[1:3]
    mids = dict(zip([name for name, _ in attention], midpoint_percents(sizes(attention)),
                    strict=True))
    assert [mids[w] for w in ("w_q", "w_k", "w_v", "w_out")] == pytest.approx(
        [12.5, 37.5, 62.5, 87.5], abs=0.01)
    fc1, _, fc2, *_ = midpoint_percents(sizes(mlp))
    assert [fc1, fc2] == pytest.approx([25, 75], abs=0.01)


def test_twenty_percent_puts_only_w_out_and_the_vectors_on_the_gpu():
    attention = layer_objects(OPT_30B)[1]
    homes = midpoint_homes(sizes(attention), Placement(gpu=0.2, cpu=0.8))
    on_gpu = [name for (name, _), home in zip(attention, homes, strict=True) if home == "gpu"]
    assert on_gpu == ["w_out", "b_out", "ln_w", "ln_b"]


@pytest.mark.parametrize("gpu,cpu,digest_gpu", [  # digest §2.2's table, OPT-30B
    (0.20, 0.80, 0.082), (0.25, 0.75, 0.082), (0.04, 0.96, 0.001), (0.10, 0.90, 0.001),
    (0.30, 0.70, 0.407), (0.50, 0.50, 0.50)])
def test_opt_30b_shares_match_the_digest(gpu, cpu, digest_gpu):
    got = as_run_weights(OPT_30B, Placement(gpu=gpu, cpu=cpu))
    assert got.gpu == pytest.approx(digest_gpu, abs=0.0005)  # the digest gives 0.1 % steps
    assert got.gpu + got.cpu + got.disk == pytest.approx(1)


def test_a_midpoint_on_a_bound_goes_to_the_next_tier():
    """get_choice compares with `<`: a midpoint equal to a bound passes it; none exceeds 100."""
    assert midpoint_homes([1, 2, 1], Placement(gpu=0.5, cpu=0.0)) == ["disk", "gpu", "gpu"]
    assert midpoint_homes([1, 1], Placement(gpu=0.0, cpu=0.5)) == ["disk", "cpu"]


@pytest.mark.parametrize("gpu,cpu", [(1, 0), (0, 1), (0, 0)])
def test_one_tier_placements_are_unchanged(gpu, cpu):
    got = as_run_weights(ModelSpec.from_name("opt-175b"), Placement(gpu=gpu, cpu=cpu))
    assert (got.gpu, got.cpu, got.disk) == (gpu, cpu, 1 - gpu - cpu)


def test_cache_splits_by_whole_sequences_and_activations_never_split():
    assert as_run_cache(Placement(0.5, 0.5), gpu_batch_size=1, num_heads=4).gpu == 0
    assert as_run_cache(Placement(0.5, 0.5), gpu_batch_size=3, num_heads=4).gpu == 1 / 3
    split = as_run_cache(Placement(0.3, 0.3), gpu_batch_size=10, num_heads=4)
    assert (split.gpu, split.cpu, split.disk) == pytest.approx((0.3, 0.3, 0.4))
    assert as_run_cache(Placement(0, 0), gpu_batch_size=7, num_heads=4).disk == 1
    with pytest.raises(ValueError, match="one tier"):
        as_run_activations(Placement(0.5, 0.5))


def test_only_opt_is_placed():
    with pytest.raises(ValueError, match="OPT only"):
        layer_objects(ModelSpec.from_name("llama-tiny"))


def test_every_stated_paper_preset_has_an_asrun_preset():
    assert len(STATED) == 15  # Table 2 (12) and Table 3 (-x4: 3)
    for name in STATED:
        assert (Path(CONF_DIR) / "policy" / f"{name}-asrun.yaml").is_file(), name


def test_an_asrun_preset_composes_like_any_other():
    cfg = compose_run_config(["policy=paper-30b-512-asrun", "model=opt-30b"])
    assert to_policy(cfg) == load_policy("paper-30b-512-asrun")
    assert cfg.policy.weights.gpu == pytest.approx(0.0819, abs=1e-4)  # "20 %" ran as ~8 %


@pytest.mark.parametrize("name", STATED)
def test_asrun_preset_is_the_rule_applied_to_the_stated_one(name):
    """Weights as recomputed (within the presets' rounding); cache and activations as the
    original split them; pinning as the paper's commands ran; everything else identical."""
    spec = ModelSpec.from_name(f"opt-{name.split('-')[1]}")
    stated, asrun = load_policy(name), load_policy(f"{name}-asrun")
    expected = as_run_policy(spec, stated, pin_weight=paper_pin_weight(spec))
    assert asrun.weights.gpu == pytest.approx(expected.weights.gpu, abs=PRESET_ROUNDING)
    assert asrun.weights.cpu == pytest.approx(expected.weights.cpu, abs=2 * PRESET_ROUNDING)
    assert asrun.weights.disk == pytest.approx(expected.weights.disk, abs=PRESET_ROUNDING)
    assert dataclasses.replace(asrun, weights=expected.weights) == expected
