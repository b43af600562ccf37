"""Temporary directories carry their owner (host, pid, start time); leftovers of dead
processes on this host are swept, live ones and other hosts' never."""

from __future__ import annotations

import os
import subprocess
import sys

from flexgen_lab.engine import owners
from flexgen_lab.engine.disk import DiskDir


def dead_process() -> owners.Owner:
    """A process that ran and was reaped: its pid and start time, as it recorded them."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        owner = owners.Owner(owners.this_process().host, child.pid,
                             owners.process_start(child.pid))
    finally:
        child.kill()
        child.wait()
    return owner


def test_names_record_this_process_and_parse_back():
    name = owners.temporary_name("run")
    me = owners.this_process()
    assert owners.owner_of(name) == me and me.start > 0
    assert owners.is_alive(me)
    assert owners.owner_of(".0123456789abcdef-" + me.tag() + "-0a1b2c3d") == me
    for other in ("weight_cache", "run-1234-abcd1234", "0123456789abcdef", ".probe"):
        assert owners.owner_of(other) is None  # complete caches and old names are not ours


def test_hosts_with_dashes_parse():
    owner = owners.owner_of("run-gpu-node-07.cluster-4242-99-deadbeef")
    assert owner == owners.Owner("gpu-node-07.cluster", 4242, 99)


def test_a_dead_owner_and_a_reused_pid_are_gone():
    gone = dead_process()
    assert gone.start > 0 and not owners.is_alive(gone)
    me = owners.this_process()
    assert not owners.is_alive(owners.Owner(me.host, me.pid, me.start + 1))  # pid reused


def test_sweep_removes_only_this_hosts_dead_leftovers(tmp_path):
    me, gone = owners.this_process(), dead_process()
    cache = tmp_path / "weight_cache"
    names = {
        "dead scratch": tmp_path / f"run-{gone.tag()}-00000001",
        "dead build": cache / f".0123456789abcdef-{gone.tag()}-00000002",
        "live scratch": tmp_path / f"run-{me.tag()}-00000003",
        "live build": cache / f".0123456789abcdef-{me.tag()}-00000004",
        "other host": tmp_path / f"run-elsewhere-{gone.pid}-{gone.start}-00000005",
        "complete cache": cache / "0123456789abcdef",
        "old-style name": tmp_path / f"run-{gone.pid}-00000006",
    }
    for path in names.values():
        (path / "sub").mkdir(parents=True)
        (path / "sub" / "f.bin").write_bytes(b"x" * 10)
    probe = tmp_path / f".probe-{gone.tag()}-00000007"
    probe.write_bytes(b"p")
    removed = owners.sweep(tmp_path)
    assert sorted(removed) == sorted([names["dead scratch"], names["dead build"], probe])
    left = {k for k, path in names.items() if path.exists()}
    assert left == set(names) - {"dead scratch", "dead build"}
    assert owners.sweep(tmp_path / "absent") == []


def test_scratch_dirs_are_named_by_their_owner(tmp_path):
    with DiskDir(tmp_path, unique=True) as scratch:
        owner = owners.owner_of(scratch.path.name)
        assert owner is not None and owner.pid == os.getpid() and owners.is_alive(owner)
        assert owners.sweep(tmp_path) == [] and scratch.path.exists()  # never a live one
