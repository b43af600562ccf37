"""The value object the planner and the simulator take (planner/job.py)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flexgen_lab.engine.policy import Policy
from flexgen_lab.models.spec import ModelSpec
from flexgen_lab.planner.cost_model import predict
from flexgen_lab.planner.job import Job
from flexgen_lab.planner.traffic import link_bytes
from flexgen_lab.sim.simulator import simulate
from tests.planner.test_cost_model import profile
from tests.strategies import policies

SPEC = ModelSpec.from_name("opt-tiny")


@settings(max_examples=20, deadline=None)
@given(policy=policies(max_batch_size=4, max_batches=3), blocks=st.integers(1, 3))
def test_a_jobs_prompts_are_whole_blocks_and_scale_what_it_moves(policy, blocks):
    one = Job(SPEC, policy, "zigzag", profile("t4-paper"), 6, 3, 4)
    many = one.replace(num_prompts=blocks * policy.block_size)
    assert (one.prompts, one.blocks) == (policy.block_size, 1)
    assert (many.prompts, many.blocks) == (blocks * policy.block_size, blocks)
    # blocks run one after another: bytes and time scale with them exactly
    assert link_bytes(many) == {p: {k: blocks * n for k, n in links.items()}
                                for p, links in link_bytes(one).items()}
    assert predict(many).decode_s == pytest.approx(blocks * predict(one).decode_s)
    assert simulate(many).generation_throughput == pytest.approx(
        simulate(one).generation_throughput)


def test_a_part_block_is_not_counted_and_with_policy_keeps_the_rest():
    job = Job(SPEC, _policy(), "row_by_row", profile("t4-paper"), 8, 4, 2, num_prompts=11)
    whole = job.replace(num_prompts=job.policy.block_size)  # 8: the 3 left over move nothing
    assert (job.prompts, job.blocks) == (11, 1)
    assert link_bytes(job) == link_bytes(whole)
    assert predict(job).num_prompts == 11  # as before the Job: the count is reported as given
    other = job.with_policy(_policy(gpu_batch_size=2))
    assert (other.spec, other.schedule, other.profile, other.prompt_len, other.gen_len,
            other.dtype_bytes, other.num_prompts) == (
        job.spec, job.schedule, job.profile, job.prompt_len, job.gen_len, job.dtype_bytes,
        job.num_prompts)
    assert other.policy.gpu_batch_size == 2 and job.policy.gpu_batch_size == 4


def _policy(gpu_batch_size: int = 4) -> Policy:
    return Policy(gpu_batch_size=gpu_batch_size, num_gpu_batches=2)
