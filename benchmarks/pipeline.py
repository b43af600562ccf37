"""Pipeline parallel: the engine's own pipeline measured on this machine, and Table 3's
scaling simulated on the paper's cluster.

    python -m benchmarks.pipeline              # every section
    python -m benchmarks.pipeline --measured   # only the measured section (a few minutes)
    python -m benchmarks.pipeline --simulated  # only the simulated Table 3 scaling

Measured section: opt-125m fp32 under torchrun with gloo and one torch thread per stage
(stated), decode token/s of one stage holding everything, of two stages each given the
compute-tier budget the fuller of them needs (so each holds its half resident), and of one
stage with that same budget (streaming what does not fit from its cpu tier); median of 3
launches each, every case a fresh launch.

Simulated section: OPT-30B on t4-paper-x4 (four t4-paper-sourced machines and a sourced
network), 1 stage with the original's single-GPU policy as run (paper-30b-512-asrun, Table 2)
and 4 stages with its 4x1 script's (paper-30b-512-x4-asrun, 4 micro-blocks), generation and
decode token/s beside the paper's (facts §5: 7.32 -> 23.61 and 11.52 -> 48.94). Every figure
here is "simulated" (sim/pipeline.py) or "predicted" (planner/pipeline.py); nothing runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable

from flexgen_lab.compose import compose_run_config, load_profile
from flexgen_lab.models.spec import ModelSpec
from flexgen_lab.planner.job import Job
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
        job = Job(spec, policy, "zigzag", profile, 512, 32, 2)
        sim, pred = simulate_pipeline(job, stages), predict_pipeline(job, stages)
        decode = sim.num_prompts * 31 / sim.decode_s
        gen_one = gen_one or sim.generation_throughput
        paper_gen, paper_decode = PAPER[stages]
        print(f"{stages:>6} {name:<24} {sim.generation_throughput:8.2f} "
              f"{pred.generation_throughput:8.2f} {paper_gen:9.2f} {decode:8.2f} "
              f"{paper_decode:9.2f}")
    print(f"scaling 1 -> 4 stages (generation): simulated "
          f"{sim.generation_throughput / gen_one:.2f}x, paper {PAPER[4][0] / PAPER[1][0]:.2f}x")


MEASURED = dict(model="opt-125m", dtype="float32", prompt_len=64, gen_len=16, block=(8, 1))


def _launch(stages: int, overrides: list[str], where: str) -> dict:
    """One run under torchrun (one stage too, so both pay the same launch), its row."""
    from flexgen_lab.results.store import ResultStore

    m = MEASURED
    store = f"{where}/r.sqlite"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={stages}", "-m", "flexgen_lab", "run", "distributed=pipeline",
           f"distributed.stages={stages}", f"store.path={store}", f"model={m['model']}",
           f"dtype={m['dtype']}", f"workload.prompt_len={m['prompt_len']}",
           f"workload.gen_len={m['gen_len']}", f"policy.gpu_batch_size={m['block'][0]}",
           f"policy.num_gpu_batches={m['block'][1]}", "workload.num_prompts=16",
           f"distributed.micro_blocks={2 if stages > 1 else 1}", "hardware.cpu_mem=8GiB",
           "hardware.disk_mem=8GiB",
           f"engine.offload_dir={where}/offload", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one torch thread per stage
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=where)
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    runs = ResultStore(store).runs()
    return runs.iloc[-1].to_dict() | {"stages": ResultStore(store).stages(
        int(runs.iloc[-1].run_id))}


def _offloaded_share(budget: int) -> float | None:
    """The largest weights.gpu share (in twentieths) whose modelled peak fits `budget` on
    one stage, the rest of the weights on the cpu tier; None if none does."""
    from flexgen_lab.engine.policy import Placement, Policy
    from flexgen_lab.models.spec import ModelSpec
    from flexgen_lab.planner.memory_model import peak_bytes

    m, spec = MEASURED, ModelSpec.from_name(MEASURED["model"])
    for twentieths in range(20, -1, -1):
        share = twentieths / 20
        policy = Policy(gpu_batch_size=m["block"][0], num_gpu_batches=m["block"][1],
                        weights=Placement(share, 1 - share))
        if peak_bytes(Job(spec, policy, "zigzag", None, m["prompt_len"], m["gen_len"],
                          4))["gpu"] <= budget:
            return share
    return None


def measured_section(repeats: int = 3) -> None:
    """opt-125m fp32 decode token/s: one stage holding everything; two stages each with the
    compute-tier budget the fuller of them needs, holding its half resident; one stage with
    that same budget, streaming what does not fit from its cpu tier. gloo, one torch thread
    per stage, 16 prompts in 2 micro-blocks of 8 (prompt 64, 16 new tokens), median of
    `repeats` launches each."""
    with tempfile.TemporaryDirectory() as where:
        probe = _launch(2, [], where)  # resident everywhere: each stage's accounted peak
        budget = int(probe["stages"].peak_gpu_bytes.max())
        share = _offloaded_share(budget)
        mib = f"{budget / 2**20:.0f} MiB"
        cases = {
            "1 stage, everything resident": (1, []),
            f"2 stages, gpu tier {mib} each (their half resident)":
                (2, [f"hardware.gpu_mem={budget}"]),
        }
        if share is not None:
            cases[f"1 stage, gpu tier {mib} ({share:.2f} of weights resident, the rest on "
                  "the cpu tier)"] = (1, [f"hardware.gpu_mem={budget}",
                                          f"policy.weights.gpu={share}",
                                          f"policy.weights.cpu={1 - share:.2f}"])
        rates = {label: statistics.median(_launch(stages, extra, where)["decode_throughput"]
                                          for _ in range(repeats))
                 for label, (stages, extra) in cases.items()}
    print(f"measured on {probe['device']}: {MEASURED['model']} {MEASURED['dtype']}, gloo, "
          f"1 torch thread per stage, median of {repeats} launches (decode token/s)")
    first = next(iter(rates.values()))
    for label, rate in rates.items():
        print(f"  {label:<80} {rate:7.1f}  ({rate / first:.2f}x)")
    if share is None:
        print(f"  1 stage with a {mib} gpu tier: no weights.gpu share fits (the memory model: "
              "the two weight slots alone, each the size of the largest part, the "
              "embedding, do not leave room): only the pipeline makes it fit")


# name -> (the flag that runs it alone, the section)
SECTIONS: dict[str, tuple[str, Callable[[], None]]] = {
    "measured": ("--measured", measured_section),
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
