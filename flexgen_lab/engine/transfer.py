"""Copies between tiers with byte counters per link, and the executors that run them.

Bytes are counted here, inside the copy primitive, from the tensors really moved (never from
formulas), per phase (prefill = token 0, decode = later tokens). With overlap on, loads and
stores run in a small I/O thread pool and return futures; the engine waits on exactly the
futures a step needs (one per buffer), never on everything. With overlap off the same calls
run inline, one after the other: the honest ablation.

    >>> link = Links()
    >>> link.copy(dst, src, "cpu_to_gpu", token=1)
    >>> link.bytes("decode")["cpu_to_gpu"]
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from flexgen_lab.engine import cuda_sync

LINKS = ("cpu_to_gpu", "gpu_to_cpu", "disk_to_cpu", "cpu_to_disk")
PHASES = ("prefill", "decode")
IO_THREADS = 2  # loads and stores in flight at once, where nothing says otherwise
# The engine's I/O workers by device when neither hardware.io_workers nor engine.io_workers
# says: on CUDA the original's three side streams (weights in, cache in, cache out; digest
# §3.2), one per worker here; on the CPU two (benchmarks/engine.py `io_workers` measures).
DEFAULT_IO_WORKERS = {"cuda": 3, "cpu": IO_THREADS}


def phase_of(token: int) -> str:
    return "prefill" if token == 0 else "decode"


class Links:
    """The copy primitive: every byte crossing a link goes through copy/read/write here."""

    def __init__(self):
        self._bytes = {(p, link): 0 for p in PHASES for link in LINKS}
        self._lock = threading.Lock()
        self._op = threading.local()  # bytes moved by the op running in this thread

    def _count(self, link: str, nbytes: int, token: int) -> None:
        with self._lock:
            self._bytes[(phase_of(token), link)] += nbytes
        moved = getattr(self._op, "moved", None)
        if moved is None:
            moved = self._op.moved = {}
        moved[link] = moved.get(link, 0) + nbytes

    def take_op_bytes(self) -> dict[str, int]:
        """Bytes per link this thread moved since the last call (for the op trace)."""
        moved = getattr(self._op, "moved", None) or {}
        self._op.moved = {}
        return moved

    def copy(self, dst: torch.Tensor, src: torch.Tensor, link: str, token: int) -> None:
        """dst <- src across `link` (the tiers may share a device: the copy is still real)."""
        with cuda_sync.copy_stream(dst, src):
            dst.copy_(src, non_blocking=False)
        self._count(link, src.nbytes, token)

    def read(self, file, offset: int, dst: torch.Tensor, token: int) -> None:
        """disk -> cpu: fill the host tensor dst from the disk file at a byte offset."""
        self._count("disk_to_cpu", file.read_into(offset, dst), token)

    def write(self, file, offset: int, src: torch.Tensor, token: int) -> None:
        """cpu -> disk."""
        self._count("cpu_to_disk", file.write_from(offset, src), token)

    def bytes(self, phase: str | None = None) -> dict[str, int]:
        """Bytes per link, for one phase or both."""
        phases = PHASES if phase is None else (phase,)
        return {link: sum(self._bytes[(p, link)] for p in phases) for link in LINKS}


def io_pool(workers: int) -> ThreadPoolExecutor:
    """I/O threads of one torch thread each: a host copy is memory-bound (two threads copy no
    faster here), and a second one would take a core from compute's threads. torch's
    set_num_threads in a new thread also sets the process's default, which a thread that has
    not fixed its own count yet (the main thread before its first parallel op) would then
    compute with: the caller's count is fixed first (measured: calibrate ran its operator
    tables on one thread of two without it)."""
    torch.set_num_threads(torch.get_num_threads())
    return ThreadPoolExecutor(workers, thread_name_prefix="io",
                              initializer=torch.set_num_threads, initargs=(1,))


class Executor:
    """Runs I/O tasks: in a thread pool (overlap) or inline (no overlap), with dependencies."""

    def __init__(self, overlap: bool, num_threads: int = IO_THREADS,
                 trace: Callable[[dict], None] | None = None, origin: float | None = None):
        self.pool = io_pool(num_threads) if overlap else None
        self.trace = trace
        self.origin = time.perf_counter() if origin is None else origin  # trace times from

    def submit(self, fn: Callable[[], object], deps: list[Future | None], label: dict
               ) -> Future:
        """Run fn after its dependencies; the future holds fn's result; label (op, token,
        layer, batch) goes in the trace."""
        deps = [d for d in deps if d is not None]
        if self.pool is None:
            wait(deps)
            return done(self._timed(fn, label))
        return self.pool.submit(self._after, fn, deps, label)

    def _after(self, fn, deps, label):
        wait(deps)
        return self._timed(fn, label)

    def _timed(self, fn, label):
        """fn's result (what the op brought), its span traced."""
        start = time.perf_counter()
        with torch.inference_mode():  # grad mode is per thread; homes may be inference tensors
            result = fn()
        if self.trace is not None:
            self.trace({**label, "start_s": start - self.origin,
                        "end_s": time.perf_counter() - self.origin})
        return result

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


def done(value=None) -> Future:
    """A future that already holds `value` (a buffer that needed no move)."""
    future: Future = Future()
    future.set_result(value)
    return future


def wait(futures: list[Future | None]) -> None:
    """Block until every future is done; re-raise the first error."""
    for f in futures:
        if f is not None:
            f.result()
