"""The generation engine: runs a schedule's steps (token i, layer j, GPU batch k), Algorithm 1.

This version keeps every tensor resident on the compute device (the policy "everything on the
gpu tier"); offloaded placements are refused by the runner before any weight is made.

    >>> engine = Engine(ModelSpec.from_name("opt-125m"), DummyWeights(spec, 0), Policy())
    >>> gen = engine.generate(input_ids, attention_mask, gen_len=32)
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from flexgen_lab.engine import schedule as schedules
from flexgen_lab.engine.policy import Policy
from flexgen_lab.models import families, ops
from flexgen_lab.models.spec import ModelSpec
from flexgen_lab.models.weights import part_names


@dataclass(frozen=True)
class Sampling:
    """temperature 0 = greedy (the paper's setting); otherwise seeded multinomial sampling."""

    temperature: float = 0.0
    seed: int = 0
    stop_token: int | None = None


@dataclass
class Generation:
    output_ids: torch.Tensor  # (num_prompts, gen_len), on the CPU
    prefill_s: float  # first token step (prefill, which emits token 0), all batches
    decode_s: float  # every later token step, all batches, none extrapolated


class Callbacks:
    """Hooks the engine calls; subclass and override what you need (tests, tracing, progress)."""

    def on_logits(self, token: int, batch: int, logits: torch.Tensor) -> None:
        """logits (gpu_batch_size, vocab) of the last position, before sampling."""

    def on_step(self, step: schedules.Step, start_s: float, end_s: float) -> None:
        """One compute step finished (times from time.perf_counter, unsynchronised)."""


class BatchState:
    """One GPU batch's inputs, masks, KV cache and outputs (b = gpu_batch_size)."""

    def __init__(self, spec: ModelSpec, ids: torch.Tensor, mask: torch.Tensor, gen_len: int,
                 dtype: torch.dtype, device: torch.device):
        b, prompt_len = ids.shape
        total = prompt_len + gen_len - 1  # the last generated token is never fed back
        self.prompt_len = prompt_len
        self.ids = ids.to(device)
        self.key_mask = torch.ones(b, total, dtype=torch.bool, device=device)  # (b, s)
        self.key_mask[:, :prompt_len] = mask.bool().to(device)
        self.positions = ops.positions_from_mask(self.key_mask)  # (b, s)
        shape = (b, spec.num_kv_heads, total, spec.head_dim)
        self.cache = [(torch.zeros(shape, dtype=dtype, device=device),
                       torch.zeros(shape, dtype=dtype, device=device))
                      for _ in range(spec.num_layers)]
        self.outputs = torch.zeros(b, gen_len, dtype=torch.long)
        self.done = torch.zeros(b, dtype=torch.bool)
        self.hidden: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None

    def window(self, token: int) -> tuple[int, int]:
        """(first query position, number of queries) for a token step."""
        return (0, self.prompt_len) if token == 0 else (self.prompt_len + token - 1, 1)


class Engine:
    """Executes a policy's schedule over one block of prompts at a time."""

    def __init__(self, spec: ModelSpec, weights, policy: Policy, schedule: str = "zigzag",
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 callbacks: Callbacks | None = None):
        if not policy.all_resident:
            raise ValueError("this engine keeps everything on the gpu tier; offloaded "
                             "placements need the offloading engine")
        self.spec, self.policy, self.schedule = spec, policy, schedule
        self.device, self.dtype = torch.device(device), dtype
        self.family = families.get(spec.family)
        self.score_scale = families.score_scale(spec)
        self.callbacks = callbacks or Callbacks()
        self.weights = self._load_weights(weights)

    def _load_weights(self, source) -> list[dict[str, torch.Tensor]]:
        parts = [
            {k: v.to(self.device) for k, v in source.part(part, j, self.dtype).items()}
            for part, j in part_names(self.spec)
        ]
        if self.spec.tie_embeddings:  # the head reuses the embedding table, not a copy
            parts[-1]["embed_tokens.weight"] = parts[0]["embed_tokens.weight"]
        return parts

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, gen_len: int,
                 sampling: Sampling = Sampling()) -> Generation:
        """input_ids, attention_mask (num_prompts, prompt_len), left padded."""
        b = self.policy.gpu_batch_size
        if input_ids.shape[0] % self.policy.block_size:
            raise ValueError(f"{input_ids.shape[0]} prompts is not a multiple of the block size "
                             f"{self.policy.block_size}")
        outputs, prefill_s, decode_s = [], 0.0, 0.0
        generator = torch.Generator().manual_seed(sampling.seed)
        for start in range(0, input_ids.shape[0], self.policy.block_size):
            batches = [
                BatchState(self.spec, input_ids[s:s + b], attention_mask[s:s + b], gen_len,
                           self.dtype, self.device)
                for s in range(start, start + self.policy.block_size, b)
            ]
            p, d = self._run_block(batches, gen_len, sampling, generator)
            prefill_s, decode_s = prefill_s + p, decode_s + d
            outputs.extend(batch.outputs for batch in batches)
        return Generation(torch.cat(outputs), prefill_s, decode_s)

    def _run_block(self, batches: list[BatchState], gen_len: int, sampling: Sampling,
                   generator: torch.Generator) -> tuple[float, float]:
        """Algorithm 1's loop; returns (prefill seconds, decode seconds) of this block."""
        phase = [0.0, 0.0]  # prefill, decode
        steps = schedules.steps(self.schedule, gen_len, self.spec.num_layers + 2, len(batches))
        current_token, segment_start = None, None
        for step in steps:
            if step.token != current_token:  # a token step ends: charge it to its phase
                if current_token is not None:
                    phase[current_token > 0] += self._clock() - segment_start
                current_token, segment_start = step.token, self._clock()
            t0 = time.perf_counter()
            self._compute(step, batches[step.batch], sampling, generator)
            self.callbacks.on_step(step, t0, time.perf_counter())
        phase[current_token > 0] += self._clock() - segment_start
        return phase[0], phase[1]

    def _clock(self) -> float:
        """Wall time after the device has finished its queued work."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _compute(self, step: schedules.Step, batch: BatchState, sampling: Sampling,
                 generator: torch.Generator) -> None:
        i, j, last = step.token, step.layer, self.spec.num_layers + 1
        start, t = batch.window(i)
        positions = batch.positions[:, start:start + t]  # (b, t)
        if j == 0:
            ids = batch.ids if i == 0 else batch.outputs[:, i - 1:i].to(self.device)
            batch.hidden = self.family.embed(self.spec, self.weights[0], ids, positions)
            batch.mask = ops.attention_mask(batch.key_mask[:, :start + t], start, t)
        elif j < last:
            batch.hidden = self._layer(j - 1, self.weights[j], batch, positions, start, t)
        else:
            logits = self.family.head(self.spec, self.weights[j], batch.hidden[:, -1:])[:, 0]
            self.callbacks.on_logits(i, step.batch, logits)
            self._emit(batch, i, logits, sampling, generator)

    def _layer(self, layer: int, w: dict, batch: BatchState, positions: torch.Tensor,
               start: int, t: int) -> torch.Tensor:
        x = batch.hidden  # (b, t, h)
        q, k_new, v_new = self.family.attention_inputs(self.spec, w, x, positions)
        k_cache, v_cache = batch.cache[layer]  # (b, nkv, s, d)
        k_cache[:, :, start:start + t] = k_new
        v_cache[:, :, start:start + t] = v_new
        end = start + t
        attn = ops.attention(q, k_cache[:, :, :end], v_cache[:, :, :end], batch.mask,
                             self.score_scale)
        x = self.family.attention_output(self.spec, w, attn, x)
        return self.family.mlp(self.spec, w, x)

    def _emit(self, batch: BatchState, i: int, logits: torch.Tensor, sampling: Sampling,
              generator: torch.Generator) -> None:
        """Pick token i for every sequence; a finished sequence keeps emitting padding."""
        logits = logits.float().cpu()
        if sampling.temperature > 0:
            probs = torch.softmax(logits / sampling.temperature, dim=-1)
            tokens = torch.multinomial(probs, 1, generator=generator)[:, 0]
        else:
            tokens = logits.argmax(dim=-1)
        tokens = torch.where(batch.done, torch.full_like(tokens, self.spec.pad_token_id), tokens)
        if sampling.stop_token is not None:
            batch.done |= tokens == sampling.stop_token
        batch.outputs[:, i] = tokens
