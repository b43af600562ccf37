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


def ops(name: str, num_tokens: int, num_layers: int, num_batches: int,
        parts: range | None = None) -> Iterator[Op]:
    """The op stream: loads for the next step are issued before the current compute.

    num_layers counts the embedding (0) and the head (last). Weights load once per run of
    steps that share (token, layer): once per block in zigzag, once per batch in row_by_row;
    the next run's weights are requested as the current run starts. A step's hidden input is
    prefetched when the step before it belongs to another batch (otherwise the current step
    is what produces it). Cache exists for decoder layers only, and the last token's new cache
    row is never read again, so it is not stored.

    `parts` (a pipeline stage's, pipeline/stages.stage_parts) keeps that stage's steps: the
    same rules over global layer indices, its first part's weights for the next token
    requested as its last part's group starts, its first decoder layer's input loaded from
    the activation home (where the previous stage's activations arrive).
    """
    cells = [c for c in steps(name, num_tokens, num_layers, num_batches)
             if parts is None or c.layer in parts]
    head = num_layers - 1
    groups = _weight_group_starts(cells)
    yield Op("load_weight", cells[0].token, cells[0].layer, cells[0].batch)
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
