"""Which buffer each op of the schedule fills, and which it waits for: one table that the
engine (a future per buffer) and the simulator (an end time per buffer) both key by.

Buffers are named (kind, token, layer, batch) with None where a kind does not vary:

    weight        a part's weights for one (token, layer) run of steps   load_weight fills it
    cache         a (layer, batch)'s past keys and values, loaded         load_cache
    hidden        a batch's input to its next step                        load_hidden
    cache_store   a (layer, batch)'s new rows, on their way home          store_cache
    hidden_store  a batch's output, on its way home                       store_hidden

A compute waits for its weights, its hidden input (not the embedding) and, in decode, its
cache. A load waits for the store of the same buffer before it (the rows it reads); a store
for the one before it and, since stores leave in order, for the previous store of any kind
(is_store).
"""

from __future__ import annotations

Key = tuple[str, int | None, int | None, int | None]


def weight(token: int, layer: int) -> Key:
    return ("weight", token, layer, None)


def cache(layer: int, batch: int) -> Key:
    return ("cache", None, layer, batch)


def hidden(batch: int) -> Key:
    return ("hidden", None, None, batch)


def cache_store(layer: int, batch: int) -> Key:
    return ("cache_store", None, layer, batch)


def hidden_store(batch: int) -> Key:
    return ("hidden_store", None, None, batch)


def fills(op) -> Key:
    """The buffer an I/O op fills (or, for a store, frees)."""
    if op.kind == "load_weight":
        return weight(op.token, op.layer)
    if op.kind == "load_cache":
        return cache(op.layer, op.batch)
    if op.kind == "load_hidden":
        return hidden(op.batch)
    if op.kind == "store_cache":
        return cache_store(op.layer, op.batch)
    if op.kind == "store_hidden":
        return hidden_store(op.batch)
    raise ValueError(f"op kind {op.kind!r} fills no buffer")


def waits_for(op) -> list[Key]:
    """The buffers an op waits for (a compute's inputs; an I/O op's earlier store)."""
    if op.kind == "compute":
        deps = [weight(op.token, op.layer)]
        if op.layer > 0:
            deps.append(hidden(op.batch))
        if op.token > 0:
            deps.append(cache(op.layer, op.batch))
        return deps
    if op.kind == "load_weight":
        return []
    if op.kind in ("load_cache", "store_cache"):
        return [cache_store(op.layer, op.batch)]
    if op.kind in ("load_hidden", "store_hidden"):
        return [hidden_store(op.batch)]
    raise ValueError(f"op kind {op.kind!r}")


def is_store(op) -> bool:
    return op.kind.startswith("store_")
