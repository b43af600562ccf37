"""The one dependency table (engine/dependencies.py, used by the engine and the simulator):
every compute's inputs are filled by ops before it in the stream."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from flexgen_lab.engine import dependencies as deps
from flexgen_lab.engine import schedule


@given(st.sampled_from(schedule.SCHEDULES), st.integers(1, 4), st.integers(1, 4),
       st.integers(1, 3))
def test_every_dependency_is_filled_earlier_in_the_stream(name, tokens, layers, batches):
    filled = set()
    for op in schedule.ops(name, tokens, layers + 2, batches):
        if op.kind == "compute":
            needed = deps.waits_for(op)
            # weights and (past the embedding) the hidden input are always loaded first;
            # the cache is loaded unless it is read in place (the engine's only skip)
            assert needed[0] in filled
            assert op.layer == 0 or deps.hidden(op.batch) in filled
            assert op.token == 0 or op.layer in (0, layers + 1) or (
                deps.cache(op.layer, op.batch) in filled)
        else:
            filled.add(deps.fills(op))

