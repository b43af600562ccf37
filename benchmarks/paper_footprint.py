"""The paper's OPT-30B and OPT-175B policies, as the original ran them, against a T4's memory.

    python -m benchmarks.paper_footprint

Modelled, not measured: the gpu and cpu peaks our engine would reserve (planner/memory_model.py
peak_breakdown, equal to the engine's accounting to the byte, tests/engine/test_any_policy.py)
for Table 2's FlexGen cells at the paper's shapes, split by kind, against t4-paper's gpu_mem
(16 * 10^9 bytes; a manual policy gets no safety factor).
"""

from __future__ import annotations

from flexgen_lab.planner.job import Job
from flexgen_lab.planner.memory_model import peak_breakdown
from flexgen_lab.reproduce import make_config
from flexgen_lab.results import experiment
from flexgen_lab.runner import to_policy
from flexgen_lab.validation import model_spec

GB = 1e9
KINDS = ("weights", "cache", "activations", "step")


def paper_cells() -> list:
    """Table 2's FlexGen cells for OPT-30B and OPT-175B at the paper scale."""
    exp = experiment.load("table2")
    scale = exp.scales["paper"]
    return [c for c in exp.cells(scale, []) if c.system == "flexgen_lab"
            and ("30B" in c.column or "175B" in c.column)], scale


def main() -> None:
    cells, scale = paper_cells()
    print("modelled gpu peak (GB = 10^9 bytes) of the paper's policies as run; T4 gpu_mem 16.00")
    print(f"{'cell':58} {'gpu':>6}  " + "  ".join(f"{k:>11}" for k in KINDS) + "  fits")
    for cell in cells:
        cfg = make_config(cell, scale)
        policy, spec = to_policy(cfg), model_spec(cfg)
        parts = peak_breakdown(Job(spec, policy, cfg.schedule.name, None,
                                   cfg.workload.prompt_len, cfg.workload.gen_len, 2))
        gpu = sum(parts[k]["gpu"] for k in KINDS)
        name = f"{cell.row[:34]} | {cell.column}"
        print(f"{name:58} {gpu / GB:6.2f}  "
              + "  ".join(f"{parts[k]['gpu'] / GB:11.2f}" for k in KINDS)
              + f"  {'yes' if gpu <= 16e9 else 'NO'}")


if __name__ == "__main__":
    main()
