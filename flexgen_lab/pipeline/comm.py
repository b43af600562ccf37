"""The links between pipeline stages: torch.distributed point-to-point messages with a deadline.

torchrun starts one process per stage and sets RANK / WORLD_SIZE / MASTER_ADDR; rank r is
stage r. gloo carries CPU tensors, NCCL GPU ones. Every wait has distributed.timeout_s as
its deadline and runs on a helper thread (the C++ wait releases the GIL), so the main thread
waits in Python: a stage that died is reported within the deadline, and a SIGTERM from
torchrun's agent is handled at once rather than after the wait.

    comm = StageComm.from_env(stages=2, timeout_s=60, device=torch.device("cpu"))
    comm.send(x, dst=1, tag=HIDDEN)          # asynchronous; the buffer is kept until sent
    y = comm.recv((4, 8, 64), torch.float32, src=0, tag=HIDDEN)
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from datetime import timedelta

import torch
import torch.distributed as dist

from flexgen_lab.config import ConfigError

HIDDEN, TOKENS = 1, 2  # message tags: activations to the next stage, new tokens to stage 0


class StageTimeout(RuntimeError):
    """A message or collective did not complete within distributed.timeout_s."""


def launched_world() -> tuple[int, int] | None:
    """(rank, world size) set by torchrun, or None outside a launcher."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


def check_world(stages: int) -> None:
    """distributed.stages must equal the launched world size (ConfigError on every rank)."""
    world = launched_world()
    size = 1 if world is None else world[1]
    if size != stages:
        how = ("this process was not started by a launcher" if world is None
               else f"torchrun started {size} processes (WORLD_SIZE={size})")
        raise ConfigError(f"distributed.stages={stages}: {how}; allowed: distributed.stages="
                          f"{size}, or launch `torchrun --nproc-per-node {stages} -m "
                          "flexgen_lab run distributed=pipeline ...`")


class StageComm:
    """This stage's rank and its messages to and from the other stages."""

    def __init__(self, rank: int, stages: int, timeout_s: float, device: torch.device):
        self.rank, self.stages, self.timeout_s = rank, stages, timeout_s
        self.device = device if device.type == "cuda" else torch.device("cpu")
        self._pending: list[tuple[dist.Work, torch.Tensor]] = []
        self._waiter = ThreadPoolExecutor(1, thread_name_prefix="stage-wait")

    @classmethod
    def from_env(cls, stages: int, timeout_s: float, device: torch.device) -> StageComm:
        """Join the launched process group (gloo on the CPU, NCCL on CUDA); one stage alone
        needs no group."""
        check_world(stages)
        world = launched_world()
        if world is None:
            return cls(0, 1, timeout_s, device)
        if not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
        return cls(world[0], stages, timeout_s, device)

    @property
    def first(self) -> bool:
        return self.rank == 0

    @property
    def last(self) -> bool:
        return self.rank == self.stages - 1

    def send(self, tensor: torch.Tensor, dst: int, tag: int) -> None:
        """Start sending `tensor`'s bytes; the copy is kept until the message has gone."""
        buf = tensor.detach().to(self.device).contiguous().reshape(-1).view(torch.uint8)
        self._pending.append((dist.isend(buf, dst, tag=tag), buf))

    def recv(self, shape: tuple[int, ...], dtype: torch.dtype, src: int, tag: int
             ) -> torch.Tensor:
        """The next message from `src` with `tag`, as a tensor of shape and dtype."""
        numel = 1
        for n in shape:
            numel *= n
        buf = torch.empty(numel * dtype.itemsize, dtype=torch.uint8, device=self.device)
        self._wait(dist.irecv(buf, src, tag=tag), f"the next message from stage {src}")
        return buf.view(dtype).view(shape)

    def flush(self) -> None:
        """Wait until every message sent has gone."""
        for work, _ in self._pending:
            self._wait(work, "the receipt of a message sent on")
        self._pending = []

    def _wait(self, work: dist.Work, what: str) -> None:
        limit = timedelta(seconds=self.timeout_s)
        done = self._waiter.submit(work.wait, limit)
        try:
            done.result(timeout=self.timeout_s + 5)
        except FutureTimeout as err:
            raise StageTimeout(f"stage {self.rank}: {what} did not arrive within "
                               f"distributed.timeout_s={self.timeout_s:g} s (a stage failed or "
                               "is stuck)") from err
        except RuntimeError as err:  # the transport's own timeout, or a peer that went away
            raise StageTimeout(f"stage {self.rank}: waiting for {what} failed (a stage died, "
                               f"or distributed.timeout_s={self.timeout_s:g} s passed): "
                               f"{str(err).splitlines()[0][:300]}") from err

    def gather(self, obj) -> list | None:
        """Every stage's `obj` on stage 0 (None elsewhere)."""
        if self.stages == 1:
            return [obj]
        out = [None] * self.stages if self.first else None
        dist.gather_object(obj, out, dst=0)
        return out

    def barrier(self) -> None:
        if self.stages > 1:
            dist.barrier()

    def claim_row(self, key: str) -> bool:
        """True for exactly one caller per key across the stages: the one that writes the
        run's row. The launcher's store outlives any stage; where it cannot be reached (its
        host died), claim it: nobody else can have."""
        if self.stages == 1:
            return True
        try:
            store = dist.distributed_c10d._get_default_store()
            return store.add(f"flexgen_lab/row/{key}", 1) == 1
        except Exception:  # noqa: BLE001 - no store to ask: write rather than lose the row
            return True

    def close(self) -> None:
        self._waiter.shutdown(wait=False, cancel_futures=True)
        if self.stages > 1 and dist.is_initialized():
            dist.destroy_process_group()
