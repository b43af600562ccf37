"""Pipeline parallel: Table 3's scaling, simulated on the paper's cluster (and, where the
measured section is built, the engine's own pipeline on this machine).

    python -m benchmarks.pipeline              # every section
    python -m benchmarks.pipeline --simulated  # only the simulated Table 3 scaling

Simulated section: OPT-30B on t4-paper-x4 (four t4-paper-sourced machines and a sourced
network), 1 stage with the original's single-GPU policy as run (paper-30b-512-asrun, Table 2)
and 4 stages with its 4x1 script's (paper-30b-512-x4-asrun, 4 micro-blocks), generation and
decode token/s beside the paper's (facts §5: 7.32 -> 23.61 and 11.52 -> 48.94). Every figure
here is "simulated" (sim/pipeline.py) or "predicted" (planner/pipeline.py); nothing runs.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from flexgen_lab.compose import compose_run_config, load_profile
from flexgen_lab.models.spec import ModelSpec
from flexgen_lab.planner.pipeline import predict_pipeline
from flexgen_lab.runner import to_policy
from flexgen_lab.sim.pipeline import simulate_pipeline

PAPER = {1: (7.32, 11.52), 4: (23.61, 48.94)}  # facts §5, OPT-30B: generation, decode token/s
POLICIES = {1: "paper-30b-512-asrun", 4: "paper-30b-512-x4-asrun"}


def simulated_section() -> None:
    """OPT-30B, 1 -> 4 stages on t4-paper-x4 (s = 512, n = 32): simulated and predicted."""
    spec, profile = ModelSpec.from_name("opt-30b"), load_profile("t4-paper-x4")
    print("simulated: OPT-30B on t4-paper-x4, s = 512, n = 32 (token/s; paper: facts §5)")
    print(f"{'stages':>6} {'policy':<24} {'gen sim':>8} {'gen pred':>8} {'gen paper':>9} "
          f"{'dec sim':>8} {'dec paper':>9}")
    gen_one = None
    for stages, name in POLICIES.items():
        policy = to_policy(compose_run_config([f"policy={name}", "model=opt-30b"]))
        args = (spec, policy, "zigzag", profile, 512, 32, 2, stages)
        sim, pred = simulate_pipeline(*args), predict_pipeline(*args)
        decode = sim.num_prompts * 31 / sim.decode_s
        gen_one = gen_one or sim.generation_throughput
        paper_gen, paper_decode = PAPER[stages]
        print(f"{stages:>6} {name:<24} {sim.generation_throughput:8.2f} "
              f"{pred.generation_throughput:8.2f} {paper_gen:9.2f} {decode:8.2f} "
              f"{paper_decode:9.2f}")
    print(f"scaling 1 -> 4 stages (generation): simulated "
          f"{sim.generation_throughput / gen_one:.2f}x, paper {PAPER[4][0] / PAPER[1][0]:.2f}x")


# name -> (the flag that runs it alone, the section); the measured section (the engine's
# pipeline under torchrun, this machine) goes here beside it
SECTIONS: dict[str, tuple[str, Callable[[], None]]] = {
    "simulated": ("--simulated", simulated_section),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, (flag, _) in SECTIONS.items():
        parser.add_argument(flag, action="store_true", help=f"only the {name} section")
    args = parser.parse_args()
    chosen = [name for name in SECTIONS if getattr(args, name)] or list(SECTIONS)
    for name in chosen:
        SECTIONS[name][1]()
        print()


if __name__ == "__main__":
    main()
