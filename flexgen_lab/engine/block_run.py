"""One block's generation: its cache and activation homes, the futures of its loads and
stores, and the walk over the schedule's op stream (Algorithm 1's body; engine.py holds the
weights and runs block after block).
"""

from __future__ import annotations

import itertools
import time
from concurrent.futures import Future
from typing import TYPE_CHECKING

import torch

from flexgen_lab.engine import cuda_sync, schedule
from flexgen_lab.engine import dependencies as deps
from flexgen_lab.engine.activation_homes import ActivationHomes
from flexgen_lab.engine.attention import CacheAttention
from flexgen_lab.engine.batch import BatchState, Sampling, pick_tokens
from flexgen_lab.engine.cache_homes import CacheHomes, cache_config
from flexgen_lab.engine.cache_io import CacheIO
from flexgen_lab.engine.dependencies import fills, is_store
from flexgen_lab.engine.transfer import Executor, Links, done, wait
from flexgen_lab.engine.workspace import step_workspace_bytes
from flexgen_lab.models import ops

if TYPE_CHECKING:  # engine.py imports this module
    from flexgen_lab.engine.engine import Engine


def block_generator(sampling: Sampling, block_index: int) -> torch.Generator:
    """Block k samples from its own stream (seed + k), so its tokens do not depend on the
    order blocks run in: one after another here, interleaved token by token in a pipeline."""
    return torch.Generator().manual_seed(sampling.seed + block_index)


class BlockRun:
    """One block's generation: its cache and activation homes, futures, and the op loop."""

    def __init__(self, engine: Engine, batches: list[BatchState], gen_len: int,
                 sampling: Sampling, generator: torch.Generator, links: Links,
                 origin: float | None = None, batch_base: int = 0, tag: str = ""):
        """origin: the trace's time zero; batch_base: added to batch indices in the trace (a
        pipeline's micro-block m traces its GPU batches as m x num_gpu_batches + k); tag:
        prefixes the block's scratch files (a pipeline stage holds several blocks at once)."""
        self.e, self.batches, self.gen_len = engine, batches, gen_len
        self.sampling, self.generator, self.links = sampling, generator, links
        p, spec = engine.policy, engine.spec
        self.prompt_len = batches[0].prompt_len
        total = self.prompt_len + gen_len - 1
        config = cache_config(p, spec)
        # the block's cache and activation requests may need larger bounce buffers
        engine.tiers["cpu"].reserve(engine._bounce_bytes(self.prompt_len, gen_len)
                                    - engine._bounce_bytes(), "disk: bounce buffers (block)")
        needs_disk = p.cache.disk > 0 or p.activations.disk > 0
        disk_dir = engine.scratch() if needs_disk else None
        parts = engine.parts
        layers = range(max(parts.start, 1) - 1, min(parts.stop, spec.num_layers + 1) - 1)
        self.cache = CacheHomes(spec, p.cache, p.gpu_batch_size, len(batches), total,
                                engine.tiers, engine.dtype, config, disk_dir, layers, tag)
        self.acts = ActivationHomes(spec, p.activations, p.gpu_batch_size, len(batches),
                                    self.prompt_len, engine.tiers, engine.dtype, disk_dir, tag)
        engine.placed["cache"] = self.cache.home_bytes()
        engine.placed["activations"] = self.acts.home_bytes()
        self.cache_io = CacheIO(self.cache, engine.tiers, p.cpu_delegation, p.attn_sparsity)
        self.cache_io.start_block(self.prompt_len)
        self.cache_io.reserve_buffers(gen_len)
        self.attention = CacheAttention(self.cache_io, p.attn_sparsity, p.attn_renormalize)
        self.executor = Executor(p.overlap, engine.io_workers, trace=self._trace, origin=origin)
        self.batch_base = batch_base
        # one future per buffer, keyed as the simulator keys them (dependencies.py); each
        # returns what it brought: a part's weights, a cache slot, a batch's hidden input
        self.futures: dict[deps.Key, Future] = {}
        self.pending: dict[tuple[int, int], dict] = {}  # computed cache rows, to store
        self.outputs: dict[int, torch.Tensor] = {}  # computed hidden outputs, to store
        # each kind of transfer takes its buffers in turn (double buffering)
        self.slots = {"load_weight": itertools.cycle(range(engine.weights.num_slots)),
                      **{kind: itertools.cycle(range(2))
                         for kind in ("load_cache", "load_hidden", "store_cache")}}
        self.last_store: Future | None = None
        self.event = None  # CUDA event after the latest compute (None on the CPU)
        self._check_workspace()

    def run(self) -> tuple[float, float]:
        """Execute the op stream; returns (prefill seconds, decode seconds)."""
        stream = schedule.ops(self.e.schedule, self.gen_len, self.e.spec.num_layers + 2,
                              len(self.batches))
        # a token step runs from its first compute to the next step's; the first from the
        # start, so loading the first weights counts in the prefill
        phase, token, mark = [0.0, 0.0], 0, self._clock()
        try:
            for op in stream:
                if op.kind == "compute" and op.token != token:
                    now = self._clock()
                    phase[token > 0] += now - mark
                    token, mark = op.token, now
                getattr(self, op.kind)(op)
            self._wait_stores()
            phase[token > 0] += self._clock() - mark
        finally:
            self.close()
        return phase[0], phase[1]

    def _submit(self, op, fn) -> Future:
        """Run fn (which returns the buffer it brought) after the ops it depends on
        (dependencies.py); its future becomes the buffer's."""
        label = {"op": op.kind, "token": op.token, "layer": op.layer,
                 "batch": op.batch + self.batch_base}
        event = self.event
        after = [self.futures.get(key) for key in deps.waits_for(op)]
        if is_store(op):  # stores leave in order (dependencies.py)
            after.append(self.last_store)

        def task():
            cuda_sync.wait_event(event)  # what earlier computes produced or still read
            return fn()

        self.futures[fills(op)] = future = self.executor.submit(task, after, label)
        if is_store(op):
            self.last_store = future
        return future

    # --- loads -------------------------------------------------------------------------

    def load_weight(self, op) -> None:
        index = op.layer
        if self.e.weights.parts[index].resident:
            self.futures[fills(op)] = done(None)  # compute reads the homes
            return
        slot = next(self.slots[op.kind])
        self._submit(op, lambda: self.e.weights.load(index, slot, self.links, op.token))

    def load_cache(self, op) -> None:
        layer = op.layer - 1
        if list(self.cache.segments[(layer, op.batch)]) == ["gpu"]:
            return  # read in place: nothing to move
        slot = next(self.slots[op.kind])
        self._submit(op, lambda: (self.cache_io.load(op.token, layer, op.batch, slot,
                                                      self.links), slot)[1])

    def load_hidden(self, op) -> None:
        slot = next(self.slots[op.kind])
        tokens = self.batches[op.batch].window(op.token)[1]
        fn = lambda: self.acts.load(op.batch, tokens, self.links, op.token, slot)  # noqa: E731
        if self.acts.resident:  # the output is still on the device: nothing to move
            self.futures[fills(op)] = done(fn())
            return
        self._submit(op, fn)

    # --- compute -------------------------------------------------------------------------

    def compute(self, op) -> None:
        # what this step reads, each as its load brought it (dependencies.waits_for)
        weights = self.futures[deps.weight(op.token, op.layer)].result()
        x = self.futures.pop(deps.hidden(op.batch)).result() if op.layer > 0 else None
        loaded = self.futures.pop(deps.cache(op.layer, op.batch), None) if op.token else None
        cache_slot = loaded.result() if loaded is not None else 0  # all on gpu: read in place
        start = time.perf_counter()
        w = self.e.weights.compute_view(op.token, op.layer, weights)
        with self._workspace(op):
            self._cell(op, w, self.batches[op.batch], x, cache_slot)
        self._computed(op, start)

    def _cell(self, op, w: dict, batch: BatchState, x: torch.Tensor | None,
              cache_slot: int) -> None:
        i, j, last = op.token, op.layer, self.e.spec.num_layers + 1
        start, t = batch.window(i)
        positions = batch.positions[:, start:start + t]  # (b, t)
        fam, spec = self.e.family, self.e.spec
        if j == self.e.parts.start:  # the step's first part here: the step's mask
            batch.mask = ops.attention_mask(batch.key_mask[:, :start + t], start, t)
        if j == 0:
            ids = batch.ids if i == 0 else batch.outputs[:, i - 1:i].to(self.e.device)
            self.outputs[op.batch] = fam.embed(spec, w, ids, positions)
            return
        if j == last:
            logits = fam.head(spec, w, x[:, -1:])[:, 0]
            self.e.callbacks.on_logits(i, op.batch, logits)
            pick_tokens(batch, i, logits, self.sampling, self.generator, spec.pad_token_id)
            return
        q, k_new, v_new = fam.attention_inputs(spec, w, x, positions)
        attn, self.pending[(j - 1, op.batch)] = self.attention.step(
            i, j - 1, op.batch, cache_slot, q, k_new, v_new, batch, self.e.score_scale,
            self.links)
        x = fam.attention_output(spec, w, attn, x)
        self.outputs[op.batch] = fam.mlp(spec, w, x)

    # --- stores --------------------------------------------------------------------------

    def store_cache(self, op) -> None:
        layer = op.layer - 1
        pending = self.pending.pop((layer, op.batch))
        if not pending:
            return
        start = self.batches[op.batch].window(op.token)[0]
        slot = next(self.slots[op.kind])
        self._submit(op, lambda: self.cache_io.store(layer, op.batch, start, pending, slot,
                                                     self.links, op.token))

    def store_hidden(self, op) -> None:
        x = self.outputs.pop(op.batch)
        if self.acts.resident:
            self.acts.store(op.batch, x, self.links, op.token)
            return
        self._submit(op, lambda: self.acts.store(op.batch, x, self.links, op.token))

    # --- bookkeeping around a compute: its workspace, timing and trace ------------------

    def _workspace(self, op):
        """The step's intermediates, held on the gpu tier while it computes."""
        batch = self.batches[op.batch]
        first, tokens = batch.window(op.token)  # queries attend over first + tokens keys
        need = step_workspace_bytes(self.e.spec, batch.ids.shape[0], tokens, first + tokens,
                                    self.e.dtype)
        return self.e.tiers["gpu"].hold(need, "workspace: compute step")

    def _computed(self, op, start: float) -> None:
        self.event = cuda_sync.compute_done(self.e.device)
        end = time.perf_counter()
        self.e.callbacks.on_step(schedule.Step(op.token, op.layer, op.batch), start, end)
        self._trace({"op": "compute", "token": op.token, "layer": op.layer,
                     "batch": op.batch + self.batch_base,
                     "start_s": start - self.executor.origin,
                     "end_s": end - self.executor.origin})


    # --- the rest: the workspace check, the stores' end, tracing, closing -------------

    def _check_workspace(self) -> None:
        """Fail before generating if the largest step's intermediates cannot fit."""
        b = self.e.policy.gpu_batch_size
        need = step_workspace_bytes(self.e.spec, b, self.prompt_len, self.prompt_len,
                                    self.e.dtype)
        with self.e.tiers["gpu"].hold(need, "workspace: prefill step"):
            pass

    def _wait_stores(self) -> None:
        wait([f for key, f in self.futures.items() if key[0].endswith("_store")])

    def close(self) -> None:
        """Stop the I/O threads, drop the dequantised view, and break the cycle through the
        executor's trace hook (self._trace): without it a block's homes and buffers stay
        alive until Python's cycle collector runs, and memory grows block after block."""
        self.executor.close()
        self.executor.trace = None
        self.futures.clear()
        self.e.weights.release_view()

    def _clock(self) -> float:
        cuda_sync.synchronize(self.e.device)
        return time.perf_counter()

    def _trace(self, record: dict) -> None:
        record["bytes"] = self.links.take_op_bytes()
        self.e.callbacks.on_op(record)
