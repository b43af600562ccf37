"""Prompts for a run: seeded synthetic token ids, or a tokenizer's encoding of built-in text.

Both come out left padded to workload.prompt_len with an attention mask, as the paper pads
every prompt of a batch to one length.

    >>> ids, mask = synthetic_prompts(spec, num_prompts=8, prompt_len=512, seed=0)
"""

from __future__ import annotations

import torch

from flexgen_lab.models.spec import ModelSpec

FIRST_ORDINARY_ID = 4  # clear of the special ids (pad, bos, eos, unk) vocabularies put first

SENTENCES = [
    "Paris is the capital city of",
    "The key to high-throughput generation on a single GPU is",
    "Offloading weights to the CPU and disk lets a small machine run",
    "In a zig-zag block schedule, the weights of one layer are shared by",
    "Group-wise quantisation compresses the KV cache to four bits by",
    "The cost model predicts the time of each layer from",
    "A linear program chooses where every tensor should live, so that",
    "Once upon a time, in a data centre far away,",
]


def synthetic_prompts(spec: ModelSpec, num_prompts: int, prompt_len: int, seed: int,
                      varied_lengths: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask), both (num_prompts, prompt_len); varied lengths lie in [s/2, s]."""
    gen = torch.Generator().manual_seed(seed)
    high = spec.vocab
    low = min(FIRST_ORDINARY_ID, high - 1)
    ids = torch.randint(low, high, (num_prompts, prompt_len), generator=gen)
    lengths = torch.full((num_prompts,), prompt_len)
    if varied_lengths:
        lengths = torch.randint(max(1, prompt_len // 2), prompt_len + 1, (num_prompts,),
                                generator=gen)
    return _left_pad(ids, lengths, spec.pad_token_id)


def _left_pad(ids: torch.Tensor, lengths: torch.Tensor, pad_id: int):
    prompt_len = ids.shape[1]
    mask = torch.arange(prompt_len)[None, :] >= (prompt_len - lengths)[:, None]
    return torch.where(mask, ids, torch.full_like(ids, pad_id)), mask.long()


def text_prompts(tokenizer_dir: str, spec: ModelSpec, num_prompts: int, prompt_len: int):
    """The built-in sentences, cycled and tokenised locally, left padded to prompt_len."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    rows = [tokenizer(SENTENCES[n % len(SENTENCES)])["input_ids"][-prompt_len:]
            for n in range(num_prompts)]
    ids = torch.full((num_prompts, prompt_len), spec.pad_token_id)
    for r, row in enumerate(rows):
        ids[r, prompt_len - len(row):] = torch.tensor(row)
    lengths = torch.tensor([len(row) for row in rows])
    return _left_pad(ids, lengths, spec.pad_token_id)


def unpadded(ids: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    """Each prompt's real token ids (padding removed)."""
    return [row[m.bool()].tolist() for row, m in zip(ids, mask, strict=True)]
