"""One pipeline stage's generation: its parts of the model, micro-block after micro-block.

The prompts go in waves of `micro_blocks` blocks (a block = gpu_batch_size x num_gpu_batches
sequences, as in the single-process engine). For each token step, a stage runs its parts of
every micro-block in turn (StageBlockRun.run_token): it receives the micro-block's activations
from the stage before, computes, and sends its output on without waiting for it to be taken,
so stage s works on micro-block m while stage s + 1 works on m - 1 (the paper's inner
iterations). The last stage picks the tokens and sends them back to stage 0, which embeds
them for the next step. Every stage holds the cache of its own layers for the whole wave.

Timing follows the paper (prefill = the first token step, decode = the rest) as the last
stage sees it: it finishes each step last.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from flexgen_lab.engine import cuda_sync, schedule
from flexgen_lab.engine.batch import Sampling
from flexgen_lab.engine.block_run import BlockRun, block_generator
from flexgen_lab.engine.dependencies import fills
from flexgen_lab.engine.engine import Engine
from flexgen_lab.engine.transfer import Links, done
from flexgen_lab.pipeline.comm import HIDDEN, TOKENS, StageComm


@dataclass
class StageReport:
    """What one stage sends to rank 0 at the end (picklable)."""

    stage: int
    layers: tuple[int, int]  # 0-based decoder layers, first and last (inclusive)
    prefill_s: float
    decode_s: float
    link_bytes: dict[str, dict[str, int]]  # phase -> link -> bytes (network: sent onwards)
    peaks: dict[str, int]  # accounted peak per tier
    placement: dict
    peak_rss_bytes: int | None = None
    output_ids: torch.Tensor | None = None  # the last stage's (num_prompts, gen_len)
    trace: list[dict] = field(default_factory=list)


class StageBlockRun(BlockRun):
    """A micro-block's run on one stage: its first part's input comes from the stage before
    and its last part's output goes to the next, whole, through an inbox and an outbox keyed
    by GPU batch (filled and emptied by _step around each token step)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.inbox: dict[int, torch.Tensor] = {}
        self.outbox: dict[int, torch.Tensor] = {}

    def load_hidden(self, op) -> None:
        if op.layer != self.e.parts.start:
            return super().load_hidden(op)
        next(self.slots[op.kind])  # the slots keep their turns as in a single process
        self.futures[fills(op)] = done(self.inbox.pop(op.batch))

    def store_hidden(self, op) -> None:
        if op.layer != self.e.parts.stop - 1:
            return super().store_hidden(op)
        self.outbox[op.batch] = self.outputs.pop(op.batch)

    def run_token(self, token: int) -> None:
        """One token step of this stage's parts for every GPU batch: the op stream cut to
        that token, waited out to its last store, so the next micro-block's step starts with
        nothing in flight."""
        stream = schedule.ops(self.e.schedule, self.gen_len, self.e.spec.num_layers + 2,
                              len(self.batches), self.e.parts, token)
        for op in stream:
            getattr(self, op.kind)(op)
        self._wait_stores()
        self.e.weights.release_view()


def generate_stage(engine: Engine, comm: StageComm, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor, gen_len: int, sampling: Sampling,
                   micro_blocks: int, origin: float) -> StageReport:
    """Run this stage's share of the whole generation; input_ids / attention_mask are every
    prompt (each stage builds the same ones: masks and positions are needed everywhere)."""
    block = engine.policy.block_size
    if input_ids.shape[0] % block:
        raise ValueError(f"{input_ids.shape[0]} prompts is not a multiple of the block size "
                         f"{block}")
    links, phase = Links(), [0.0, 0.0]
    network = {"prefill": 0, "decode": 0}
    outputs = []
    wave = block * micro_blocks
    for wave_start in range(0, input_ids.shape[0], wave):
        starts = range(wave_start, min(wave_start + wave, input_ids.shape[0]), block)
        used = engine.tiers.checkpoint()
        runs = []
        try:
            for m, start in enumerate(starts):
                batches = engine.block_batches(input_ids, attention_mask, start, gen_len,
                                               sampling)
                generator = block_generator(sampling, start // block)
                runs.append(StageBlockRun(engine, batches, gen_len, sampling, generator, links,
                                     origin, (start // block) * len(batches), f"mb{m}_"))
            _run_wave(engine, comm, runs, gen_len, phase, network)
        finally:
            for run in runs:
                run.close()
            engine.tiers.restore(used)
        outputs.extend(batch.outputs for run in runs for batch in run.batches)
    comm.flush()
    link_bytes = {p: {**links.bytes(p), "network": network[p]} for p in ("prefill", "decode")}
    parts, num_layers = engine.parts, engine.spec.num_layers
    layers = (max(parts.start, 1) - 1, min(parts.stop - 1, num_layers) - 1)  # part j: layer j-1
    return StageReport(comm.rank, layers, phase[0],
                       phase[1], link_bytes, engine.tiers.peaks(), engine.placement_report(),
                       output_ids=torch.cat(outputs) if comm.last else None)


def _run_wave(engine: Engine, comm: StageComm, runs: list[StageBlockRun], gen_len: int,
              phase: list[float], network: dict[str, int]) -> None:
    mark = _clock(engine.device)
    for i in range(gen_len):
        for run in runs:
            sent = _step(engine, comm, run, i, gen_len)
            network["decode" if i else "prefill"] += sent
        now = _clock(engine.device)
        phase[i > 0] += now - mark
        mark = now


def _step(engine: Engine, comm: StageComm, run: StageBlockRun, i: int, gen_len: int) -> int:
    """Token step i of one micro-block on this stage; returns the bytes it sent."""
    batches, b = run.batches, engine.policy.gpu_batch_size
    if not comm.first:
        t = batches[0].window(i)[1]
        x = comm.recv((b * len(batches), t, engine.spec.hidden), engine.dtype,
                      comm.rank - 1, HIDDEN).to(engine.device)
        for k in range(len(batches)):
            run.inbox[k] = x[k * b:(k + 1) * b]
    elif i > 0 and comm.stages > 1:
        tokens = comm.recv((b * len(batches),), torch.long, comm.stages - 1, TOKENS).cpu()
        for k, batch in enumerate(batches):
            batch.outputs[:, i - 1] = tokens[k * b:(k + 1) * b]
    run.run_token(i)
    if not comm.last:
        x = torch.cat([run.outbox.pop(k) for k in range(len(batches))])
        comm.send(x, comm.rank + 1, HIDDEN)
        return x.nbytes
    if comm.stages > 1 and i < gen_len - 1:  # stage 0 embeds them for step i + 1
        tokens = torch.cat([batch.outputs[:, i] for batch in batches])
        comm.send(tokens, 0, TOKENS)
        return tokens.nbytes
    return 0


def _clock(device: torch.device) -> float:
    cuda_sync.synchronize(device)
    return time.perf_counter()
