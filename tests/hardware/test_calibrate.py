"""calibrate measures this machine and writes a profile that Hydra then finds by name."""

from __future__ import annotations

import os
import subprocess
import sys

import torch
import yaml

from flexgen_lab.engine.transfer import LINKS
from flexgen_lab.hardware.op_table import shape_key
from flexgen_lab.hardware.profile import MAX_CONTENTION, OPTIONAL_SPEEDS, SPEED_FIELDS
from flexgen_lab.models.spec import ModelSpec


def test_quick_calibration_writes_a_profile_hydra_finds(tmp_path):
    env = {**os.environ, "FLEXGEN_LAB_CONFIG_DIR": str(tmp_path / "cfg")}
    for model in ("llama-tiny", "opt-tiny"):  # the second keeps the first's table
        out = subprocess.run([sys.executable, "-m", "flexgen_lab", "calibrate", "name=here",
                              "quick=true", f"offload_dir={tmp_path / 'off'}", f"model={model}"],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
    profile = yaml.safe_load((tmp_path / "cfg" / "hardware" / "here.yaml").read_text())
    for key in (*SPEED_FIELDS, *OPTIONAL_SPEEDS):
        assert float(profile[key]) > 0, key
    assert 0 <= profile["step_overhead_s"] < 0.1  # per engine step (a measured difference)
    assert 0 <= profile["overlap_contention"] <= MAX_CONTENTION
    if not torch.cuda.is_available() and (os.cpu_count() or 1) <= 2:
        assert profile["overlap_contention"] > 0.1  # copy and compute share two cores
    assert set(profile["io_latency_s"]) == set(LINKS)
    assert all(0 < s < 0.1 for s in profile["io_latency_s"].values())
    keys = {shape_key(ModelSpec.from_name(m), 4) for m in ("llama-tiny", "opt-tiny")}
    assert set(profile["op_tables"]) == keys
    assert "calibrate on" in profile["source"] and not list((tmp_path / "off").iterdir())
    cfg = subprocess.run([sys.executable, "-m", "flexgen_lab", "run", "hardware=here",
                          "--cfg", "job"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=120)
    assert cfg.returncode == 0 and "name: here" in cfg.stdout
    assert "bw_disk_to_cpu:" in cfg.stdout and "bw_disk_to_cpu: null" not in cfg.stdout
    # runs measured with that profile, then calibrate fit=true refines it from them
    store = tmp_path / "runs.sqlite"
    runs = subprocess.run([sys.executable, "-m", "flexgen_lab", "run", "--multirun",
                           "model=opt-tiny", "hardware=here", "workload=tiny",
                           "policy.gpu_batch_size=1,2,4", "policy.weights.gpu=1,0",
                           f"engine.offload_dir={tmp_path / 'off'}", f"store.path={store}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert runs.returncode == 0, runs.stderr
    out = subprocess.run([sys.executable, "-m", "flexgen_lab", "calibrate", "fit=true",
                          "name=here", f"store.path={store}", "holdout=0.34"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "fitted on 4 runs" in out.stdout and "on 2 held-out runs: median |error|" in out.stdout
    fitted = yaml.safe_load((tmp_path / "cfg" / "hardware" / "here-fitted.yaml").read_text())
    assert fitted["step_overhead_s"] > 0 and "fit of hardware=here on 4 runs" in fitted["source"]
    assert fitted["gpu_mem"] == profile["gpu_mem"]
    assert set(fitted["op_tables"]) == keys and fitted["io_latency_s"] == profile["io_latency_s"]


def test_fit_needs_stored_runs(tmp_path):
    out = subprocess.run([sys.executable, "-m", "flexgen_lab", "calibrate", "fit=true",
                          "name=t4-paper", f"store.path={tmp_path / 'none.sqlite'}"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "no results store" in out.stderr


def test_calibrate_rejects_unknown_arguments(tmp_path):
    out = subprocess.run([sys.executable, "-m", "flexgen_lab", "calibrate", "speed=11"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "speed=11" in out.stderr and "name=" in out.stderr
