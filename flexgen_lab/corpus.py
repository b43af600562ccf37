"""Real text: the fetched corpus (or a user's text file), one document per line, via `datasets`.

The default corpus is gensim's Lee background corpus (300 news articles, ~60k words), taken
from gensim's wheel by `python -m flexgen_lab fetch corpus` (flexgen_lab/fetch.py). The run's
`workload.prompts=corpus` and the `eval` command both read it here.

    >>> docs = load_documents(corpus_path(None))    # list[str], empty lines dropped
"""

from __future__ import annotations

from pathlib import Path

from flexgen_lab.config import ConfigError
from flexgen_lab.fetch import artifact_path, missing_hint, sha256_of

CORPUS = "corpus"  # the fetched artifact's name


def corpus_path(path: str | None, key: str = "eval.corpus") -> Path:
    """A user's text file, or the fetched corpus; ConfigError saying what to run if missing."""
    if path is not None:
        if not Path(path).is_file():
            raise ConfigError(f"{key}={path!r}: no such file; allowed: a UTF-8 text file, one "
                              "document per line (or null for the fetched corpus)")
        return Path(path)
    fetched = artifact_path(CORPUS)
    if not fetched.is_file():
        raise ConfigError(f"the corpus is not fetched: {missing_hint(CORPUS)}")
    return fetched


def load_documents(path: Path) -> list[str]:
    """The file's non-empty lines, read with `datasets`' local text loader (no hub)."""
    from datasets import load_dataset

    data = load_dataset("text", data_files=str(path), split="train")
    docs = [line.strip() for line in data["text"] if line.strip()]
    if not docs:
        raise ConfigError(f"corpus {str(path)!r} has no text")
    return docs


def corpus_sha256(path: Path) -> str:
    return sha256_of(path)
