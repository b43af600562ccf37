"""The command line end to end, in subprocesses, from a directory other than the repository."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from flexgen_lab.hardware.local import mem_available
from flexgen_lab.results.store import ResultStore
from tests.conftest import python_cli

TINY = ["model=opt-tiny", "workload=tiny"]


def cli(tmp_path: Path, *args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    return subprocess.run(python_cli(*args), cwd=tmp_path, capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_run_stores_a_row_and_prints_a_summary(tmp_path):
    db = tmp_path / "r.sqlite"
    out = cli(tmp_path, "run", *TINY, f"store.path={db}", "schedule=row_by_row")
    assert out.returncode == 0, out.stderr
    assert "token/s" in out.stdout and "[measured]" in out.stdout and str(db) in out.stdout
    runs = ResultStore(db).runs()
    assert list(runs.status) == ["ok"] and runs.schedule[0] == "row_by_row"
    assert runs.generation_throughput[0] > 0
    assert len(ResultStore(db).tokens(int(runs.run_id[0]))) == 4


def test_config_error_exits_2_without_traceback(tmp_path):
    out = cli(tmp_path, "run", *TINY, "policy.weights.gpu=1.5", f"store.path={tmp_path}/r.sqlite")
    assert out.returncode == 2
    assert "policy.weights.gpu=1.5" in out.stderr and "[0, 1]" in out.stderr
    assert "Traceback" not in out.stderr + out.stdout
    assert not (tmp_path / "r.sqlite").exists(), "nothing may run before validation passes"


def test_a_pipeline_without_its_launcher_is_refused_naming_torchrun(tmp_path):
    out = cli(tmp_path, "run", *TINY, "distributed=pipeline", f"store.path={tmp_path}/r.sqlite")
    assert out.returncode == 2
    assert "distributed.stages=2" in out.stderr and "torchrun --nproc-per-node 2" in out.stderr
    assert not (tmp_path / "r.sqlite").exists() or ResultStore(tmp_path / "r.sqlite").runs().empty


def test_simulated_run_needs_a_profile_with_speeds(tmp_path):
    out = cli(tmp_path, "run", *TINY, "backend=simulated", "hardware=local")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "hardware=local has no speeds" in out.stderr


def test_simulated_run_stores_a_simulated_row_with_its_trace(tmp_path):
    out = cli(tmp_path, "run", "backend=simulated", "model=opt-175b", "hardware=t4-paper",
              "policy=paper-175b-512", "workload=paper-512", "hardware.gpu_mem=40GB",
              "trace=true", f"store.path={tmp_path}/r.sqlite")
    assert out.returncode == 0, out.stderr
    assert "[simulated]" in out.stdout
    with sqlite3.connect(tmp_path / "r.sqlite") as db:
        row = db.execute("SELECT backend, device, dtype, status, generation_throughput, "
                         "bytes_disk_to_cpu, peak_gpu_bytes FROM runs").fetchone()
        ops = db.execute("SELECT COUNT(*), SUM(bytes) FROM trace WHERE link='disk_to_cpu'"
                         ).fetchone()
    assert row[:4] == ("simulated", "simulated", "float16", "ok")
    assert 0 < row[4] < 10 and row[6] > 0
    assert ops[0] > 0 and ops[1] == row[5]  # the trace's bytes add up to the row's counters


def test_simulated_policy_over_budget_is_stored_as_oom(tmp_path):
    out = cli(tmp_path, "run", "backend=simulated", "model=opt-175b", "hardware=t4-paper",
              "policy=resident", "workload=paper-512", f"store.path={tmp_path}/r.sqlite")
    assert out.returncode == 1 and "oom" in out.stderr and "gpu tier" in out.stderr


def broken_checkpoint(hf_checkpoint, tmp_path: Path) -> Path:
    """A valid config.json whose weights lack one tensor: it fails only once loading starts."""
    src, _ = hf_checkpoint("opt-odd")
    dst = tmp_path / "broken"
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    tensors.pop("model.decoder.layers.1.fc1.weight")
    save_file(tensors, dst / "model.safetensors")
    return dst


def test_failed_run_is_stored_as_error_and_keeps_earlier_rows(tmp_path, hf_checkpoint):
    db = tmp_path / "r.sqlite"
    assert cli(tmp_path, "run", *TINY, f"store.path={db}").returncode == 0
    broken = broken_checkpoint(hf_checkpoint, tmp_path)
    out = cli(tmp_path, "run", "model=local", f"model.path={broken}", "workload=tiny",
              f"store.path={db}")
    assert out.returncode == 1
    assert "layers.1.fc1.weight" in out.stderr and "stored as run_id 2" in out.stderr
    runs = ResultStore(db).runs()
    assert list(runs.status) == ["ok", "error"]
    assert "layers.1.fc1.weight" in runs.error[1]
    assert runs.generation_throughput[0] > 0


@pytest.mark.slow
def test_multirun_with_joblib_stores_every_job(tmp_path):
    db = tmp_path / "r.sqlite"
    out = cli(tmp_path, "run", "--multirun", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
              "policy.gpu_batch_size=1,2,3", *TINY, f"store.path={db}")
    assert out.returncode == 0, out.stderr
    runs = ResultStore(db).runs()
    assert sorted(runs.gpu_batch_size) == [1, 2, 3] and set(runs.status) == {"ok"}
    # hardware=local: each of the 2 parallel jobs gets 40 % of MemAvailable / 2 per host tier
    share = 0.4 * mem_available() / 2
    assert runs.cpu_budget_bytes.between(0.5 * share, 1.5 * share).all()
    assert (runs.gpu_budget_bytes == runs.cpu_budget_bytes).all()


def test_hardware_local_is_this_machine_hashed_as_local(tmp_path):
    """The row holds this machine's bytes (40 % of MemAvailable per host tier, 80 % of the
    offload filesystem's free space), the config hash the word: two runs with the same request
    share a hash whatever memory was free."""
    db = tmp_path / "r.sqlite"
    for _ in range(2):
        assert cli(tmp_path, "run", *TINY, f"store.path={db}").returncode == 0
    runs = ResultStore(db).runs()
    share, free = 0.4 * mem_available(), shutil.disk_usage(tmp_path).free
    assert runs.cpu_budget_bytes.between(0.7 * share, 1.3 * share).all()
    assert runs.disk_budget_bytes.between(0.6 * free, 0.9 * free).all()
    assert runs.config_hash.nunique() == 1
    assert '"gpu_mem": "local"' in runs.config_json.iloc[0]


def test_multirun_goes_on_after_a_failed_job_and_exits_nonzero(tmp_path, hf_checkpoint):
    db = tmp_path / "r.sqlite"
    broken = broken_checkpoint(hf_checkpoint, tmp_path)
    good = Path(hf_checkpoint("opt-odd")[0])
    out = cli(tmp_path, "run", "--multirun", "model=local", f"model.path={broken},{good}",
              "workload=tiny", f"store.path={db}")
    assert out.returncode != 0
    assert sorted(ResultStore(db).runs().status) == ["error", "ok"]


def test_help_lists_config_groups_and_cfg_prints_the_config(tmp_path):
    out = cli(tmp_path, "run", "--help")
    assert out.returncode == 0
    for group in ("model", "hardware", "policy", "schedule", "compress", "workload", "backend",
                  "system", "distributed", "store"):
        assert f"{group}:" in out.stdout
    cfg = cli(tmp_path, "run", "--cfg", "job", "policy.gpu_batch_size=7")
    assert cfg.returncode == 0 and "gpu_batch_size: 7" in cfg.stdout


def test_table_prints_recent_runs(tmp_path):
    db = tmp_path / "r.sqlite"
    assert cli(tmp_path, "run", *TINY, f"store.path={db}").returncode == 0
    out = cli(tmp_path, "table", f"store.path={db}")
    assert out.returncode == 0 and "opt-tiny" in out.stdout and "ok" in out.stdout
    missing = cli(tmp_path, "table", f"store.path={tmp_path}/none.sqlite")
    assert missing.returncode == 2 and "no results store" in missing.stderr


def test_console_script_runs(tmp_path):
    script = Path(sys.executable).parent / "flexgen-lab"
    assert script.exists(), "pip install -e . should install the flexgen-lab console script"
    out = subprocess.run([str(script), "run", *TINY, f"store.path={tmp_path}/r.sqlite"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr


ENGINE_IMPORTS = """
import json, sys
from flexgen_lab.__main__ import main
sys.argv = ["flexgen_lab", "run", "model=local", "model.path={path}", "workload=tiny",
            "store.path={db}"]
try:
    main()
except SystemExit as e:
    assert not e.code, e.code
print(json.dumps(sorted(m for m in sys.modules
                        if m.startswith("transformers.models.") and ".modeling_" in m)))
"""


def test_engine_run_imports_no_transformers_modeling_code(tmp_path, hf_checkpoint):
    path, _ = hf_checkpoint("llama-gqa")
    code = ENGINE_IMPORTS.format(path=path, db=tmp_path / "r.sqlite")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, timeout=240)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
