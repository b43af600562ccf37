"""Schedules: the order of compute steps over the paper's Figure 3 grid.

One row per GPU batch, one column per (token, layer). Layer index 0 is the input embedding,
1..L the decoder layers and L+1 the output head, so one step type covers the whole model.
i = token step (0 = prefill), j = layer, k = GPU batch.

    >>> list(zigzag(num_tokens=2, num_layers=1, num_batches=2))[:2]
    [Step(token=0, layer=0, batch=0), Step(token=0, layer=0, batch=1)]
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

SCHEDULES = ("row_by_row", "zigzag")


@dataclass(frozen=True)
class Step:
    token: int
    layer: int
    batch: int


def row_by_row(num_tokens: int, num_layers: int, num_batches: int) -> Iterator[Step]:
    """One GPU batch's whole generation before the next: only its cache is live."""
    for k in range(num_batches):
        for i in range(num_tokens):
            for j in range(num_layers):
                yield Step(i, j, k)


def zigzag(num_tokens: int, num_layers: int, num_batches: int) -> Iterator[Step]:
    """For each token and layer, every GPU batch of the block: a layer's weights serve them all."""
    for i in range(num_tokens):
        for j in range(num_layers):
            for k in range(num_batches):
                yield Step(i, j, k)


def steps(name: str, num_tokens: int, num_layers: int, num_batches: int) -> Iterator[Step]:
    if name == "row_by_row":
        return row_by_row(num_tokens, num_layers, num_batches)
    if name == "zigzag":
        return zigzag(num_tokens, num_layers, num_batches)
    raise ValueError(f"schedule.name={name!r}; allowed: {SCHEDULES}")
