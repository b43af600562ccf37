"""Whether a baseline system's tokens equal ours, cell by cell of an experiment's table.

A table that puts other systems beside flexgen_lab (table2: Accelerate, DeepSpeed,
transformers' generate) names its reference row (`tokens_reference: FlexGen`). For every
cell of another system with an ok run, its tokens are compared with the reference row's in
the same column, prompt by prompt: prompts are matched by their ids (the two cells may run
different numbers of prompts; seeded synthetic prompts agree on the ones they share), and
the cell's figure is True when every shared prompt's output ids are equal, False when any
differ, None when nothing can be compared (a cell not run, or no prompt in common).

    >>> tokens_equal(exp, planned, store)   # {config_hash: True | False | None}
"""

from __future__ import annotations

from flexgen_lab.results.store import ResultStore


def latest_tokens(store: ResultStore, config_hash: str | None) -> dict[tuple, list] | None:
    """prompt ids -> output ids of the hash's newest ok run (None when there is none)."""
    if config_hash is None:
        return None
    ok = store.runs("config_hash = ? AND status = 'ok'", [config_hash])
    if not len(ok):
        return None
    run_id = int(ok.run_id.max())
    return {tuple(prompt): output for _, prompt, output in store.tokens(run_id)}


def compare(ours: dict[tuple, list] | None, theirs: dict[tuple, list] | None) -> bool | None:
    """True: every shared prompt's tokens equal; False: some differ; None: nothing shared."""
    if not ours or not theirs:
        return None
    shared = ours.keys() & theirs.keys()
    if not shared:
        return None
    return all(ours[p] == theirs[p] for p in shared)


def tokens_equal(exp, planned: list, store: ResultStore) -> dict[str, bool | None]:
    """config hash -> whether that cell's tokens equal the reference row's in its column,
    for every cell of a system other than flexgen_lab ({} without tokens_reference)."""
    if not exp.tokens_reference:
        return {}
    reference = {p.cell.column: latest_tokens(store, p.config_hash) for p in planned
                 if p.cell.row == exp.tokens_reference}
    return {p.config_hash: compare(reference.get(p.cell.column),
                                   latest_tokens(store, p.config_hash))
            for p in planned if p.config_hash and p.cell.system != "flexgen_lab"}
