"""A policy's store columns and the policy read back from a stored row are one conversion."""

from __future__ import annotations

import dataclasses

from hypothesis import given, settings

from flexgen_lab.engine.policy import Policy
from tests.strategies import policies


@settings(max_examples=40, deadline=None)
@given(policies())
def test_a_stored_policy_reads_back_as_itself(policy):
    row = policy.store_columns()
    assert row["w_disk"] == policy.weights.disk and row["a_cpu"] == policy.activations.cpu
    back = Policy.from_store_row(row)
    # the store keeps neither renormalisation nor pinning (not in the run's columns)
    assert back == dataclasses.replace(policy, attn_renormalize=False, pin_memory=True)
