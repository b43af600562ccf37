"""Schedules: the order of compute steps over the paper's Figure 3 grid.

One row per GPU batch, one column per (token, layer). Layer index 0 is the input embedding,
1..L the decoder layers and L+1 the output head, so one step type covers the whole model.
i = token step (0 = prefill), j = layer, k = GPU batch.

    >>> list(zigzag(tokens=range(2), parts=range(1), batches=range(2)))[:2]
    [Step(token=0, layer=0, batch=0), Step(token=0, layer=0, batch=1)]
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

SCHEDULES = ("row_by_row", "zigzag")
OP_KINDS = ("load_weight", "load_cache", "load_hidden", "compute", "store_cache",
            "store_hidden")


@dataclass(frozen=True)
class Step:
    token: int
    layer: int
    batch: int


@dataclass(frozen=True)
class Op:
    """One operation of a schedule's stream; (token, layer, batch) index the grid."""

    kind: str
    token: int
    layer: int
    batch: int


def row_by_row(tokens, parts, batches) -> Iterator[Step]:
    """One GPU batch's whole generation before the next: only its cache is live."""
    for k in batches:
        for i in tokens:
            for j in parts:
                yield Step(i, j, k)


def zigzag(tokens, parts, batches) -> Iterator[Step]:
    """For each token and layer, every GPU batch of the block: a layer's weights serve them all."""
    for i in tokens:
        for j in parts:
            for k in batches:
                yield Step(i, j, k)


def steps(name: str, num_tokens: int, num_layers: int, num_batches: int,
          parts: range | None = None, token: int | None = None) -> Iterator[Step]:
    """The grid's steps in `name`'s order: every token, or only `token`; every part, or only
    `parts` (a pipeline stage's, pipeline/stages.py)."""
    tokens = range(num_tokens) if token is None else range(token, token + 1)
    parts = range(num_layers) if parts is None else parts
    if name == "row_by_row":
        return row_by_row(tokens, parts, range(num_batches))
    if name == "zigzag":
        return zigzag(tokens, parts, range(num_batches))
    raise ValueError(f"schedule.name={name!r}; allowed: {SCHEDULES}")


def ops(name: str, num_tokens: int, num_layers: int, num_batches: int,
        parts: range | None = None, token: int | None = None) -> Iterator[Op]:
    """The op stream: loads for the next step are issued before the current compute.

    num_layers counts the embedding (0) and the head (last). Weights load once per run of
    steps that share (token, layer): once per block in zigzag, once per batch in row_by_row;
    the next run's weights are requested as the current run starts. A step's hidden input is
    prefetched when the step before it belongs to another batch (otherwise the current step
    is what produces it). Cache exists for decoder layers only, and the last token's new cache
    row is never read again, so it is not stored. `parts` and `token` cut the stream to a
    pipeline stage's parts and one token step (steps()); the first step's own cache load then
    leads the stream, since no earlier step prefetches it.
    """
    cells = list(steps(name, num_tokens, num_layers, num_batches, parts, token))
    head = num_layers - 1
    groups = _weight_group_starts(cells)
    first = cells[0]
    yield Op("load_weight", first.token, first.layer, first.batch)
    if 0 < first.layer < head and first.token > 0:
        yield Op("load_cache", first.token, first.layer, first.batch)
    prefetched = False
    for n, cell in enumerate(cells):
        # the input this step waits for goes first: behind the next part's weights on the
        # same link it would stall the step for a whole weight load
        if not prefetched and cell.layer > 0:
            yield Op("load_hidden", cell.token, cell.layer, cell.batch)
        if groups.get(n) is not None:
            nxt = cells[groups[n]]
            yield Op("load_weight", nxt.token, nxt.layer, nxt.batch)
        prefetched = False
        if n + 1 < len(cells):
            nxt = cells[n + 1]
            if 0 < nxt.layer < head and nxt.token > 0:
                yield Op("load_cache", nxt.token, nxt.layer, nxt.batch)
            if nxt.batch != cell.batch and nxt.layer > 0:
                yield Op("load_hidden", nxt.token, nxt.layer, nxt.batch)
                prefetched = True
        yield Op("compute", cell.token, cell.layer, cell.batch)
        if 0 < cell.layer < head and cell.token < num_tokens - 1:
            yield Op("store_cache", cell.token, cell.layer, cell.batch)
        if cell.layer < head:
            yield Op("store_hidden", cell.token, cell.layer, cell.batch)


def _weight_group_starts(cells: list[Step]) -> dict[int, int | None]:
    """Index of each weight group's first cell -> index of the next group's first cell."""
    starts = [n for n, c in enumerate(cells)
              if n == 0 or (c.token, c.layer) != (cells[n - 1].token, cells[n - 1].layer)]
    return {s: (starts[m + 1] if m + 1 < len(starts) else None) for m, s in enumerate(starts)}
