"""Everything CUDA-specific about moving data: side streams, events, pinned memory.

The engine's I/O threads copy on their own CUDA stream (one per thread) and wait for that
stream before their future completes, so a finished future means the bytes are in place; the
compute stream records an event after each step that I/O threads wait on before reading what
the step produced. On the CPU every function here is a no-op, so the same engine code runs.
"""

from __future__ import annotations

import contextlib
import threading

import torch

_local = threading.local()


def _side_stream(device: torch.device):
    stream = getattr(_local, "stream", None)
    if stream is None:
        stream = _local.stream = torch.cuda.Stream(device=device)
    return stream


@contextlib.contextmanager
def copy_stream(dst: torch.Tensor, src: torch.Tensor):
    """Run a copy on this thread's side stream when CUDA is involved; wait for it on exit."""
    device = dst.device if dst.is_cuda else src.device if src.is_cuda else None
    if device is None:
        yield
        return
    stream = _side_stream(device)
    with torch.cuda.stream(stream):
        yield
    stream.synchronize()


def compute_done(device: torch.device):
    """An event marking the compute stream's work so far (None on the CPU)."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return event


def wait_event(event) -> None:
    """Block the calling (I/O) thread until the compute stream passed `event`."""
    if event is not None:
        event.synchronize()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
