"""The paper's headline on a GPU: ours against Accelerate and DeepSpeed ZeRO-Inference, one run.

    python -m benchmarks.gpu_baselines            # needs CUDA; about 5 minutes on an H100 (est.)
    python -m benchmarks.gpu_baselines --smoke    # the same code on a CPU, a small OPT (tests)

OPT-6.7B (`--model opt-13b` for the larger) in float16, seeded dummy weights generated once in
host memory and shared by every system; prompt 512, 16 new tokens, greedy; the paper's timing
(prefill = the first token, decode = the rest). Every system runs under one gpu budget (4 GiB
by default) so that most weights stream from host memory, as on the paper's T4:
- Accelerate: transformers' model built in host memory from the same tensors and dispatched
  (accelerate.dispatch_model, no checkpoint export) with a device map from max_memory {0:
  the budget}; the modules that do not fit stay in host memory and are copied to the GPU as
  they run. Batch sizes ascending (the paper's were 2 and 8) until one does not fit.
- DeepSpeed ZeRO-Inference: `system=deepspeed`'s own code (baselines/deepspeed_zero.py:
  stage 3, every parameter in pinned host memory, gathered layer by layer); skipped, with
  the reason printed, where deepspeed is not installed.
- ours: the policy our LP search picks for this budget, as the paper picks its policies
  (planner/search.py on the h100-datasheet profile's speeds with the run's gpu budget, host
  memory for the cpu tier, no disk; blocks of at most --max-block prompts, so the run stays
  short), and ours (c): the same search with 4-bit weights and cache.
The budget is enforced for all: ours by its tiers, and every system by CUDA's allocator
(torch.cuda.set_per_process_memory_fraction at the budget plus --slack), so a batch whose
cache or activations do not fit fails as out of memory and is reported as such.

Prints each cell (generation token/s [prefill s, decode token/s], peak CUDA allocated, where
the weights were) and best against best: the issue's target is ours >= 12x Accelerate (the
paper's 11.8x on OPT-30B). A one-call device script: benchmarks/device_check.sh.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field

import torch

from flexgen_lab.baselines import accelerate_offload, hf_generate
from flexgen_lab.compose import load_profile
from flexgen_lab.engine.engine import Engine
from flexgen_lab.engine.policy import Policy
from flexgen_lab.engine.tiers import BudgetExceeded, Tiers
from flexgen_lab.models.spec import ModelSpec
from flexgen_lab.models.weights import DummyWeights
from flexgen_lab.planner.job import Job
from flexgen_lab.planner.memory_model import peak_bytes
from flexgen_lab.planner.search import search
from flexgen_lab.units import TORCH_DTYPES
from flexgen_lab.workload import synthetic_prompts

GiB = 2**30
HOST_BYTES = 96 * GiB  # the cpu tier: host memory for weights and the KV cache
# --smoke's model: small, but its weights (25 MB in float32) outweigh our engine's workspace,
# so a budget of 60 % of them offloads the rest in every system
SMOKE = dataclasses.replace(ModelSpec.from_name("opt-tiny"), name="opt-smoke", num_layers=8,
                            hidden=256, num_heads=4, num_kv_heads=4, ffn=1024)


class SharedWeights:
    """A weight source that generates each part once and hands the same tensors to every
    system (the HF model, our engine, DeepSpeed's export): OPT-6.7B's 6.7 G seeded normals
    take tens of seconds to draw, and every system must run on the same bytes anyway."""

    def __init__(self, source):
        self.source, self.parts = source, {}

    def part(self, part: str, layer: int | None, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        key = (part, layer, dtype)
        if key not in self.parts:
            self.parts[key] = self.source.part(part, layer, dtype)
        return self.parts[key]

    def __getattr__(self, name):  # identity(), spec, ...: the source's
        return getattr(self.source, name)


@dataclass
class Cell:
    """One system at one batch size: throughput, or why it did not run."""
    system: str
    batch: int
    generation_token_s: float = 0.0
    prefill_s: float = 0.0
    decode_token_s: float = 0.0
    peak_cuda_gib: float | None = None
    where: str = ""
    offloaded: float = 0.0  # the share of weight bytes kept off the gpu tier
    failed: str = ""
    tokens: list = field(default_factory=list, repr=False)

    def line(self) -> str:
        if self.failed:
            return f"  {self.system:<28} batch {self.batch:>4}: {self.failed}"
        cuda = "" if self.peak_cuda_gib is None else f", peak CUDA {self.peak_cuda_gib:.2f} GiB"
        return (f"  {self.system:<28} batch {self.batch:>4}: {self.generation_token_s:8.2f} "
                f"token/s [prefill {self.prefill_s:.1f} s, decode {self.decode_token_s:.2f}]"
                f"{cuda} ({self.where}) (measured)")


@dataclass
class Setup:
    spec: ModelSpec
    weights: SharedWeights
    device: torch.device
    dtype: torch.dtype
    gpu_mem: int
    prompt_len: int
    gen_len: int
    scratch: str

    def prompts(self, n: int):
        return synthetic_prompts(self.spec, n, self.prompt_len, seed=0)

    def budgets(self) -> dict[str, int]:
        return {"gpu": self.gpu_mem, "cpu": HOST_BYTES, "disk": 0}


def timed(setup: Setup, system: str, batch: int, generate, placed: dict[str, int],
          where: str = "") -> Cell:
    """One warm-up generation, then one timed; out of memory and budget errors are a cell."""
    ids, mask = setup.prompts(batch)
    reset_cuda(setup.device)
    try:
        generate(ids[:, :8], mask[:, :8], 2)  # kernels, allocator and page-ins warmed
        gen = generate(ids, mask, setup.gen_len)
    except (torch.OutOfMemoryError, BudgetExceeded) as err:
        return Cell(system, batch, failed=f"does not fit the budget ({type(err).__name__})")
    n, steps = ids.shape[0], setup.gen_len
    peak = torch.cuda.max_memory_allocated() / GiB if setup.device.type == "cuda" else None
    return Cell(system, batch, n * steps / (gen.prefill_s + gen.decode_s), gen.prefill_s,
                n * (steps - 1) / gen.decode_s, peak, shares(placed) + where,
                1 - placed["gpu"] / sum(placed.values()), tokens=gen.output_ids.tolist())


def reset_cuda(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def shares(placed: dict[str, int]) -> str:
    total = sum(placed.values())
    return "weights " + " / ".join(f"{tier} {n / total:.0%}" for tier, n in placed.items())


def accelerate_cells(setup: Setup, batches: list[int]) -> list[Cell]:
    """Accelerate on a model built in host memory and dispatched; batches ascending until one
    does not fit (a larger one would not either)."""
    model = hf_generate.hf_model(setup.spec, setup.weights, setup.dtype, "cpu")
    cells = []
    with accelerate_offload.scratch_dir(setup.scratch) as offload:
        model, placed = accelerate_offload.dispatched(model, setup.budgets(), setup.device,
                                                      setup.dtype, offload)
        for batch in batches:
            cells.append(timed(setup, "Accelerate", batch, lambda i, m, g: hf_generate.generate(
                model, i, m, g, i.shape[0], setup.device), placed))
            if cells[-1].failed:
                break
    return cells


def deepspeed_cells(setup: Setup, batches: list[int]) -> list[Cell]:
    """`system=deepspeed`'s code (ZeRO stage 3, parameters in pinned host memory), loaded
    once; batches ascending until one does not fit."""
    name = "DeepSpeed ZeRO-Inference"
    if setup.device.type != "cuda":
        return [Cell(name, 0, failed="not run: it needs CUDA")]
    try:
        import deepspeed  # noqa: F401
    except ImportError as err:
        return [Cell(name, 0, failed=f"not run: {err} (pip install 'flexgen_lab[deepspeed]')")]
    from flexgen_lab.baselines import deepspeed_zero

    cells = []
    with deepspeed_zero.loaded(setup.spec, setup.weights, setup.dtype, setup.budgets(),
                               setup.scratch, max(batches)) as (model, tier, total):
        placed = {t: total if t == tier else 0 for t in accelerate_offload.TIERS}
        for batch in batches:
            cells.append(timed(setup, name, batch, lambda i, m, g: hf_generate.generate(
                model, i, m, g, i.shape[0], setup.device), placed))
            if cells[-1].failed:
                break
    return cells


def searched_policy(setup: Setup, compress: bool, max_block: int) -> Policy | None:
    """Our LP search's policy for this budget (the paper's method): the h100-datasheet
    profile's speeds with the run's gpu and cpu budgets and no disk, blocks of at most
    `max_block` prompts (the run's time), delegation left to the search; with `compress`,
    4-bit weights and cache. None where nothing fits."""
    profile = dataclasses.replace(load_profile("h100-datasheet"), gpu_mem=setup.gpu_mem,
                                  cpu_mem=HOST_BYTES, disk_mem=0)
    found = search(setup.spec, profile, setup.prompt_len, setup.gen_len,
                   setup.dtype.itemsize, delegation=None, compress=(compress, compress),
                   max_block_size=max_block, compute_on_cpu=setup.device.type == "cpu")
    return found.policy if found and fits(setup, found.policy) else None


def fits(setup: Setup, policy: Policy) -> bool:
    job = Job(setup.spec, policy, "zigzag", None, setup.prompt_len, setup.gen_len,
              setup.dtype.itemsize, compute_on_cpu=setup.device.type == "cpu")
    peaks = peak_bytes(job)
    return peaks["gpu"] <= setup.gpu_mem and peaks["cpu"] <= HOST_BYTES


def ours_cell(setup: Setup, label: str, policy: Policy | None) -> Cell:
    if policy is None:
        return Cell(label, 0, failed="no block fits the gpu budget")
    tiers = Tiers(setup.gpu_mem, HOST_BYTES, 0, setup.device, pin_memory=True)
    with Engine(setup.spec, setup.weights, policy, "zigzag", setup.device, setup.dtype,
                tiers=tiers, offload_dir=setup.scratch) as engine:
        placed = {t: v["achieved"] for t, v in engine.placement_report()["weights"].items()}
        where = (f"; {policy.gpu_batch_size} x {policy.num_gpu_batches}, cache on gpu "
                 f"{policy.cache.gpu:.0%}, delegation {'on' if policy.cpu_delegation else 'off'}")

        def generate(ids, mask, gen_len):
            if ids.shape[1] < setup.prompt_len:  # the warm-up: our block takes whole blocks
                ids, mask = setup.prompts(policy.block_size)
                return engine.generate(ids, mask, 2)
            return engine.generate(ids, mask, gen_len)
        return timed(setup, label, policy.block_size, generate, placed, where)


def agreement(cells: list[Cell], reference: Cell) -> str:
    """Whether a system's tokens equal ours on the prompts both ran (the first rows)."""
    lines = []
    for cell in cells:
        if cell.failed or not reference.tokens:
            continue
        rows = min(len(cell.tokens), len(reference.tokens))
        same = sum(a == b for a, b in zip(cell.tokens[:rows], reference.tokens[:rows],
                                              strict=True))
        lines.append(f"  {cell.system} batch {cell.batch}: {same}/{rows} sequences equal ours")
    return "\n".join(lines)


def best(cells: list[Cell]) -> Cell | None:
    done = [c for c in cells if not c.failed]
    return max(done, key=lambda c: c.generation_token_s) if done else None


def main(argv: list[str] | None = None) -> dict[str, list[Cell]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true",
                        help="a small OPT in float32 on a CPU, prompt 16, 4 tokens, blocks of 16")
    parser.add_argument("--model", default="opt-6.7b")
    parser.add_argument("--gpu-mem-gib", type=float, default=4.0)
    parser.add_argument("--slack-gib", type=float, default=0.5,
                        help="CUDA allocator headroom above the budget, for every system")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--gen-len", type=int, default=16)
    parser.add_argument("--max-block", type=int, default=256,
                        help="the most prompts in one of our blocks (the searched policy's)")
    parser.add_argument("--accelerate-batches", type=int, nargs="+", default=[2, 8, 32])
    parser.add_argument("--deepspeed-batches", type=int, nargs="+", default=[4, 16])
    args = parser.parse_args(argv)
    if args.smoke:
        args.model, args.prompt_len, args.gen_len = "opt-tiny", 16, 4
        args.accelerate_batches, args.deepspeed_batches, args.max_block = [2, 4], [2], 16
    device = torch.device("cpu" if args.smoke else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_baselines: no CUDA device here; run it where a GPU is (or --smoke)")
        sys.exit(2)
    spec = SMOKE if args.smoke else ModelSpec.from_name(args.model)
    dtype = TORCH_DTYPES["float32" if args.smoke else "float16"]
    gpu_mem = int(args.gpu_mem_gib * GiB)
    if args.smoke:  # 60 % of the weights fit the "gpu" budget: the rest is offloaded
        gpu_mem = int(0.6 * spec.weight_bytes(dtype.itemsize))
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, (gpu_mem + args.slack_gib * GiB)
                                                       / total))
    scratch = tempfile.mkdtemp(prefix="flexgen_lab_gpu_baselines_")
    try:
        return compare(Setup(spec, SharedWeights(DummyWeights(spec, 0)), device, dtype,
                             gpu_mem, args.prompt_len, args.gen_len, scratch), args)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def compare(setup: Setup, args) -> dict[str, list[Cell]]:
    start = time.perf_counter()
    where = torch.cuda.get_device_name() if setup.device.type == "cuda" else "CPU (smoke)"
    print(f"# gpu_baselines on {where}, torch {torch.__version__}: {setup.spec.name} "
          f"{str(setup.dtype).removeprefix('torch.')}, gpu budget "
          f"{setup.gpu_mem / GiB:.2f} GiB, prompt {setup.prompt_len}, {setup.gen_len} tokens")
    policy = searched_policy(setup, False, args.max_block)
    results = {"ours": [ours_cell(setup, "ours", policy)]}
    print(results["ours"][0].line(), flush=True)
    policy = searched_policy(setup, True, args.max_block)
    results["ours (c)"] = [ours_cell(setup, "ours (c) 4-bit", policy)]
    print(results["ours (c)"][0].line(), flush=True)
    results["accelerate"] = accelerate_cells(setup, args.accelerate_batches)
    print("\n".join(c.line() for c in results["accelerate"]), flush=True)
    results["deepspeed"] = deepspeed_cells(setup, args.deepspeed_batches)
    print("\n".join(c.line() for c in results["deepspeed"]), flush=True)
    print(agreement(results["accelerate"] + results["deepspeed"], results["ours"][0]))
    summarize(results)
    print(f"# {time.perf_counter() - start:.0f} s")
    return results


def summarize(results: dict[str, list[Cell]]) -> None:
    ours = best(results["ours"] + results["ours (c)"])
    for name in ("accelerate", "deepspeed"):
        theirs = best(results[name])
        if ours and theirs:
            print(f"best vs best: {ours.system} at {ours.batch} / {theirs.system} at "
                  f"{theirs.batch} = {ours.generation_token_s / theirs.generation_token_s:.2f}x"
                  f" (target >= 12x against Accelerate; paper 11.8x) (measured)")


if __name__ == "__main__":
    main()
