"""A finished block frees its homes and buffers at once: nothing of it waits for Python's
cycle collector (a cycle through the executor's trace hook once kept every block alive until
then, and a process running generation after generation grew by a block each time)."""

from __future__ import annotations

import gc

import torch

from flexgen_lab.engine.block_run import BlockRun
from flexgen_lab.engine.engine import Engine
from flexgen_lab.engine.policy import Placement, Policy
from flexgen_lab.models.spec import ModelSpec
from flexgen_lab.models.weights import DummyWeights


def test_a_finished_block_needs_no_cycle_collector(tmp_path):
    spec = ModelSpec.from_name("opt-tiny")
    policy = Policy(gpu_batch_size=2, num_gpu_batches=2, weights=Placement(0.5, 0.5),
                    cache=Placement(0.5, 0.25))
    ids = torch.randint(3, 100, (8, 6))
    gc.collect()
    gc.disable()
    try:
        with Engine(spec, DummyWeights(spec, 0), policy, offload_dir=tmp_path) as engine:
            engine.generate(ids, torch.ones_like(ids), 3)
            alive = [o for o in gc.get_objects() if type(o) is BlockRun]
    finally:
        gc.enable()
    assert alive == []
