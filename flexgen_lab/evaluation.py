"""Accuracy on real text through the engine: perplexity and last-word accuracy (Table 5's analog).

Cache compression and sparse attention act only in decode, so every prediction is scored in
decode: each sequence's first prefix_len tokens are prefilled, then the text's own tokens are
fed one at a time through the engine's decode path (teacher forcing, Sampling.forced_ids), so
each prediction reads the compressed or sparse cache. Only tokens predicted by decode steps
are scored: in a sequence of L tokens, tokens prefix_len + 1 .. L - 1 (the prefill's
prediction of token prefix_len is not scored), the same positions for every variant.

- Perplexity: the corpus' documents are tokenised and joined (each ends with the tokenizer's
  end-of-sequence token) and cut into n_windows windows of window_len tokens, stride apart;
  exp(mean negative log-likelihood) over every scored token of every window.
- Last-word accuracy, in the LAMBADA manner: for each passage (a document whose last word is
  alphabetic, trailing punctuation dropped), the last window_len tokens of its text up to and
  including that word; the word is right when every one of its tokens (" word" tokenised, so a
  multi-token word counts once and needs all its tokens) is the model's greedy prediction
  given the true text before it.

    python -m flexgen_lab eval model=smollm2-135m-instruct compress=both policy.attn_sparsity=0.1
"""

from __future__ import annotations

import math
import string
import time
from dataclasses import dataclass

import torch

from flexgen_lab.engine.batch import Callbacks, Sampling


@dataclass
class EvalText:
    """Token windows for both metrics, and how they were cut."""

    windows: torch.Tensor  # (n_windows, window_len) for perplexity
    passages: torch.Tensor  # (n_passages, window_len), each ending with its last word
    word_lens: list[int]  # tokens of each passage's last word (at its end)
    stride: int


def perplexity_windows(tokenizer, documents: list[str], window_len: int, stride: int,
                       n_windows: int) -> torch.Tensor:
    stream: list[int] = []
    eos = tokenizer.eos_token_id
    need = (n_windows - 1) * stride + window_len
    for doc in documents:
        stream += tokenizer(doc)["input_ids"] + ([eos] if eos is not None else [])
        if len(stream) >= need:
            break
    if len(stream) < need:
        raise ValueError(f"the corpus has {len(stream)} tokens; eval.n_windows={n_windows} "
                         f"windows of eval.window_len={window_len} (stride {stride}) need {need}")
    return torch.tensor([stream[s:s + window_len] for s in range(0, n_windows * stride, stride)])


def last_word_passages(tokenizer, documents: list[str], window_len: int, prefix_len: int,
                       n_passages: int) -> tuple[torch.Tensor, list[int]]:
    rows, word_lens = [], []
    for doc in documents:
        context, _, last = doc.rstrip().rpartition(" ")
        word = last.strip(string.punctuation + "\"'")
        if not word.isalpha() or not context:
            continue
        word_ids = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
        ids = tokenizer(context)["input_ids"] + word_ids
        if len(ids) < window_len or len(word_ids) > window_len - prefix_len - 1:
            continue
        rows.append(ids[-window_len:])
        word_lens.append(len(word_ids))
        if len(rows) == n_passages:
            return torch.tensor(rows), word_lens
    raise ValueError(f"the corpus has {len(rows)} passages of at least eval.window_len="
                     f"{window_len} tokens ending with a word; eval.passages={n_passages} asked")


class TeacherForcedScores(Callbacks):
    """Collects, per decode step, the log-probability of the true next token and whether it
    was the greedy choice. `offset` is the block's first row (set by `score`)."""

    def __init__(self, targets: torch.Tensor, gpu_batch_size: int, progress=None):
        n, steps = targets.shape
        self.targets, self.b, self.offset, self.progress = targets, gpu_batch_size, 0, progress
        self.logprob = torch.full((n, steps - 1), float("nan"), dtype=torch.float64)
        self.correct = torch.zeros(n, steps - 1, dtype=torch.bool)
        self.generations: list = []  # each block's Generation (times, bytes per link)

    def on_logits(self, token, batch, logits) -> None:
        if token == 0:  # the prefill's prediction: not scored
            return
        rows = slice(self.offset + batch * self.b, self.offset + (batch + 1) * self.b)
        target = self.targets[rows, token]
        logp = torch.log_softmax(logits.double().cpu(), dim=-1)
        self.logprob[rows, token - 1] = logp.gather(1, target[:, None])[:, 0]
        self.correct[rows, token - 1] = logits.argmax(dim=-1).cpu() == target
        if self.progress is not None:
            self.progress.update(self.b)


def score(engine, sequences: torch.Tensor, prefix_len: int, progress=None) -> TeacherForcedScores:
    """Teacher-forced decoding of `sequences` (n, L) block after block; rows past a partial
    last block are padded with copies and dropped. Columns of the result: tokens prefix_len+1
    .. L-1 (the decode steps' predictions)."""
    n = sequences.shape[0]
    block = engine.policy.block_size
    padded = torch.cat([sequences, sequences[-1:].expand(-(-n // block) * block - n, -1)])
    targets = padded[:, prefix_len:]
    scores = TeacherForcedScores(targets, engine.policy.gpu_batch_size, progress)
    engine.callbacks = scores
    for start in range(0, padded.shape[0], block):
        scores.offset = start
        rows = padded[start:start + block]
        prompt = rows[:, :prefix_len]
        scores.generations.append(engine.generate(
            prompt, torch.ones_like(prompt), targets.shape[1],
            Sampling(forced_ids=targets[start:start + block])))
    scores.logprob, scores.correct = scores.logprob[:n], scores.correct[:n]
    return scores


def perplexity(scores: TeacherForcedScores) -> float:
    return math.exp(-scores.logprob.mean().item())


def last_word_accuracy(scores: TeacherForcedScores, word_lens: list[int]) -> float:
    right = [bool(scores.correct[r, -k:].all()) for r, k in enumerate(word_lens)]
    return sum(right) / len(right)


def evaluate(engine, text: EvalText, prefix_len: int, show_progress: bool = True) -> dict:
    """Both metrics through `engine` (its policy is the variant), with timings."""
    from tqdm import tqdm

    steps = (text.windows.shape[0] + text.passages.shape[0]) * (text.windows.shape[1]
                                                                  - prefix_len - 1)
    start = time.perf_counter()
    with tqdm(total=steps, unit="tok", desc="eval", disable=None if show_progress else True,
              leave=False) as bar:
        ppl_scores = score(engine, text.windows, prefix_len, bar)
        word_scores = score(engine, text.passages, prefix_len, bar)
    return {"perplexity": perplexity(ppl_scores),
            "last_word_accuracy": last_word_accuracy(word_scores, text.word_lens),
            "scored_tokens": ppl_scores.logprob.numel(), "wall_s": time.perf_counter() - start,
            "logprob": ppl_scores.logprob}
