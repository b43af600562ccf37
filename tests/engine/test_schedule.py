"""Schedules visit every (token, layer, batch) once, in the order docs/architecture.md defines."""

from __future__ import annotations

import pytest

from flexgen_lab.engine.schedule import Step, row_by_row, steps, zigzag


@pytest.mark.parametrize("order", [row_by_row, zigzag])
def test_every_cell_once(order):
    cells = list(order(3, 4, 2))
    assert len(cells) == len(set(cells)) == 3 * 4 * 2


def test_row_by_row_finishes_a_batch_before_the_next():
    cells = list(row_by_row(2, 3, 2))
    assert [c.batch for c in cells] == [0] * 6 + [1] * 6
    assert cells[5] == Step(token=1, layer=2, batch=0)


def test_zigzag_runs_all_batches_of_a_layer_together():
    cells = list(zigzag(2, 2, 3))
    assert [(c.layer, c.batch) for c in cells[:6]] == [(0, 0), (0, 1), (0, 2),
                                                       (1, 0), (1, 1), (1, 2)]
    assert all(c.token == 0 for c in cells[:6]) and cells[6].token == 1


def test_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="diagonal"):
        list(steps("diagonal", 1, 1, 1))
