"""The offloading engine: executes a schedule's op stream over the gpu, cpu and disk tiers.

Algorithm 1 of the paper: for token i, layer j, GPU batch k, compute while the next step's
weights, cache and activations load and the previous step's results store. Each buffer has
its own future (and, on CUDA, event); a compute waits only for what it reads. With
policy.overlap off the same op stream runs inline, op after op. Everything on the gpu tier is
the resident case: loads and stores then move nothing.

Where the loop lives: the loop nest and the place of every load and store around each
compute is `schedule.ops` (tests/engine/test_schedule.py pins its stream for 2 tokens x
3 parts x 2 batches, annotated as Algorithm 1); which buffer each op fills and which it
waits for is `dependencies.py`, the one table the simulator (sim/simulator.py) times the same
stream by; `BlockRun.run` (block_run.py) walks the stream and hands each op to the method
of its name (load_weight ... store_hidden), whose future returns what it brought;
`BlockRun.compute` and `_cell` are one step's arithmetic (models/<family>.py,
attention.py); `cache_io.CacheIO` the cache's loads, stores and buffers.

    >>> with Engine(spec, DummyWeights(spec, 0), Policy(weights=Placement(0.2, 0.8))) as engine:
    ...     gen = engine.generate(input_ids, attention_mask, gen_len=32)
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from flexgen_lab.engine import bounce, owners
from flexgen_lab.engine.batch import BatchState, Callbacks, Generation, Sampling
from flexgen_lab.engine.block_run import BlockRun, block_generator
from flexgen_lab.engine.compress import CompressionConfig
from flexgen_lab.engine.disk import DiskDir
from flexgen_lab.engine.memory import release_free_heap
from flexgen_lab.engine.policy import Policy
from flexgen_lab.engine.tiers import Tiers
from flexgen_lab.engine.transfer import IO_THREADS, Links
from flexgen_lab.engine.weight_cache import WeightCache
from flexgen_lab.engine.weight_homes import WeightHomes
from flexgen_lab.models import families
from flexgen_lab.models.spec import ModelSpec

UNLIMITED = 1 << 62
__all__ = ["Engine", "Sampling", "Generation", "Callbacks"]


class Engine:
    """Holds a model's weights at home on the tiers and generates block after block."""

    def __init__(self, spec: ModelSpec, weights, policy: Policy, schedule: str = "zigzag",
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 callbacks: Callbacks | None = None, tiers: Tiers | None = None,
                 offload_dir: str | Path | None = None, disk_io: str = "direct",
                 io_workers: int = IO_THREADS, weight_cache: str = "rebuild",
                 parts: range | None = None):
        """parts: the part indices this process computes (0 embedding, 1..L decoder layers,
        L + 1 head): a pipeline stage's (pipeline/stages.py), else the whole model."""
        self.spec, self.policy, self.schedule = spec, policy, schedule
        self.parts = range(spec.num_layers + 2) if parts is None else parts
        self.device, self.dtype = torch.device(device), dtype
        self.family = families.get(spec.family)
        self.score_scale = families.score_scale(spec)
        self.callbacks = callbacks or Callbacks()
        self.tiers = tiers or Tiers(UNLIMITED, UNLIMITED, UNLIMITED, device, policy.pin_memory)
        self.offload_dir = Path(offload_dir or Path(tempfile.gettempdir()) / "flexgen_lab_offload")
        self.disk_io, self.io_workers = disk_io, io_workers
        self.weight_cache_mode = weight_cache
        owners.sweep(self.offload_dir)  # scratch and half-built caches of killed runs
        self._scratch: DiskDir | None = None
        self._weight_cache: WeightCache | None = None
        self.placed: dict[str, dict[str, int]] = {}  # kind -> tier -> bytes achieved
        try:
            self.tiers["cpu"].reserve(self._bounce_bytes(), "disk: bounce buffers")
            self.weights = self._place_weights(weights)
        except BaseException:
            self.close()
            raise
        self.placed["weights"] = self.weights.tier_bytes()
        release_free_heap()

    def _bounce_bytes(self, prompt_len: int | None = None, gen_len: int = 1) -> int:
        """The bounce buffers' reservation: for weight requests, or a block's (bounce.py)."""
        largest = (bounce.largest_weight_request(self.spec, self.policy, self.dtype)
                   if prompt_len is None else
                   bounce.largest_block_request(self.spec, self.policy, self.dtype, prompt_len,
                                                gen_len))
        return bounce.bounce_reserve(largest, self.io_workers)

    def placement_report(self) -> dict:
        """Asked (share x total) and achieved bytes per tier for weights, cache, activations."""
        shares = {"weights": self.policy.weights, "cache": self.policy.cache,
                  "activations": self.policy.activations}
        report = {}
        for kind, achieved in self.placed.items():
            total = sum(achieved.values())
            report[kind] = {tier: {"asked": getattr(shares[kind], tier) * total,
                                   "achieved": achieved.get(tier, 0)}
                            for tier in ("gpu", "cpu", "disk")}
        return report

    def _place_weights(self, source) -> WeightHomes:
        p = self.policy
        config = (CompressionConfig(p.compress_bits, p.compress_group_size, 0)
                  if p.compress_weight else None)
        if p.weights.disk > 0:
            self._weight_cache = WeightCache(self.offload_dir, source, self.spec, self.dtype,
                                             config, self.disk_io, self.weight_cache_mode)
        return WeightHomes(self.spec, source, p.weights, self.tiers, self.dtype, config,
                           self._weight_cache, self.parts)

    def scratch(self) -> DiskDir:
        """This run's own directory for cache and activations on disk (made on first use)."""
        if self._scratch is None:
            self._scratch = DiskDir(self.offload_dir, unique=True, mode=self.disk_io)
        return self._scratch

    def close(self) -> None:
        """Remove this run's scratch files (the shared weight cache stays)."""
        if self._scratch is not None:
            self._scratch.remove()
            self._scratch = None
        if self._weight_cache is not None:
            self._weight_cache.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, gen_len: int,
                 sampling: Sampling | None = None) -> Generation:
        """input_ids, attention_mask (num_prompts, prompt_len), left padded, whole blocks."""
        sampling = sampling or Sampling()
        block = self.policy.block_size
        if input_ids.shape[0] % block:
            raise ValueError(f"{input_ids.shape[0]} prompts is not a multiple of the block size "
                             f"{block}")
        links = Links()
        outputs, prefill_s, decode_s = [], 0.0, 0.0
        for start in range(0, input_ids.shape[0], block):
            batches = self.block_batches(input_ids, attention_mask, start, gen_len, sampling)
            used = self.tiers.checkpoint()
            try:
                generator = block_generator(sampling, start // block)
                p, d = BlockRun(self, batches, gen_len, sampling, generator, links).run()
            finally:
                self.tiers.restore(used)  # the block's cache, activations and staging go
            prefill_s, decode_s = prefill_s + p, decode_s + d
            outputs.extend(batch.outputs for batch in batches)
        link_bytes = {phase: links.bytes(phase) for phase in ("prefill", "decode")}
        return Generation(torch.cat(outputs), prefill_s, decode_s, link_bytes)

    def block_batches(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, start: int,
                      gen_len: int, sampling: Sampling) -> list[BatchState]:
        """The GPU batches of the block of prompts that begins at `start`."""
        b, forced = self.policy.gpu_batch_size, sampling.forced_ids
        return [BatchState(input_ids[s:s + b], attention_mask[s:s + b], gen_len, self.device,
                           None if forced is None else forced[s:s + b])
                for s in range(start, start + self.policy.block_size, b)]
