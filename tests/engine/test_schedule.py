"""Schedules visit every (token, layer, batch) once, in the order docs/architecture.md defines."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flexgen_lab.engine import schedule
from flexgen_lab.engine.schedule import Step, row_by_row, steps, zigzag
from flexgen_lab.pipeline.stages import stage_parts


@pytest.mark.parametrize("order", [row_by_row, zigzag])
def test_every_cell_once(order):
    cells = list(order(range(3), range(4), range(2)))
    assert len(cells) == len(set(cells)) == 3 * 4 * 2


def test_row_by_row_finishes_a_batch_before_the_next():
    cells = list(row_by_row(range(2), range(3), range(2)))
    assert [c.batch for c in cells] == [0] * 6 + [1] * 6
    assert cells[5] == Step(token=1, layer=2, batch=0)


def test_zigzag_runs_all_batches_of_a_layer_together():
    cells = list(zigzag(range(2), range(2), range(3)))
    assert [(c.layer, c.batch) for c in cells[:6]] == [(0, 0), (0, 1), (0, 2),
                                                       (1, 0), (1, 1), (1, 2)]
    assert all(c.token == 0 for c in cells[:6]) and cells[6].token == 1


def test_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="diagonal"):
        list(steps("diagonal", 1, 1, 1))


# Algorithm 1 of the paper, as the engine runs it: 2 tokens x 3 parts (0 = embedding,
# 1 = the decoder layer, 2 = the head) x 2 GPU batches, zig-zag. Read down: for each token
# i and part j, every batch k computes while the next part's weights, the next step's cache
# and hidden input load, and the step's new cache row and output store. Columns: op, i, j, k.
ZIGZAG_2x3x2 = """
load_weight 0 0 0   the embedding (a whole block uses one load)
load_weight 0 1 0   prefetch: layer 1's weights, while the embedding computes
compute 0 0 0
store_hidden 0 0 0
load_hidden 0 1 0   prefetch: batch 0's input to layer 1 (batch 1 computes in between)
compute 0 0 1
store_hidden 0 0 1
load_weight 0 2 0   prefetch: the head
load_hidden 0 1 1
compute 0 1 0
store_cache 0 1 0   the prompt's cache rows go home
store_hidden 0 1 0
load_hidden 0 2 0
compute 0 1 1
store_cache 0 1 1
store_hidden 0 1 1
load_weight 1 0 0   prefetch: the next token's embedding
load_hidden 0 2 1
compute 0 2 0       the head: logits, the next token (its output is not stored)
compute 0 2 1
load_weight 1 1 0
compute 1 0 0
store_hidden 1 0 0
load_cache 1 1 0    decode: batch 0's past cache for layer 1
load_hidden 1 1 0
compute 1 0 1
store_hidden 1 0 1
load_weight 1 2 0
load_cache 1 1 1
load_hidden 1 1 1
compute 1 1 0       (the last token's new cache row is never read: not stored)
store_hidden 1 1 0
load_hidden 1 2 0
compute 1 1 1
store_hidden 1 1 1
load_hidden 1 2 1
compute 1 2 0
compute 1 2 1
"""


def test_the_zigzag_op_stream_reads_like_algorithm_1():
    expected = [tuple(line.split()[:4]) for line in ZIGZAG_2x3x2.strip().splitlines()]
    got = [(op.kind, str(op.token), str(op.layer), str(op.batch))
           for op in schedule.ops("zigzag", 2, 3, 2)]
    assert got == expected


@given(st.sampled_from(schedule.SCHEDULES), st.integers(1, 4), st.integers(1, 6),
       st.integers(1, 3), st.data())
def test_a_stage_token_stream_loads_what_each_compute_reads(name, tokens, layers, batches, data):
    """Pipeline stages run one token of their parts at a time (pipeline/stages.py): every
    compute of such a stream finds its weights, hidden input and cache loads before it."""
    stages = data.draw(st.integers(1, layers))
    head = layers + 1
    computes = []
    for i in range(tokens):
        for s in range(stages):
            stream = list(schedule.ops(name, tokens, layers + 2, batches,
                                       stage_parts(layers, stages, s), i))
            seen = set()
            for op in stream:
                where = (op.token, op.layer, op.batch)
                if op.kind == "compute":
                    computes.append(where)
                    assert any(k == "load_weight" and (t, j) == where[:2] for k, t, j, _ in seen)
                    if op.layer > 0:
                        assert ("load_hidden", *where) in seen
                    if 0 < op.layer < head and op.token > 0:
                        assert ("load_cache", *where) in seen
                seen.add((op.kind, *where))
    assert sorted(computes) == sorted((c.token, c.layer, c.batch)
                                      for c in schedule.steps(name, tokens, layers + 2, batches))
