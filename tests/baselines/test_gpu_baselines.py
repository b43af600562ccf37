"""benchmarks/gpu_baselines.py, the GPU comparison that waits for a device, run end to end on a
CPU (--smoke: a small OPT in float32): our searched policies and Accelerate's dispatched model
under one budget, on the same weights."""

from __future__ import annotations

from benchmarks import gpu_baselines


def test_smoke_runs_every_system_under_one_budget_on_the_same_weights(capsys):
    results = gpu_baselines.main(["--smoke"])
    ours, compressed = results["ours"][0], results["ours (c)"][0]
    assert not ours.failed and not compressed.failed
    assert ours.batch <= 16 and ours.offloaded > 0  # the searched block, weights streamed
    accelerate = results["accelerate"]
    assert [c.batch for c in accelerate] == [2, 4]
    for cell in accelerate:  # built in memory, 40 % of its weights dispatched to its disk
        assert not cell.failed and 0.3 < cell.offloaded < 0.8
        assert cell.tokens == ours.tokens[:cell.batch]  # float32: the same greedy tokens
    assert results["deepspeed"][0].failed == "not run: it needs CUDA"
    out = capsys.readouterr().out
    assert "4/4 sequences equal ours" in out and "best vs best: ours" in out
