"""Tokens of another system against ours, prompt by prompt."""

from __future__ import annotations

from flexgen_lab.results.parity import compare


def test_shared_prompts_decide_and_nothing_shared_says_nothing():
    ours = {(5, 6): [1, 2], (7,): [3, 4]}
    assert compare(ours, {(5, 6): [1, 2]}) is True  # fewer prompts: the shared ones count
    assert compare(ours, {(5, 6): [1, 2], (7,): [3, 9]}) is False
    assert compare(ours, {(8,): [1, 2]}) is None
    assert compare(None, ours) is None and compare(ours, {}) is None
