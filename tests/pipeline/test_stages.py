"""The stage split: every part exactly once, in order, sizes as the rule says."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flexgen_lab.pipeline.stages import stage_layers, stage_parts


@st.composite
def splits(draw):
    layers = draw(st.integers(1, 200))
    return layers, draw(st.integers(1, layers))


@given(splits())
def test_parts_cover_the_model_once_in_order(split):
    layers, stages = split
    parts = [p for s in range(stages) for p in stage_parts(layers, stages, s)]
    assert parts == list(range(layers + 2))
    sizes = [len(stage_layers(layers, stages, s)) for s in range(stages)]
    base, extra = divmod(layers, stages)
    assert sizes == [base + 1] * extra + [base] * (stages - extra)


def test_embedding_on_stage_0_and_head_on_the_last():
    assert list(stage_parts(3, 3, 0)) == [0, 1]
    assert list(stage_parts(3, 3, 1)) == [2]
    assert list(stage_parts(3, 3, 2)) == [3, 4]
    assert list(stage_parts(4, 1, 0)) == [0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize("layers, stages, stage", [(2, 3, 0), (2, 0, 0), (4, 2, 2), (4, 2, -1)])
def test_bad_splits_are_refused_naming_the_value(layers, stages, stage):
    with pytest.raises(ValueError, match="stage"):
        stage_layers(layers, stages, stage)
