"""Who owns a temporary directory on the disk tier, and whether that process is still alive.

A run's scratch directory and a weight cache being built are temporary: removed when the run
ends however it ends, except when the process is killed (SIGKILL, OOM killer, power loss).
So their names carry their owner, `<host>-<pid>-<start>`, where start is the process's start
time in clock ticks since boot (field 22 of /proc/<pid>/stat): a pid alone is reused by the
kernel, a pid with its start time is not. At start the engine removes this host's temporary
directories whose owner is gone (`sweep`), never a live one and never another host's, since
several ranks or jobs, on one machine or several, may share an offload directory.

    run-<host>-<pid>-<start>-<nonce>            a run's scratch (cache and activations)
    weight_cache/.<key>-<host>-<pid>-<start>-<nonce>   a weight cache being built

    >>> name = temporary_name("run")            # 'run-vm-4242-1274511-3f9c0a1b'
    >>> sweep("results/offload")                # paths of dead owners' leftovers, removed
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path

CACHE_DIR = "weight_cache"
# prefix: "run", ".probe", or "." + a weight cache key (16 hex digits)
_OWNED = re.compile(r"^(?P<prefix>run|\.probe|\.[0-9a-f]{16})-(?P<host>.+)-(?P<pid>\d+)"
                    r"-(?P<start>\d+)-(?P<nonce>[0-9a-f]{8})$")


@dataclass(frozen=True)
class Owner:
    host: str
    pid: int
    start: int  # clock ticks since boot; 0 where the kernel does not say (no /proc)

    def tag(self) -> str:
        return f"{self.host}-{self.pid}-{self.start}"


def _host() -> str:
    """This machine's name, reduced to characters that are safe in a file name."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "host"


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/<pid>/stat from field 3 (state) on; None when there is no such process. The
    command name (field 2) may hold spaces and parentheses, so split after the last ')'."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()


def process_start(pid: int) -> int:
    """The process's start time in clock ticks since boot (0 without /proc)."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else 0  # field 22 of stat is index 19 from field 3


def this_process() -> Owner:
    return Owner(_host(), os.getpid(), process_start(os.getpid()))


def temporary_name(prefix: str) -> str:
    """A fresh name owned by this process: `<prefix>-<host>-<pid>-<start>-<nonce>`."""
    return f"{prefix}-{this_process().tag()}-{uuid.uuid4().hex[:8]}"


def owner_of(name: str) -> Owner | None:
    """The owner a temporary name records; None for any other name."""
    match = _OWNED.match(name)
    if not match:
        return None
    return Owner(match["host"], int(match["pid"]), int(match["start"]))


def is_alive(owner: Owner) -> bool:
    """Whether `owner` (a process of this host) still runs. A zombie (killed, not yet
    reaped by its parent) writes nothing any more: it counts as gone."""
    if Path("/proc/self/stat").exists():
        fields = _stat_fields(owner.pid)
        return bool(fields) and fields[0] != "Z" and int(fields[19]) == owner.start
    try:  # no /proc: the pid alone (a reused pid keeps a dead owner's directory: safe side)
        os.kill(owner.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def leftovers(offload_dir: str | Path) -> list[Path]:
    """This host's temporary directories (and probe files) under offload_dir whose owner is
    gone: scratch of killed runs and half-built weight caches."""
    root = Path(offload_dir)
    host = _host()
    found = []
    for parent in (root, root / CACHE_DIR):
        try:
            entries = list(parent.iterdir())
        except OSError:  # absent (nothing was ever written there) or unreadable
            continue
        for path in entries:
            owner = owner_of(path.name)
            if owner is not None and owner.host == host and not is_alive(owner):
                found.append(path)
    return found


def sweep(offload_dir: str | Path) -> list[Path]:
    """Remove this host's leftovers of dead processes under offload_dir; returns them.
    Two processes may sweep at once: whatever the other removed first is simply gone."""
    removed = leftovers(offload_dir)
    for path in removed:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return removed
