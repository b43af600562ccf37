"""A memory cap for one child process: a memory cgroup where the machine lets us make one.

A cgroup's limit charges the page cache the process fills, so a system that reads its
offloaded weights through the page cache (Accelerate's mapped disk) competes for the same
bytes as its working memory, as on a machine whose memory really is smaller than the model.
cgroup v2 (memory.max) and v1 (memory.limit_in_bytes) are both handled: a child cgroup is
made under this process's own and removed after. Where neither can be written (no
permission, no controller) `cap_command` says so and the caller reports "uncapped".

    >>> with MemoryCap(4_200_000_000) as cap:
    ...     subprocess.run(cap.command(["python", "-m", "benchmarks.systems", spec]))
    >>> cap.how   # 'cgroup v1 memory.limit_in_bytes=4200000000 (page cache counted)'
"""

from __future__ import annotations

import os
import shlex
import uuid
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")


def _own_cgroup() -> tuple[str, Path] | None:
    """(version, directory) of this process's memory cgroup, if it is mounted here."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return "v1", ROOT / "memory" / path.lstrip("/")
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return "v2", ROOT / line[3:].lstrip("/")
    return None


class MemoryCap:
    """Context manager: a fresh memory cgroup capped at `limit_bytes` (None: no cap)."""

    def __init__(self, limit_bytes: int | None):
        self.limit_bytes = limit_bytes
        self.path: Path | None = None
        self.how = "uncapped"

    def __enter__(self) -> MemoryCap:
        if self.limit_bytes is None:
            return self
        own = _own_cgroup()
        if own is None:
            self.how = "uncapped: no memory cgroup here"
            return self
        version, parent = own
        limit_file = "memory.limit_in_bytes" if version == "v1" else "memory.max"
        path = parent / f"flexgen_bench_{os.getpid()}_{uuid.uuid4().hex[:6]}"
        try:
            path.mkdir()
            (path / limit_file).write_text(str(self.limit_bytes))
            if version == "v1":  # no swap here; where there is, the cap must cover it too
                swap = path / "memory.memsw.limit_in_bytes"
                if swap.exists():
                    swap.write_text(str(self.limit_bytes))
        except OSError as err:
            self._remove(path)
            self.how = f"uncapped: cannot make a memory cgroup ({err.strerror or err})"
            return self
        self.path = path
        self.how = f"cgroup {version} {limit_file}={self.limit_bytes} (page cache counted)"
        return self

    def command(self, argv: list[str]) -> list[str]:
        """argv run inside the cgroup (a shell moves itself in, then execs argv)."""
        if self.path is None:
            return argv
        procs = shlex.quote(str(self.path / "cgroup.procs"))
        return ["sh", "-c", f"echo $$ > {procs} && exec {shlex.join(argv)}"]

    def peak_bytes(self) -> int | None:
        """The cgroup's peak charge (memory and page cache), where the kernel says."""
        for name in ("memory.max_usage_in_bytes", "memory.peak"):
            if self.path is not None and (self.path / name).exists():
                return int((self.path / name).read_text())
        return None

    @staticmethod
    def _remove(path: Path) -> None:
        try:
            path.rmdir()  # only once its processes have exited
        except OSError:
            pass

    def __exit__(self, *exc) -> None:
        if self.path is not None:
            self._remove(self.path)
