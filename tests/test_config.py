"""Configs: every preset composes and converts; bad values fail early with a clear message."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from flexgen_lab.compose import CONF_DIR, to_run_config
from flexgen_lab.config import (
    SCHEDULES,
    ConfigError,
    HardwareConfig,
    RunConfig,
    register_configs,
)
from flexgen_lab.engine import schedule
from flexgen_lab.validation import parse_budgets, parse_bytes, validate

GROUPS = ["model", "hardware", "policy", "schedule", "compress", "workload", "store", "backend",
          "system", "distributed"]


def compose_run(overrides: list[str]) -> RunConfig:
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return to_run_config(compose(config_name="config", overrides=overrides))


def presets() -> list[tuple[str, str]]:
    return [(g, p.stem) for g in GROUPS for p in sorted((Path(CONF_DIR) / g).glob("*.yaml"))]


def test_every_group_exists_with_presets():
    for group in GROUPS:
        assert list((Path(CONF_DIR) / group).glob("*.yaml")), group


@pytest.mark.parametrize("group,option", presets())
def test_every_preset_composes_and_converts(group, option):
    cfg = compose_run([f"{group}={option}"])
    assert isinstance(cfg, RunConfig)
    if group == "model" and option != "local":
        assert cfg.model.name == option
    if group in ("schedule", "backend", "system", "distributed"):
        assert getattr(cfg, group).name == option


def test_compress_group_sets_policy_fields():
    both = compose_run(["compress=both"]).policy
    assert (both.compress_weight, both.compress_cache) == (True, True)
    cache = compose_run(["compress=cache"]).policy
    assert (cache.compress_weight, cache.compress_cache) == (False, True)
    assert compose_run(["compress=auto"]).policy.compress_weight is None


def test_paper_policy_preset_values():
    p = compose_run(["policy=paper-30b-512"]).policy
    assert (p.gpu_batch_size, p.num_gpu_batches) == (48, 3)
    assert (p.weights.gpu, p.weights.cpu, p.cache.cpu, p.activations.cpu) == (0.2, 0.8, 1, 1)
    assert p.cpu_delegation is True


def test_default_config_is_valid():
    spec = validate(compose_run([]))
    assert spec.name == "opt-125m"


def test_schedules_in_config_are_implemented():
    for name in SCHEDULES:
        assert list(schedule.steps(name, 1, 1, 1))


@pytest.mark.parametrize("overrides,needle", [
    (["policy.weights.gpu=1.5"], "policy.weights.gpu=1.5"),
    (["policy.cache.gpu=0.7", "policy.cache.cpu=0.5"], "policy.cache.gpu + policy.cache.cpu"),
    (["policy.activations.cpu=-0.1"], "policy.activations.cpu=-0.1"),
    (["policy.gpu_batch_size=0"], "policy.gpu_batch_size=0"),
    (["policy.num_gpu_batches=-2"], "policy.num_gpu_batches=-2"),
    (["workload.gen_len=0"], "workload.gen_len=0"),
    (["workload.prompt_len=2040"], "max positions 2048"),
    (["workload.num_prompts=6"], "multiple of the block"),
    (["dtype=float64"], "dtype='float64'"),
    (["hardware.gpu_mem=lots"], "hardware.gpu_mem='lots'"),
    (["hardware.cpu_mem=-5"], "hardware.cpu_mem=-5"),
    (["policy.attn_sparsity=0"], "policy.attn_sparsity=0"),
    (["compress=auto"], "only policy=search"),
    (["model.name=gpt-17"], "model.name='gpt-17'"),
    (["policy.compress_bits=3"], "policy.compress_bits=3"),
    (["engine.io_workers=0"], "engine.io_workers=0"),
    (["hardware.io_workers=1.5"], "hardware.io_workers=1.5"),
])
def test_bad_values_name_key_value_and_allowed(overrides, needle):
    with pytest.raises(ConfigError) as err:
        validate(compose_run(overrides))
    assert needle in str(err.value)


def test_several_problems_are_reported_together():
    with pytest.raises(ConfigError) as err:
        validate(compose_run(["policy.gpu_batch_size=0", "workload.gen_len=-1"]))
    assert "policy.gpu_batch_size=0" in str(err.value) and "workload.gen_len=-1" in str(err.value)


@pytest.mark.parametrize("override", ["+policy.foo=1", "+bogus=2", "+workload.extra.deep=3"])
def test_appended_keys_are_refused(override):
    with pytest.raises(ConfigError, match="unknown config key"):
        compose_run([override])


def test_wrong_types_fail_at_compose():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException):
        compose_run(["policy.gpu_batch_size=abc"])
    with pytest.raises(ConfigCompositionException):
        compose_run(["policy.nonexistent=1"])


@pytest.mark.parametrize("value,expected", [
    (1024, 1024), ("16GiB", 16 * 2**30), ("15GB", 15 * 10**9), ("1.5TB", 15 * 10**11),
    ("512MiB", 512 * 2**20), ("2048", 2048), ("3 kib", 3 * 1024),
])
def test_parse_bytes_units(value, expected):
    assert parse_bytes(value, "hardware.gpu_mem") == expected


@pytest.mark.parametrize("value", ["16 parsecs", "", 0, -1, "GiB", True])
def test_parse_bytes_rejects(value):
    with pytest.raises(ConfigError, match="hardware.gpu_mem"):
        parse_bytes(value, "hardware.gpu_mem")


def test_parse_budgets_reads_every_tier_and_names_every_bad_one():
    hardware = HardwareConfig(gpu_mem="1KiB", cpu_mem=2048, disk_mem="1GB")
    assert parse_budgets(hardware) == {"gpu": 1024, "cpu": 2048, "disk": 10**9}
    with pytest.raises(ConfigError, match=r"hardware.gpu_mem='lots'.*; hardware.disk_mem=0"):
        parse_budgets(HardwareConfig(gpu_mem="lots", disk_mem=0))
    with pytest.raises(ConfigError) as err:  # validate reports them with the other problems
        validate(compose_run(["hardware.gpu_mem=lots", "hardware.disk_mem=0",
                              "workload.gen_len=0"]))
    assert all(key in str(err.value) for key in ("gpu_mem", "disk_mem", "workload.gen_len"))
