"""Per-GPU-batch bookkeeping (ids, masks, positions, outputs), sampling, results, callbacks."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from flexgen_lab.models import ops


@dataclass(frozen=True)
class Sampling:
    """temperature 0 = greedy (the paper's setting); otherwise seeded multinomial sampling."""

    temperature: float = 0.0
    seed: int = 0
    stop_token: int | None = None
    # teacher forcing (the eval command): (num_prompts, gen_len) token ids emitted and fed
    # back instead of sampled ones; on_logits still sees each step's logits
    forced_ids: torch.Tensor | None = field(default=None, compare=False)


@dataclass
class Generation:
    output_ids: torch.Tensor  # (num_prompts, gen_len), on the CPU
    prefill_s: float  # first token step (prefill, which emits token 0), all batches
    decode_s: float  # every later token step, all batches, none extrapolated
    link_bytes: dict[str, dict[str, int]] = field(default_factory=dict)  # phase -> link -> bytes


class Callbacks:
    """Hooks the engine calls; subclass and override what you need (tests, tracing, progress)."""

    def on_logits(self, token: int, batch: int, logits: torch.Tensor) -> None:
        """logits (gpu_batch_size, vocab) of the last position, before sampling."""

    def on_step(self, step, start_s: float, end_s: float) -> None:
        """One compute step finished (times from time.perf_counter, unsynchronised)."""

    def on_op(self, record: dict) -> None:
        """One load/store/compute op ran: op, token, layer, batch, link, bytes, start_s, end_s."""


class BatchState:
    """One GPU batch's inputs, masks and outputs (b = gpu_batch_size); caches live in homes."""

    def __init__(self, ids: torch.Tensor, mask: torch.Tensor, gen_len: int,
                 device: torch.device, forced: torch.Tensor | None = None):
        b, prompt_len = ids.shape
        total = prompt_len + gen_len - 1  # the last generated token is never fed back
        self.prompt_len = prompt_len
        self.ids = ids.to(device)
        self.key_mask = torch.ones(b, total, dtype=torch.bool, device=device)  # (b, s)
        self.key_mask[:, :prompt_len] = mask.bool().to(device)
        self.positions = ops.positions_from_mask(self.key_mask)  # (b, s)
        self.outputs = torch.zeros(b, gen_len, dtype=torch.long)
        self.done = torch.zeros(b, dtype=torch.bool)
        self.mask: torch.Tensor | None = None  # (b, 1, t, s) for the current token step
        self.forced = forced  # (b, gen_len) teacher-forced tokens, or None

    def window(self, token: int) -> tuple[int, int]:
        """(first query position, number of queries) for a token step."""
        return (0, self.prompt_len) if token == 0 else (self.prompt_len + token - 1, 1)


def pick_tokens(batch: BatchState, i: int, logits: torch.Tensor, sampling: Sampling,
                generator: torch.Generator, pad_id: int) -> None:
    """Token i for every sequence; a finished sequence keeps emitting padding."""
    logits = logits.float().cpu()
    if batch.forced is not None:
        tokens = batch.forced[:, i].clone()
    elif sampling.temperature > 0:
        probs = torch.softmax(logits / sampling.temperature, dim=-1)
        tokens = torch.multinomial(probs, 1, generator=generator)[:, 0]
    else:
        tokens = logits.argmax(dim=-1)
    tokens = torch.where(batch.done, torch.full_like(tokens, pad_id), tokens)
    if sampling.stop_token is not None:
        batch.done |= tokens == sampling.stop_token
    batch.outputs[:, i] = tokens
