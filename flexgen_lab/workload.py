"""Prompts for a run: seeded synthetic token ids, or a tokenizer's encoding of real text (the
built-in sentences, one question (workload.prompt_text), or passages of the fetched corpus).

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


def load_tokenizer(path: str):
    """The model's own tokenizer: embedded in a .gguf file, or a local directory's files."""
    from flexgen_lab.models.gguf import is_gguf
    from flexgen_lab.models.gguf import load_tokenizer as gguf_tokenizer

    if is_gguf(path):
        return gguf_tokenizer(path)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def _padded_rows(rows: list[list[int]], prompt_len: int, pad_id: int):
    ids = torch.full((len(rows), prompt_len), pad_id)
    for r, row in enumerate(rows):
        ids[r, prompt_len - len(row):] = torch.tensor(row, dtype=torch.long)
    return _left_pad(ids, torch.tensor([len(row) for row in rows]), pad_id)


def text_prompts(tokenizer, spec: ModelSpec, num_prompts: int, prompt_len: int):
    """The built-in sentences, cycled and tokenised locally, left padded to prompt_len."""
    rows = [tokenizer(SENTENCES[n % len(SENTENCES)])["input_ids"][-prompt_len:]
            for n in range(num_prompts)]
    return _padded_rows(rows, prompt_len, spec.pad_token_id)


def question_ids(tokenizer, text: str, chat_template: bool) -> list[int]:
    """workload.prompt_text's ids, formatted as a user turn when the tokenizer has a chat
    template (and workload.chat_template is on)."""
    if chat_template and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                            add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    return tokenizer(text)["input_ids"]


def question_prompts(tokenizer, spec: ModelSpec, num_prompts: int, prompt_len: int, text: str,
                     chat_template: bool):
    """The same question for every sequence; ConfigError when it exceeds prompt_len."""
    from flexgen_lab.config import ConfigError

    row = question_ids(tokenizer, text, chat_template)
    if len(row) > prompt_len:
        raise ConfigError(f"workload.prompt_text is {len(row)} tokens (chat template "
                          f"{'on' if chat_template else 'off'}), more than workload.prompt_len="
                          f"{prompt_len}; allowed: a prompt_len of at least {len(row)}")
    return _padded_rows([row] * num_prompts, prompt_len, spec.pad_token_id)


def corpus_prompts(tokenizer, spec: ModelSpec, num_prompts: int, prompt_len: int, seed: int,
                   documents: list[str]):
    """Seeded draws from real text: each prompt is the start of a random document, cut to a
    random length in [prompt_len/2, prompt_len] tokens (shorter documents whole)."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(num_prompts):
        doc = documents[int(torch.randint(len(documents), (1,), generator=gen))]
        length = int(torch.randint(max(1, prompt_len // 2), prompt_len + 1, (1,), generator=gen))
        rows.append(tokenizer(doc)["input_ids"][:length])
    return _padded_rows(rows, prompt_len, spec.pad_token_id)


def unpadded(ids: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    """Each prompt's real token ids (padding removed)."""
    return [row[m.bool()].tolist() for row, m in zip(ids, mask, strict=True)]
