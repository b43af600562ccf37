"""system=deepspeed: refused before any work where CUDA is absent (its CUDA path is unverified)."""

from __future__ import annotations

import os
import subprocess

import pytest
import torch

from flexgen_lab.baselines.deepspeed_zero import ds_config
from tests.conftest import python_cli


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_refused_without_cuda_before_any_work(tmp_path):
    out = subprocess.run(python_cli("run", "system=deepspeed", "model=opt-tiny", "workload=tiny",
                                    "store.path=r.sqlite", "engine.offload_dir=off"),
                         cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "HYDRA_FULL_ERROR": "0"})
    assert out.returncode == 2, out.stderr
    assert "system=deepspeed needs CUDA" in out.stderr and "Traceback" not in out.stderr
    assert list(tmp_path.iterdir()) == []  # no store, no offload directory, no export


def test_zero_inference_config_offloads_every_parameter():
    config = ds_config(torch.float16, 64, 4, "nvme", "/scratch")
    zero = config["zero_optimization"]
    assert zero["stage"] == 3 and zero["stage3_param_persistence_threshold"] == 0
    assert zero["offload_param"]["device"] == "nvme"
    assert zero["offload_param"]["nvme_path"] == "/scratch"
    assert config["fp16"]["enabled"] and not config["bf16"]["enabled"]
    assert "nvme_path" not in ds_config(torch.bfloat16, 64, 4, "cpu", None)[
        "zero_optimization"]["offload_param"]
