"""Search quality: the searched policy against the best of a measured grid, same budgets.

    python -m benchmarks.search_quality            # opt-125m fp32 and opt-1.3b bf16
    python -m benchmarks.search_quality --quick    # opt-125m only, 2 repeats
    python -m benchmarks.search_quality --only opt-1.3b --repeats 2

1. calibrate this machine in process (speeds, per-copy latencies, the model's operator
   table: what `calibrate model=NAME quick=true` writes);
2. the grid: at least 12 batch shapes (gpu_batch_size x num_gpu_batches, from 1 x 32 to 64 x 1),
   each with the LP's best placement for that shape under the budgets (planner/search.solve),
   measured on the engine with the budgets enforced;
3. `search` (with re-ranking, blocks up to the grid's largest, 64 prompts) picks a policy on
   the same profile and budgets; it is measured
   the same way and compared with the grid's best (target: at least 0.90 of it).
Every policy: one warm-up generation, then the median of `repeats` generations. The figures
printed as "measured" are the engine's on this machine, "predicted" the cost model's and
"simulated" the simulator's.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from flexgen_lab.checks import compute_device
from flexgen_lab.engine.engine import Engine
from flexgen_lab.engine.policy import Policy
from flexgen_lab.engine.tiers import Tiers
from flexgen_lab.hardware import calibrate
from flexgen_lab.hardware.profile import HardwareProfile
from flexgen_lab.models.spec import ModelSpec
from flexgen_lab.models.weights import DummyWeights
from flexgen_lab.planner.job import Job
from flexgen_lab.planner.search import search, solve
from flexgen_lab.runner import device_name
from flexgen_lab.workload import synthetic_prompts

MiB = 2**20
OFFLOAD = Path(tempfile.gettempdir()) / "flexgen_lab_search_quality"
PROMPT_LEN, GEN_LEN = 64, 16
CASES = {  # model -> (dtype, gpu tier, cpu tier): tight budgets, the disk tier takes the rest
    "opt-125m": (torch.float32, 600 * MiB, 300 * MiB),
    "opt-1.3b": (torch.bfloat16, 1200 * MiB, 1200 * MiB),
}
MAX_BLOCK = 64  # the grid's largest block; the search is held to it too (same latency bound)
SHAPES = [(1, 32), (1, 8), (2, 16), (4, 1), (4, 4), (4, 8), (8, 1), (8, 4), (8, 8), (16, 1),
          (16, 2), (16, 4), (32, 1), (32, 2), (64, 1)]


def profile_for(spec: ModelSpec, dtype: torch.dtype, gpu: int, cpu: int) -> HardwareProfile:
    """This machine, calibrated now (quick), with the case's budgets as capacities."""
    device = compute_device()
    speeds = calibrate.measure(True, OFFLOAD, dtype)
    key, table = calibrate.model_table(spec, dtype, device, quick=True)
    return HardwareProfile(name="calibrated", source="search_quality", gpu_mem=gpu,
                           cpu_mem=cpu, disk_mem=calibrate.default_capacities(OFFLOAD)[
                               "disk_mem"], cpu_correction=(0.0, 0.0, 0.0),
                           safety_factor=1.0, op_tables={key: table}, **speeds,
                           **calibrate.engine_settings(device, dtype, OFFLOAD))


def measured(spec, policy: Policy, dtype, profile: HardwareProfile, repeats: int) -> float:
    """Generation throughput (token/s) of one block, budgets enforced: median of repeats."""
    ids, mask = synthetic_prompts(spec, policy.block_size, PROMPT_LEN, seed=0)
    device = compute_device()
    tiers = Tiers(profile.gpu_mem, profile.cpu_mem, profile.disk_mem, device,
                  policy.pin_memory)
    with Engine(spec, DummyWeights(spec, 0), policy, "zigzag", device, dtype, tiers=tiers,
                offload_dir=OFFLOAD, io_workers=profile.workers()) as engine:
        engine.generate(ids, mask, GEN_LEN)  # warm-up
        runs = [engine.generate(ids, mask, GEN_LEN) for _ in range(repeats)]
    return statistics.median(policy.block_size * GEN_LEN / (g.prefill_s + g.decode_s)
                             for g in runs)


def describe(policy: Policy) -> str:
    def place(p):
        return f"{p.gpu:.2f}/{p.cpu:.2f}/{p.disk:.2f}"
    return (f"{policy.gpu_batch_size:3d} x {policy.num_gpu_batches:<3d} w {place(policy.weights)}"
            f" c {place(policy.cache)} a {place(policy.activations)}")


def run_case(model: str, repeats: int) -> float:
    dtype, gpu, cpu = CASES[model]
    spec = ModelSpec.from_name(model)
    profile = profile_for(spec, dtype, gpu, cpu)
    q = dtype.itemsize
    print(f"\n## {model} {str(dtype).removeprefix('torch.')}, prompt {PROMPT_LEN}, "
          f"{GEN_LEN} new tokens, gpu tier {gpu // MiB} MiB, cpu tier {cpu // MiB} MiB",
          flush=True)
    grid = {}
    for gbs, ngb in SHAPES:
        policy = solve(Job(spec, Policy(gpu_batch_size=gbs, num_gpu_batches=ngb), "zigzag",
                           profile, PROMPT_LEN, GEN_LEN, q))
        if policy is None:
            print(f"  grid {gbs:3d} x {ngb:<3d} no placement fits")
            continue
        grid[describe(policy)] = measured(spec, policy, dtype, profile, repeats)
        print(f"  grid {describe(policy)}  {grid[describe(policy)]:8.2f} token/s (measured)",
              flush=True)
    start = time.perf_counter()
    found = search(spec, profile, PROMPT_LEN, GEN_LEN, q, delegation=False, rerank_top=5,
                   max_block_size=MAX_BLOCK)
    seconds = time.perf_counter() - start
    got = measured(spec, found.policy, dtype, profile, repeats)
    best_name = max(grid, key=grid.get)
    ratio = got / grid[best_name]
    print(f"  searched {describe(found.policy)}  {got:8.2f} token/s (measured); predicted "
          f"{found.prediction.generation_throughput:.2f}, simulated {found.simulated:.2f}; "
          f"search {seconds:.1f} s")
    print(f"  best of {len(grid)} grid policies: {best_name}  {grid[best_name]:.2f} token/s "
          f"(measured)")
    print(f"  searched / best of grid: {ratio:.2f} (target >= 0.90)", flush=True)
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="opt-125m only, 2 repeats")
    parser.add_argument("--only", choices=list(CASES), help="one model of the two")
    parser.add_argument("--repeats", type=int, help="generations per policy (default 3, 2 "
                        "with --quick)")
    args = parser.parse_args()
    OFFLOAD.mkdir(parents=True, exist_ok=True)
    print(f"# measured on {device_name(compute_device())}, {torch.get_num_threads()} threads")
    start = time.perf_counter()
    models = [args.only] if args.only else ["opt-125m"] if args.quick else list(CASES)
    repeats = args.repeats or (2 if args.quick else 3)
    ratios = {m: run_case(m, repeats) for m in models}
    print("\n" + ", ".join(f"{m}: {r:.2f}" for m, r in ratios.items())
          + f"  (searched / best of grid, measured; {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
