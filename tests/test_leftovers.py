"""Nothing is left behind: not by a run killed with SIGKILL mid-run or mid-cache-build (the
next run sweeps what it left), nor by a run whose disk writes fail (a file-size limit makes
them fail with EFBIG): one error row, no scratch, no half-built weight cache."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

from flexgen_lab.engine import owners
from flexgen_lab.results.store import ResultStore
from tests.conftest import python_cli
from tests.test_bad_input import only_complete_caches, run_line

DISK_WEIGHTS = ["policy.weights.gpu=0", "policy.weights.cpu=0"]


def kill_when(pattern: str, root: Path, args: list[str], cwd: Path) -> Path:
    """Start `python -m flexgen_lab ARGS`, SIGKILL it as soon as a path matching `pattern`
    appears under root, and return that path (still there: nothing cleaned up after it)."""
    proc = subprocess.Popen(python_cli(*args), cwd=cwd, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            found = list(root.glob(pattern))
            if found:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.005)
    finally:
        proc.kill()
        err = proc.communicate()[1].decode()
    assert proc.returncode == -signal.SIGKILL, f"ended by itself ({proc.returncode}): {err}"
    return found[0]


def test_killed_run_and_killed_cache_build_leave_nothing_after_the_next_run(tmp_path):
    off, db = tmp_path / "off", tmp_path / "r.sqlite"
    common = [f"engine.offload_dir={off}", f"store.path={db}"]
    # mid-run: the cache lives on disk, in the run's scratch directory
    scratch = kill_when("run-*", off, ["run", "model=opt-tiny", "workload.prompt_len=16",
                                       "workload.gen_len=400", "policy.cache.gpu=0",
                                       "policy.cache.cpu=0", *common], tmp_path)
    assert scratch.is_dir() and owners.owner_of(scratch.name) is not None
    # mid-build: opt-125m's cache has 14 parts; the build is killed at its first file (that
    # run's engine has already swept the first run's scratch)
    building = kill_when("weight_cache/.*", off, ["run", "model=opt-125m", "workload=tiny",
                                                  *DISK_WEIGHTS, *common], tmp_path)
    assert not scratch.exists()
    assert building.is_dir() and not (building / "manifest.json").exists()
    assert len(list(building.glob("*.bin"))) < 14  # midway
    assert [p for p in (off / "weight_cache").iterdir() if not p.name.startswith(".")] == []
    assert not db.exists() or list(ResultStore(db).runs().status) == []  # killed: no row
    code, err = run_line(["run", "model=opt-tiny", "workload=tiny", *DISK_WEIGHTS, *common])
    assert code == 0, err
    assert not building.exists()
    only_complete_caches(off)
    assert len(list((off / "weight_cache").iterdir())) == 1  # opt-tiny's, complete


FAILING_DISK = """
import sys
from flexgen_lab.__main__ import main
for args in sys.argv[1:]:
    try:
        main(args.split())
    except SystemExit as exit_:
        print("exit", exit_.code, flush=True)
"""


def limit_file_size(nbytes: int):
    def apply() -> None:  # in the child, before exec: a write past nbytes fails with EFBIG
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))
    return apply


def test_failing_disk_gives_an_error_row_and_leaves_no_scratch_nor_half_cache(tmp_path):
    off, db = tmp_path / "off", tmp_path / "r.sqlite"
    ResultStore(db).record_run({"status": "ok", "model": "earlier"})
    limit = 150_000  # above the store; llama-tiny: embed.bin 131072 B, layer files 180224 B
    assert db.stat().st_size < limit
    common = f"model=llama-tiny engine.offload_dir={off} store.path={db}"
    build = f"run workload=tiny {common} {' '.join(DISK_WEIGHTS)}"  # fails at layer 0's file
    scratch = (f"run workload.prompt_len=200 workload.gen_len=8 {common} policy.weights.cpu=1 "
               "policy.weights.gpu=0 policy.cache.gpu=0 policy.cache.cpu=0")  # 212 KB files
    out = subprocess.run([sys.executable, "-c", FAILING_DISK, build, scratch], cwd=tmp_path,
                         capture_output=True, text=True, timeout=240,
                         preexec_fn=limit_file_size(limit), env={**os.environ})
    assert out.stdout.split("\n")[:2] == ["exit 1", "exit 1"], out.stdout + out.stderr
    assert "Traceback" not in out.stderr
    runs = ResultStore(db).runs()
    assert list(runs.status) == ["ok", "error", "error"] and runs.model[0] == "earlier"
    for message in runs.error[1:]:
        assert "File too large" in message and "file-size limit" in message, message
    assert "weight cache" in runs.error[1] and "layer0000.bin" in runs.error[1]
    assert "run-" in runs.error[2]  # a scratch file, named
    only_complete_caches(off)
    assert list((off / "weight_cache").iterdir()) == []  # nothing half-built in place
