"""Offloading engine figures, measured side by side in one process on this machine.

    python -m benchmarks.engine                    # every section
    python -m benchmarks.engine --only zigzag overlap delegation compression bigger

Sections (each prints measured figures with the device; warm-up, then the median and spread
of 3 repeats, except `bigger`, which runs once because one run takes minutes):
  zigzag       zig-zag vs row-by-row, weights on the cpu tier, same block
  overlap      overlap on vs off, weights on the disk tier (page cache bypassed), against I/O
               alone and compute alone; the cpu-tier case too
  cpu_tier     80 % of the weights on the cpu tier against resident, batch 16 (the CPU's
               one real copy per step)
  io_workers   1 to 4 I/O workers, weights on the cpu tier and cache on disk (the CPU default)
  delegation   CPU delegation on vs off, cache on the cpu tier, prompt 512
  compression  bytes of weights and cache at home vs fp16, opt-1.3b
  memory       accounted peaks against peak RSS, opt-1.3b, three placements
  bigger       opt-6.7b in bfloat16 (~13 GB) with a 2 GiB gpu tier and a 4 GiB cpu tier
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from benchmarks.common import interleaved, summary
from flexgen_lab.checks import compute_device
from flexgen_lab.engine.cache_homes import CacheHomes
from flexgen_lab.engine.compress import CompressionConfig
from flexgen_lab.engine.engine import Engine
from flexgen_lab.engine.memory import PeakRSS
from flexgen_lab.engine.policy import Placement, Policy
from flexgen_lab.engine.tiers import Tiers
from flexgen_lab.engine.transfer import Links
from flexgen_lab.models.spec import ModelSpec
from flexgen_lab.models.weights import DummyWeights
from flexgen_lab.runner import device_name
from flexgen_lab.workload import synthetic_prompts

GiB = 2**30
OFFLOAD = tempfile.gettempdir() + "/flexgen_lab_bench"


def make(spec, policy, schedule="zigzag", dtype=torch.float32, tiers=None, io_workers=2):
    return Engine(spec, DummyWeights(spec, 0), policy, schedule, compute_device(), dtype,
                  tiers=tiers, offload_dir=OFFLOAD, io_workers=io_workers)


def decode_rate(engine, ids, mask, gen_len) -> tuple[float, dict]:
    """Decode throughput (token/s) of one generation, and its bytes per link and phase."""
    gen = engine.generate(ids, mask, gen_len)
    return ids.shape[0] * (gen_len - 1) / gen.decode_s, gen.link_bytes


def section_zigzag(repeats: int) -> None:
    spec, batches, gen_len = ModelSpec.from_name("opt-125m"), 4, 8
    ids, mask = synthetic_prompts(spec, 4 * batches, 64, seed=0)
    policy = Policy(gpu_batch_size=4, num_gpu_batches=batches, weights=Placement(0, 1))
    with make(spec, policy, "zigzag") as zz, make(spec, policy, "row_by_row") as rr:
        moved = {}

        def run(engine, name):
            rate, links = decode_rate(engine, ids, mask, gen_len)
            moved[name] = links["decode"]["cpu_to_gpu"]
            return rate

        values = interleaved({"zigzag": lambda: run(zz, "zigzag"),
                              "row_by_row": lambda: run(rr, "row_by_row")}, repeats)
    ratio = statistics.median(values["zigzag"]) / statistics.median(values["row_by_row"])
    print(f"[zigzag] opt-125m fp32, weights on the cpu tier, block 4 x {batches}: decode token/s"
          f" zigzag {summary(values['zigzag'])}, row_by_row {summary(values['row_by_row'])}; "
          f"throughput ratio {ratio:.2f} (measured); weight bytes ratio "
          f"{moved['row_by_row'] / moved['zigzag']:.3f} (num_gpu_batches = {batches})")


def per_layer_step_ms(engine, ids, mask, gen_len, layers) -> float:
    gen = engine.generate(ids, mask, gen_len)
    return gen.decode_s / (gen_len - 1) / layers * 1e3


def weights_io_ms(engine, layers: int) -> float:
    """Loading every part's weights once, alone (no compute): per layer-step."""
    links = Links()
    start = time.perf_counter()
    for index in range(len(engine.weights.parts)):
        engine.weights.load(index, index % 2, links, token=1)
    return (time.perf_counter() - start) / layers * 1e3


def section_overlap(repeats: int) -> None:
    spec, gen_len = ModelSpec.from_name("opt-125m"), 6
    layers = spec.num_layers + 2
    ids, mask = synthetic_prompts(spec, 16, 64, seed=0)
    for tier, place in (("disk", Placement(0, 0)), ("cpu", Placement(0, 1))):
        on, off = (Policy(gpu_batch_size=16, weights=place, overlap=o) for o in (True, False))
        with make(spec, on) as e_on, make(spec, off) as e_off, make(spec, Policy(16)) as e_res:
            values = interleaved({
                "overlap": lambda e=e_on: per_layer_step_ms(e, ids, mask, gen_len, layers),
                "no overlap": lambda e=e_off: per_layer_step_ms(e, ids, mask, gen_len, layers),
                "compute": lambda e=e_res: per_layer_step_ms(e, ids, mask, gen_len, layers),
                "io": lambda e=e_off: weights_io_ms(e, layers)}, repeats)
        med = {k: statistics.median(v) for k, v in values.items()}
        bound = max(med["io"], med["compute"])
        print(f"[overlap] opt-125m fp32, batch 16, weights on the {tier} tier: ms per layer-step"
              f" overlap {summary(values['overlap'])}, no overlap {summary(values['no overlap'])},"
              f" I/O alone {summary(values['io'])}, compute alone {summary(values['compute'])};"
              f" overlap / max(I/O, compute) = {med['overlap'] / bound:.2f} (target <= 1.15),"
              f" no overlap / overlap = {med['no overlap'] / med['overlap']:.2f} (measured)")


def section_cpu_tier(repeats: int) -> None:
    """On the CPU the gpu and cpu tiers are one memory: 80 % of the weights on the cpu tier
    costs one real host copy per step against the resident run (target >= 0.95x at batch 16
    for opt-125m fp32; opt-1.3b bf16 reported)."""
    for model, dtype in (("opt-125m", torch.float32), ("opt-1.3b", torch.bfloat16)):
        spec, gen_len = ModelSpec.from_name(model), 16
        ids, mask = synthetic_prompts(spec, 16, 64, seed=0)
        place = Placement(0.2, 0.8)
        policies = {"resident": Policy(16),
                    "cpu 80 % overlap": Policy(16, weights=place),
                    "cpu 80 % no overlap": Policy(16, weights=place, overlap=False)}
        engines = {k: make(spec, p, dtype=dtype) for k, p in policies.items()}
        try:
            values = interleaved({k: lambda e=e, i=ids, m=mask: decode_rate(e, i, m, 16)[0]
                                  for k, e in engines.items()}, repeats)
        finally:
            for engine in engines.values():
                engine.close()
        med = {k: statistics.median(v) for k, v in values.items()}
        print(f"[cpu_tier] {model} {str(dtype).removeprefix('torch.')}, batch 16, prompt 64, "
              f"{gen_len} new tokens: decode token/s "
              + ", ".join(f"{k} {summary(v)}" for k, v in values.items())
              + "; over resident: " + ", ".join(f"{k} {med[k] / med['resident']:.2f}x"
                                                for k in policies if k != "resident")
              + (" (target >= 0.95x)" if model == "opt-125m" else "") + " (measured)")


def section_io_workers(repeats: int) -> None:
    """The engine's I/O workers on this machine: weights on the cpu tier and the cache on
    disk (loads and stores of both kinds in flight), decode token/s with 1 to 4 workers."""
    spec, gen_len = ModelSpec.from_name("opt-125m"), 8
    ids, mask = synthetic_prompts(spec, 16, 64, seed=0)
    policy = Policy(gpu_batch_size=4, num_gpu_batches=4, weights=Placement(0, 1),
                    cache=Placement(0, 0))
    engines = {n: make(spec, policy, io_workers=n) for n in (1, 2, 3, 4)}
    try:
        values = interleaved({f"{n}": lambda e=e: decode_rate(e, ids, mask, gen_len)[0]
                              for n, e in engines.items()}, repeats)
    finally:
        for engine in engines.values():
            engine.close()
    best = max(values, key=lambda n: statistics.median(values[n]))
    print(f"[io_workers] opt-125m fp32, block 4 x 4, weights on the cpu tier, cache on disk, "
          f"{torch.get_num_threads()} compute threads: decode token/s "
          + ", ".join(f"{n} workers {summary(v)}" for n, v in values.items())
          + f"; best {best} (measured)")


def section_delegation(repeats: int) -> None:
    spec, gen_len = ModelSpec.from_name("opt-125m"), 8
    ids, mask = synthetic_prompts(spec, 8, 512, seed=0)
    base = dict(gpu_batch_size=8, cache=Placement(0, 1))
    moved = {}
    with make(spec, Policy(**base, cpu_delegation=True)) as on, \
            make(spec, Policy(**base, cpu_delegation=False)) as off:
        def run(engine, name):
            rate, links = decode_rate(engine, ids, mask, gen_len)
            moved[name] = links["decode"]["cpu_to_gpu"]
            return rate

        values = interleaved({"on": lambda: run(on, "on"), "off": lambda: run(off, "off")},
                             repeats)
    print(f"[delegation] opt-125m fp32, batch 8, prompt 512, cache on the cpu tier: decode "
          f"token/s delegation on {summary(values['on'])}, off {summary(values['off'])}; decode "
          f"cpu->gpu bytes off/on = {moved['off'] / moved['on']:.0f}x "
          f"({moved['off']} vs {moved['on']}) (measured; target >= 100x)")


def section_compression() -> None:
    spec = ModelSpec.from_name("opt-1.3b")
    tiers = Tiers(64 * GiB, 64 * GiB, 64 * GiB, "cpu")
    policy = Policy(gpu_batch_size=8, weights=Placement(0, 1), compress_weight=True)
    with make(spec, policy, dtype=torch.float16, tiers=tiers) as engine:
        packed = engine.placed["weights"]["cpu"]
    fp16 = spec.weight_bytes(2)
    config = CompressionConfig(4, 64, -1)
    batch, seq = 32, 512 + 32 - 1
    cache = CacheHomes(spec, Placement(0, 1), batch, 1, seq, tiers, torch.float16, config, None)
    cache_packed = cache.home_bytes()["cpu"]
    cache_fp16 = spec.kv_cache_bytes(batch, seq, 2)
    print(f"[compression] opt-1.3b, 4-bit groups of 64: weights at home {packed} bytes = "
          f"{packed / fp16:.3f} x fp16; KV cache (batch {batch}, {seq} positions) "
          f"{cache_packed} bytes = {cache_packed / cache_fp16:.3f} x fp16 (from the allocated "
          "packed storage; target <= 0.30)")


def section_bigger() -> None:
    spec, gpu, cpu = ModelSpec.from_name("opt-6.7b"), 2 * GiB, 4 * GiB
    tiers = Tiers(gpu, cpu, 64 * GiB, compute_device(), pin_memory=False)
    policy = Policy(gpu_batch_size=4, weights=Placement(0.02, 0.12), pin_memory=False)
    ids, mask = synthetic_prompts(spec, 4, 32, seed=0)
    start = time.perf_counter()
    with PeakRSS() as rss:
        with make(spec, policy, dtype=torch.bfloat16, tiers=tiers) as engine:
            setup = time.perf_counter() - start
            gen = engine.generate(ids, mask, 4)
            placed = engine.placed["weights"]
    peaks = tiers.peaks()
    print(f"[bigger] opt-6.7b bf16 ({spec.weight_bytes(2) / 1e9:.1f} GB), gpu tier {gpu} B, cpu "
          f"tier {cpu} B: weights placed {placed}; generated {gen.output_ids.shape[1]} tokens x "
          f"{gen.output_ids.shape[0]} prompts, prefill {gen.prefill_s:.1f} s, decode "
          f"{gen.decode_s:.1f} s (setup incl. weight cache {setup:.0f} s); accounted peaks "
          f"{peaks}; peak RSS above start {rss.peak_bytes} B = "
          f"{rss.peak_bytes / (gpu + cpu):.2f} x (gpu + cpu budgets) (measured, one run)")


MEMORY_RUN = """
import sys, torch
from flexgen_lab.engine.engine import Engine
from flexgen_lab.engine.memory import PeakRSS
from flexgen_lab.engine.policy import Placement, Policy
from flexgen_lab.engine.tiers import Tiers
from flexgen_lab.models.spec import ModelSpec
from flexgen_lab.models.weights import DummyWeights
from flexgen_lab.workload import synthetic_prompts
w, c, d = (float(x) for x in sys.argv[1:4])
spec = ModelSpec.from_name("opt-1.3b")
tiers = Tiers(1 << 40, 1 << 40, 1 << 40, "cpu")
policy = Policy(gpu_batch_size=8, weights=Placement(w, c), cache=Placement(d, 1 - d))
ids, mask = synthetic_prompts(spec, 8, 256, seed=0)
with PeakRSS() as rss, torch.inference_mode():
    with Engine(spec, DummyWeights(spec, 0), policy, dtype=torch.bfloat16, tiers=tiers,
                offload_dir=sys.argv[4]) as engine:
        engine.generate(ids, mask, 4)
from flexgen_lab.planner.job import Job
from flexgen_lab.planner.memory_model import peak_bytes
model = peak_bytes(Job(spec, policy, "zigzag", None, 256, 4, 2))
print(tiers["gpu"].peak + tiers["cpu"].peak, rss.peak_bytes, int(model["gpu"] + model["cpu"]))
"""


def section_memory() -> None:
    """Accounted gpu + cpu peaks against the real peak RSS (fresh process per policy: RSS
    deltas in a process that freed memory before are not trustworthy)."""
    import subprocess
    import sys

    for w, c, d in ((1.0, 0.0, 1.0), (0.0, 1.0, 0.0), (0.2, 0.3, 0.5)):
        out = subprocess.run([sys.executable, "-c", MEMORY_RUN, str(w), str(c), str(d),
                              OFFLOAD], capture_output=True, text=True, check=True)
        accounted, real, modelled = (int(x) for x in out.stdout.split())
        print(f"[memory] opt-1.3b bf16, batch 8, prompt 256, weights gpu/cpu {w}/{c}, cache "
              f"gpu {d}: modelled gpu+cpu peak {modelled / GiB:.2f} GiB (memory_model), "
              f"accounted {accounted / GiB:.2f} GiB, peak RSS above "
              f"start {real / GiB:.2f} GiB, real / accounted = {real / accounted:.2f} "
              "(measured, cpu device: both tiers are host memory)")


SECTIONS = ("zigzag", "overlap", "cpu_tier", "io_workers", "delegation", "compression", "memory",
            "bigger")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"# measured on {device_name(compute_device())}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    with torch.inference_mode():
        for name in args.only:
            fn = globals()[f"section_{name}"]
            repeated = ("zigzag", "overlap", "cpu_tier", "io_workers", "delegation")
            fn(args.repeats) if name in repeated else fn()


if __name__ == "__main__":
    main()
