"""How a model's parts are split over pipeline stages: one rule for the engine, the cost
model and the simulator.

Parts are numbered as in schedule.py: 0 the input embedding, 1..L the decoder layers, L + 1
the output head. Stage 0 owns the embedding, the last stage the head, and the decoder layers
are dealt in contiguous runs, the first L mod m stages taking one more.

    >>> [list(stage_layers(5, 2, s)) for s in range(2)]
    [[0, 1, 2], [3, 4]]
    >>> [list(stage_parts(5, 2, s)) for s in range(2)]
    [[0, 1, 2, 3], [4, 5, 6]]
"""

from __future__ import annotations


def _check(num_layers: int, stages: int, stage: int) -> None:
    if not 1 <= stages <= num_layers:
        raise ValueError(f"stages={stages}: allowed 1 to {num_layers} (one decoder layer each "
                         "at least)")
    if not 0 <= stage < stages:
        raise ValueError(f"stage={stage}: allowed 0 to {stages - 1}")


def stage_layers(num_layers: int, stages: int, stage: int) -> range:
    """The 0-based decoder layers of `stage`."""
    _check(num_layers, stages, stage)
    base, extra = divmod(num_layers, stages)
    first = stage * base + min(stage, extra)
    return range(first, first + base + (stage < extra))


def stage_parts(num_layers: int, stages: int, stage: int) -> range:
    """The part indices (0 embedding, 1..L layers, L + 1 head) that `stage` computes."""
    layers = stage_layers(num_layers, stages, stage)
    first = 0 if stage == 0 else layers.start + 1
    stop = num_layers + 2 if stage == stages - 1 else layers.stop + 1
    return range(first, stop)


def micro_blocks(stages: int, configured: int | None) -> int:
    """Blocks in flight: as configured, else one per stage (every stage busy)."""
    return stages if configured is None else configured
