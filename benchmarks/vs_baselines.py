"""flexgen_lab against the systems people would otherwise use, measured side by side.

    python -m benchmarks.vs_baselines            # full: float32 and bfloat16, batch 1, 4, 16
    python -m benchmarks.vs_baselines --quick    # float32, batch 1 and 4; a shorter capped part

Every figure is measured on this machine in one run: each system in a fresh process
(benchmarks/systems.py), one warm-up generation, then the median (and spread) of 3 timed
generations; every system runs with the same torch thread count (printed).

uncapped   opt-1.3b (dummy weights), prompt 64, 16 new tokens: transformers in memory;
           Accelerate with 80 % of the weights off the side that computes (on its disk:
           mapped safetensors through the page cache); ours resident; ours with 80 % on the
           cpu tier; ours with 80 % on the disk tier, page cache bypassed (direct) and not
           (buffered). ours/Accelerate is printed beside the ceiling (ours resident /
           Accelerate). Tokens of every system are compared with transformers'.
capped     the regime FlexGen is for: every system in one memory cgroup below the model's
           size (benchmarks/memcap.py; the page cache counts), prompt 512 (128 with --quick),
           each system at its best batch of those tried, with a warm and (full run only) a
           cold page cache. Accelerate keeps --accelerate-share of the weights in memory (0.2);
           ours fills the cap as FlexGen would (ours_capped: several GPU batches per block,
           the cache in memory where it fits, then weights on the cpu tier while they fit),
           and as the paper's "FlexGen (c)" (ours_compressed: weights and cache in 4-bit
           groups, the weights in memory, the cache in memory as far as it fits; its tokens
           are compared with an uncompressed run at the same batch where one ran first).
           A system killed by the cap is reported as "does not fit".

llamacpp   llama.cpp (llama-cpp-python) against ours resident on the same weights, prompt
           64, 16 new tokens, batch 1 (its high-level API) and 16 (one batched llama_decode
           per step): SmolLM2-135M-Instruct (its fetched Q4_1 file dequantised, written back
           as F32 / BF16 GGUF) and a tinyllama-1.1b-shaped model (dummy weights written as
           F32 / BF16 GGUF); tokens compared with ours. SmolLM2's own Q4_1 file is reported as
           "llama.cpp Q4_1 kernels vs dequantised" (ours computes on the dequantised weights).

--quick takes about 20 minutes on 2 cores (measured). The full run is estimated at about 7
hours, nearly all of it the capped part (from measured figures at prompt 128: ~1.5 s of prefill
per sequence, x4 at prompt 512, and 3.5-11 s per decode step from batch 1 to 64; batches
1+4+16+32+64 = 117 sequences, 15 decode steps, 7 generations per system for warm and cold,
3 systems): ~4 h of prefill and ~3 h of decode. It has not been run whole. Run it in parts
with --only, --batches, --systems and --caches, e.g. `--only capped --batches 32 64
--systems accelerate direct --caches warm`.

The capped part runs float32 by default (opt-1.3b, 5.3 GB). `--only capped --model opt-2.7b
--capped-dtype bfloat16` runs the same 5.3 GB under the same cap in bfloat16, the precision
FlexGen runs in, for every system; on a CPU with AMX (this project's machines) a bfloat16
matmul is about 4x a float32 one (measured: 806 against 198 GFLOP/s for 8192 x 2048 x 8192 on
2 threads), so prefill, the same compute in every system, takes less of the time.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.memcap import MemoryCap
from benchmarks.systems import CPU
from flexgen_lab.models.spec import ModelSpec
from flexgen_lab.units import TORCH_DTYPES

OFFLOAD = tempfile.gettempdir() + "/flexgen_lab_bench"
MODEL = "opt-1.3b"
REPO = Path(__file__).resolve().parents[1]

UNCAPPED = {  # label -> the child's arguments
    "transformers (in memory)": {"system": "hf"},
    "Accelerate (80 % on its disk)": {"system": "accelerate", "compute_share": 0.2},
    "ours resident": {"system": "ours", "w_gpu": 1.0, "w_cpu": 0.0},
    "ours 80 % cpu tier": {"system": "ours", "w_gpu": 0.2, "w_cpu": 0.8},
    "ours 80 % disk (direct)": {"system": "ours", "w_gpu": 0.2, "w_cpu": 0.0,
                                "disk_io": "direct"},
    "ours 80 % disk (buffered)": {"system": "ours", "w_gpu": 0.2, "w_cpu": 0.0,
                                  "disk_io": "buffered"},
}


def child(args: dict, cap: MemoryCap | None = None, timeout: float | None = None) -> dict:
    """One system in a fresh process; {"killed": ...} when it did not finish (within
    `timeout` seconds: under a cap, a system may thrash for as long as one lets it)."""
    argv = [sys.executable, "-m", "benchmarks.systems", json.dumps(args)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cap = cap or MemoryCap(None)
    try:
        out = subprocess.run(cap.command(argv), capture_output=True, text=True, env=env,
                             cwd=REPO, timeout=timeout)
    except subprocess.TimeoutExpired:  # the child is killed (the cap's shell exec'd it)
        return {"killed": f"did not finish in {timeout:.0f} s"}
    if out.returncode != 0:
        why = "killed by the memory cap" if out.returncode in (137, -9) else \
            out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"rc {out.returncode}"
        return {"killed": why}
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["cgroup_peak_bytes"] = cap.peak_bytes()
    return result


def median(values: list[float]) -> float:
    return statistics.median(values)


def fmt(result: dict, key: str = "generation_token_s") -> str:
    if "killed" in result:
        return f"does not fit ({result['killed']})" if "cap" in result["killed"] else \
            f"failed ({result['killed']})"
    values = result[key]
    return f"{median(values):7.2f} (spread {max(values) - min(values):.2f})"


def rss(result: dict) -> str:
    """The generations' peak RSS above the loaded model (weights loaded before it starts)."""
    return (f"peak RSS above the loaded model: anon {result['peak_rss_anon_bytes'] / 2**30:.2f}"
            f" GiB, file {result['peak_rss_file_bytes'] / 2**30:.2f} GiB")


def uncapped(dtypes: list[str], batches: list[int], threads: int) -> None:
    base = {"model": MODEL, "prompt_len": 64, "gen_len": 16, "threads": threads,
            "warmup": 1, "repeats": 3, "offload_dir": OFFLOAD}
    for dtype in dtypes:
        for batch in batches:
            results = {label: child({**base, **args, "dtype": dtype, "batch": batch})
                       for label, args in UNCAPPED.items()}
            report_uncapped(dtype, batch, results)


def report_uncapped(dtype: str, batch: int, results: dict[str, dict]) -> None:
    ref = results["transformers (in memory)"].get("tokens")
    acc = results["Accelerate (80 % on its disk)"]
    acc_tput = median(acc["generation_token_s"]) if "killed" not in acc else None
    print(f"\n[uncapped] {MODEL} {dtype}, prompt 64, 16 new tokens, batch {batch}: generation "
          "token/s (measured; median of 3 after a warm-up, each system in a fresh process)")
    for label, r in results.items():
        extra = ""
        if "killed" not in r:
            placed = ", ".join(f"{t} {s:.0%}" for t, s in r["weights"].items() if s)
            same = "tokens = transformers'" if r["tokens"] == ref else "TOKENS DIFFER"
            extra = f"  weights {placed}; {r['threads']} threads; {rss(r)}; {same}"
            if acc_tput and label.startswith("ours"):
                extra += f"; ours/Accelerate {median(r['generation_token_s']) / acc_tput:.2f}"
        print(f"  {label:30s} {fmt(r)}{extra}")
    ours = results["ours resident"]
    if acc_tput and "killed" not in ours:
        print(f"  ceiling (ours resident / Accelerate): "
              f"{median(ours['generation_token_s']) / acc_tput:.2f}")


def model_bytes(dtype: str) -> int:
    return ModelSpec.from_name(MODEL).weight_bytes(TORCH_DTYPES[dtype].itemsize)


def evict(offload_dir: str) -> None:
    """Drop the page cache of every weight file under offload_dir (a cold start), with
    posix_fadvise: clean pages of files we may read, no privilege needed."""
    for path in Path(offload_dir).rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


# what our process holds beside the engine's accounted bytes (the interpreter, torch, the
# prompts and outputs): a generous figure, so the placement errs towards the disk
RUNTIME_BYTES = 700 * 2**20


def capped_systems(batch: int, limit: int, dtype: str, prompt_len: int, gen_len: int,
                   accelerate_share: float) -> dict[str, dict]:
    """What runs under the cap: a resident system cannot fit, so it is tried once at batch 1
    only to show it; Accelerate keeps `accelerate_share` of the weights where it computes,
    the rest on its disk; ours is placed as FlexGen places (ours_capped)."""
    ours = ours_capped(batch, limit, dtype, prompt_len, gen_len)
    return dict(zip(CAPPED_LABELS, ({"system": "hf"},
                                    {"system": "accelerate", "compute_share": accelerate_share},
                                    {**ours, "disk_io": "direct"},
                                    {**ours, "disk_io": "buffered"},
                                    ours_compressed(batch, limit, dtype, prompt_len, gen_len)),
                    strict=True))


def fits_cap(args: dict, batch: int, limit: int, dtype: str, prompt_len: int,
             gen_len: int) -> bool:
    """Whether ours with `args` fits the cap: what our memory model accounts, plus the
    runtime beside it."""
    return ours_accounted(args, batch, dtype, prompt_len, gen_len) + RUNTIME_BYTES <= limit


def ours_capped(batch: int, limit: int, dtype: str, prompt_len: int, gen_len: int) -> dict:
    """Ours under the cap, as FlexGen would place it: 20 % of the weights on the gpu tier,
    several GPU batches per block (each weight read serves them all); the KV cache and
    activations in memory only where our memory model says they fit beside the runtime, else
    on the disk tier; then as many weights on the cpu tier as still fit (steps of 5 %), the
    rest streamed from disk. On the CPU the gpu and cpu tiers are one memory."""
    ours = {"system": "ours", "w_gpu": 0.2, "w_cpu": 0.0, "gpu_batch_size": min(batch, 4)}
    fits = functools.partial(fits_cap, batch=batch, limit=limit, dtype=dtype,
                             prompt_len=prompt_len, gen_len=gen_len)

    if not fits(ours):
        ours.update(cache=(0.0, 0.0), activations=(0.0, 0.0))
    while ours["w_cpu"] < 0.8 and fits({**ours, "w_cpu": round(ours["w_cpu"] + 0.05, 2)}):
        ours["w_cpu"] = round(ours["w_cpu"] + 0.05, 2)
    return ours


def ours_compressed(batch: int, limit: int, dtype: str, prompt_len: int, gen_len: int) -> dict:
    """Ours as the paper's "FlexGen (c)": weights and KV cache in 4-bit groups of 64
    (compress=both), the weights in memory (on the CPU the gpu tier is memory), as much of
    the cache in memory as our memory model says fits beside the runtime (steps of 10 %), the
    rest of it on the disk tier; then, only if even that does not fit, weights to disk in
    steps of 5 %. GPU batches of up to 16: with the weights in memory a larger GPU batch
    reads each dequantised weight fewer times per step."""
    ours = {"system": "ours", "w_gpu": 1.0, "w_cpu": 0.0, "gpu_batch_size": min(batch, 16),
            "compress_weight": True, "compress_cache": True, "disk_io": "direct",
            "cache": (1.0, 0.0)}
    fits = functools.partial(fits_cap, batch=batch, limit=limit, dtype=dtype,
                             prompt_len=prompt_len, gen_len=gen_len)

    while not fits(ours) and ours["cache"][0] > 0:
        ours["cache"] = (round(max(ours["cache"][0] - 0.1, 0.0), 2), 0.0)
    while not fits(ours) and ours["w_gpu"] > 0:
        ours["w_gpu"] = round(ours["w_gpu"] - 0.05, 2)
    return ours


def placement(args: dict) -> str:
    """How a capped system holds its weights (and ours its cache), for the printed row."""
    if args["system"] == "accelerate":
        return f" ({args['compute_share']:.0%} in memory)"
    if args["system"] != "ours":
        return ""
    disk = 1 - args["w_gpu"] - args["w_cpu"]
    cache = args.get("cache", (1.0, 0.0))
    cache = ("" if cache == (1.0, 0.0) else ", cache on disk" if cache == (0.0, 0.0)
             else f", cache {sum(cache):.0%} in memory")
    return f" (w {args['w_gpu']:.0%}/{args['w_cpu']:.0%}/{disk:.0%}{cache})"


# the capped systems' labels, and the short names --systems takes for them
CAPPED_LABELS = ("transformers (in memory)", "Accelerate (rest on its disk)",
                 "ours disk (direct)", "ours disk (buffered)", "ours (c) 4-bit")
CAPPED_KEYS = ("transformers", "accelerate", "direct", "buffered", "compressed")
KEY_OF = dict(zip(CAPPED_LABELS, CAPPED_KEYS, strict=True))


def ours_accounted(args: dict, batch: int, dtype: str, prompt_len: int, gen_len: int) -> int:
    """Every byte our engine would reserve, on all tiers held in memory (memory_model)."""
    from benchmarks.systems import policy_of
    from flexgen_lab.planner.job import Job
    from flexgen_lab.planner.memory_model import peak_bytes

    job = Job(ModelSpec.from_name(MODEL), policy_of(args, batch), "zigzag", None, prompt_len,
              gen_len, TORCH_DTYPES[dtype].itemsize, compute_on_cpu=True)
    peaks = peak_bytes(job)
    return int(peaks["gpu"] + peaks["cpu"])


def capped(dtype: str, batches: list[int], prompt_len: int, gen_len: int, threads: int,
           caches: list[str], systems: list[str] = CAPPED_KEYS,
           accelerate_share: float = 0.2, timeout: float | None = None) -> None:
    """caches: "warm", "cold" or both; systems: which of CAPPED_KEYS to run; timeout: seconds
    one system's process may take. A system that did not finish at a batch is not tried at
    larger ones (they need more memory)."""
    limit = int(0.8 * model_bytes(dtype))
    base = {"model": MODEL, "dtype": dtype, "prompt_len": prompt_len, "gen_len": gen_len,
            "threads": threads, "offload_dir": OFFLOAD}
    with MemoryCap(limit) as cap:
        print(f"\n[capped] {MODEL} {dtype} ({model_bytes(dtype) / 1e9:.1f} GB of weights) "
              f"under {cap.how} ({limit / 1e9:.2f} GB), prompt {prompt_len}, {gen_len} new "
              "tokens: generation token/s (measured)")
        best: dict[tuple[str, str], tuple[int, float, float]] = {}
        at_one: dict[tuple[str, str], float] = {}  # generation token/s at batch 1
        gave_up: set[tuple[str, str]] = set()
        for batch in sorted(batches):
            exact = None  # the tokens of this batch's first uncompressed run
            for label, args in capped_systems(batch, limit, dtype, prompt_len, gen_len,
                                               accelerate_share).items():
                if KEY_OF[label] not in systems:
                    continue
                if args["system"] == "hf" and batch > min(batches):
                    continue  # it did not fit at the smallest batch
                for cache in caches:
                    if (label, cache) in gave_up:
                        continue
                    r = run_capped({**base, **args, "batch": batch}, cap, cache, timeout)
                    peak = r.get("cgroup_peak_bytes")
                    print(f"  batch {batch:3d} {cache} {label + placement(args):45s} "
                          f"{fmt(r)}{phases(r)}"
                          + (f"  cgroup peak {peak / 1e9:.2f} GB" if peak else "")
                          + agreement(r, exact, args))
                    if "killed" in r:
                        gave_up.add((label, cache))
                    else:
                        if exact is None and not args.get("compress_weight"):
                            exact = r["tokens"]
                        tput = median(r["generation_token_s"])
                        if batch == 1:
                            at_one[(label, cache)] = tput
                        if tput > best.get((label, cache), (0, 0.0, 0.0))[1]:
                            best[(label, cache)] = (batch, tput, median(r["decode_token_s"]))
        summarize_capped(best, at_one)


def agreement(result: dict, exact: list | None, args: dict) -> str:
    """For a 4-bit run: the share of its generated tokens equal to an uncompressed
    system's at the same batch (where one ran first)."""
    if not args.get("compress_weight") or exact is None or "killed" in result:
        return ""
    pairs = [(a, b) for ra, rb in zip(result["tokens"], exact, strict=True)
             for a, b in zip(ra, rb, strict=True)]
    return f"  tokens {sum(a == b for a, b in pairs) / len(pairs):.0%} = uncompressed"


def run_capped(args: dict, cap: MemoryCap, cache: str, timeout: float | None = None) -> dict:
    """warm: one warm-up then 3 timed generations in one process; cold: 3 fresh processes,
    each after evicting the weight files from the page cache, timing their first
    generation."""
    if cache == "warm":
        return child({**args, "warmup": 1, "repeats": 3}, cap, timeout)
    runs = []
    for _ in range(3):
        evict(OFFLOAD)
        runs.append(child({**args, "warmup": 0, "repeats": 1}, cap, timeout))
        if "killed" in runs[-1]:
            return runs[-1]
    return {**runs[-1], "generation_token_s": [r["generation_token_s"][0] for r in runs]}


def phases(result: dict) -> str:
    """Where a generation's time goes: the prefill's seconds (the same compute in every
    system) and the decode's token/s (where FlexGen's schedule saves weight reads)."""
    if "killed" in result:
        return ""
    return (f"  [prefill {median(result['prefill_s']):.1f} s, decode "
            f"{median(result['decode_token_s']):.2f} token/s]")


def summarize_capped(best: dict, at_one: dict) -> None:
    """The issue's two ratios: at batch 1 (target >= 1.2) and at each system's best batch
    of those run (target >= 2)."""
    accelerate = "Accelerate (rest on its disk)"
    for cache in ("warm", "cold"):
        acc = best.get((accelerate, cache))
        for label in CAPPED_LABELS[2:]:
            ours = best.get((label, cache))
            if (accelerate, cache) in at_one and (label, cache) in at_one:
                print(f"  {cache}: {label} / Accelerate at batch 1: "
                      f"{at_one[(label, cache)] / at_one[(accelerate, cache)]:.2f} "
                      "(target >= 1.2)")
            if acc and ours:
                print(f"  {cache}: {label} at its best batch ({ours[0]}) / Accelerate at its "
                      f"best ({acc[0]}): {ours[1] / acc[1]:.2f} (target >= 2); decode "
                      f"alone {ours[2] / acc[2]:.2f}")


LLAMACPP_MODELS = ("smollm2-135m-instruct", "tinyllama-1.1b")


def llamacpp(dtypes: list[str], batches: list[int], threads: int) -> None:
    from flexgen_lab.fetch import artifact_path

    base = {"prompt_len": 64, "gen_len": 16, "threads": threads, "warmup": 1, "repeats": 3,
            "offload_dir": OFFLOAD}
    for model in LLAMACPP_MODELS:
        source = {"model": model}
        if model.startswith("smollm2"):
            path = artifact_path(model)
            if not path.is_file():
                print(f"\n[llamacpp] {model}: not fetched (python -m flexgen_lab fetch {model})")
                continue
            source["gguf"] = str(path)
        for batch in batches:
            for dtype in dtypes:
                args = {**base, **source, "dtype": dtype, "batch": batch}
                report_llamacpp(f"{model} {dtype}", batch, {
                    "ours resident": child({**args, "system": "ours", "w_gpu": 1.0,
                                            "w_cpu": 0.0}),
                    f"llama.cpp {dtype} GGUF": child({**args, "system": "llamacpp"})})
            if "gguf" in source:  # its own quantised file: different kernels, not a target
                args = {**base, **source, "dtype": "float32", "batch": batch}
                report_llamacpp(f"{model} Q4_1 (llama.cpp Q4_1 kernels vs dequantised)", batch, {
                    "ours (dequantised, float32)": child({**args, "system": "ours",
                                                         "w_gpu": 1.0, "w_cpu": 0.0}),
                    "llama.cpp Q4_1 GGUF": child({**args, "system": "llamacpp",
                                                  "file": "own"})}, target=False)


def report_llamacpp(what: str, batch: int, results: dict[str, dict], target=True) -> None:
    print(f"\n[llamacpp] {what}, prompt 64, 16 new tokens, batch {batch}: generation token/s "
          "(measured; median of 3 after a warm-up, each system in a fresh process)")
    (ours_label, ours), (cpp_label, cpp) = results.items()
    for label, r in results.items():
        extra = ""
        if "killed" not in r:
            extra = (f"  decode {median(r['decode_token_s']):.2f} token/s; {r['threads']} "
                     f"threads; {rss(r)}")
        print(f"  {label:30s} {fmt(r)}{extra}")
    if "killed" not in ours and "killed" not in cpp:
        same = "tokens = ours" if cpp["tokens"] == ours["tokens"] else "TOKENS DIFFER"
        ratio = median(ours["generation_token_s"]) / median(cpp["generation_token_s"])
        goal = " (target at batch 16: > 1)" if target and batch >= 16 else ""
        print(f"  ours/llama.cpp {ratio:.2f}{goal}; llama.cpp's {same}")


def main() -> None:
    global MODEL
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="float32 only, batch 1 and 4; capped: prompt 128, warm only")
    parser.add_argument("--only", nargs="*", choices=["uncapped", "capped", "llamacpp"],
                        default=["uncapped", "capped", "llamacpp"])
    parser.add_argument("--model", default=MODEL, help="a smaller preset for a smoke run")
    parser.add_argument("--batches", nargs="+", type=int,
                        help="the capped part's batch sizes (default 1 4 16 32 64; --quick 1 8)")
    parser.add_argument("--systems", nargs="+", choices=CAPPED_KEYS, default=list(CAPPED_KEYS),
                        help="the capped part's systems (default all)")
    parser.add_argument("--accelerate-share", type=float, default=0.2,
                        help="the capped part: the share of weights Accelerate keeps where it "
                             "computes (default 0.2)")
    parser.add_argument("--capped-dtype", choices=["float32", "bfloat16"], default="float32",
                        help="the capped part's weights and compute for every system (default "
                             "float32; bfloat16 with --model opt-2.7b is the same 5.3 GB)")
    parser.add_argument("--caches", nargs="+", choices=["warm", "cold"],
                        help="the capped part's page cache (default warm and cold; --quick warm)")
    parser.add_argument("--child-timeout", type=float, default=1800,
                        help="the capped part: seconds one system's process may take before it "
                             "is stopped as not finishing (default 1800)")
    args = parser.parse_args()
    MODEL = args.model
    threads = torch.get_num_threads()
    print(f"{MODEL if args.only != ['llamacpp'] else 'llama.cpp section'} on {CPU.type} with "
          f"{threads} torch threads in every system; this machine's other jobs share its "
          "cores, so the figures are noisy")
    start = time.perf_counter()
    if "uncapped" in args.only:
        uncapped(["float32"] if args.quick else ["float32", "bfloat16"],
                 [1, 4] if args.quick else [1, 4, 16], threads)
    if "capped" in args.only:
        prompt_len, gen_len, batches, caches = ((128, 8, [1, 8], ["warm"]) if args.quick else
                                                (512, 16, [1, 4, 16, 32, 64], ["warm", "cold"]))
        capped(args.capped_dtype, args.batches or batches, prompt_len, gen_len, threads,
               args.caches or caches, args.systems, args.accelerate_share, args.child_timeout)
    if "llamacpp" in args.only:
        llamacpp(["float32"] if args.quick else ["float32", "bfloat16"], [1, 16], threads)
    print(f"\n({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
