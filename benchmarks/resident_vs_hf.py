"""The resident engine against transformers' generate on the same model, prompts, batch, dtype.

Greedy, prompt 128, 32 new tokens, dummy weights shared by both; one warm-up and 3 repeats,
interleaved so that the noisy machine slows both alike. Prints generation throughput (the
paper's metric, token/s, measured) and the ratio ours / hf. Target: ratio >= 1.0 on the CPU.

    python benchmarks/resident_vs_hf.py                      # opt-125m and opt-1.3b, all cells
    python benchmarks/resident_vs_hf.py --models opt-125m --batches 1 4 --dtypes float32
"""

from __future__ import annotations

import argparse
import statistics
from functools import partial

import torch

from benchmarks.common import interleaved, summary
from flexgen_lab.baselines import hf_generate
from flexgen_lab.checks import compute_device
from flexgen_lab.engine.engine import Engine
from flexgen_lab.engine.policy import Policy
from flexgen_lab.models.spec import ModelSpec
from flexgen_lab.models.weights import DummyWeights
from flexgen_lab.runner import device_name
from flexgen_lab.units import TORCH_DTYPES
from flexgen_lab.workload import synthetic_prompts

# the benchmark's dtypes: float16 is left out (CPU half matmuls are slow in both systems)
DTYPES = {name: TORCH_DTYPES[name] for name in ("float32", "bfloat16")}


def engine_throughput(engine: Engine, ids, mask, gen_len: int) -> float:
    with torch.inference_mode():
        g = engine.generate(ids, mask, gen_len)
    return ids.shape[0] * gen_len / (g.prefill_s + g.decode_s)


def hf_throughput(model, ids, mask, gen_len: int) -> float:
    g = hf_generate.generate(model, ids, mask, gen_len, ids.shape[0])
    return ids.shape[0] * gen_len / (g.prefill_s + g.decode_s)


def bench_model(name: str, batches: list[int], dtypes: list[str], prompt_len: int, gen_len: int,
                repeats: int) -> None:
    spec, device = ModelSpec.from_name(name), compute_device()
    weights = DummyWeights(spec, seed=0)
    for dtype_name in dtypes:
        dtype = DTYPES[dtype_name]
        hf = hf_generate.hf_model(spec, weights, dtype, device)
        engine = Engine(spec, weights, Policy(gpu_batch_size=1), device=device, dtype=dtype)
        for batch in batches:
            engine.policy = Policy(gpu_batch_size=batch)
            ids, mask = synthetic_prompts(spec, batch, prompt_len, seed=0)
            values = interleaved({
                "ours": partial(engine_throughput, engine, ids, mask, gen_len),
                "hf": partial(hf_throughput, hf, ids, mask, gen_len),
            }, repeats=repeats)
            ratio = statistics.median(values["ours"]) / statistics.median(values["hf"])
            print(f"{name:9s} {dtype_name:8s} batch {batch:3d}  ours {summary(values['ours'])}"
                  f"  hf {summary(values['hf'])}  ratio {ratio:5.2f}", flush=True)
        del hf, engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["opt-125m", "opt-1.3b"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 4, 16])
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--gen-len", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"# measured on {device_name(compute_device())}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; generation throughput in token/s, "
          f"prompt {args.prompt_len}, {args.gen_len} new tokens, median of {args.repeats}")
    for name in args.models:
        bench_model(name, args.batches, args.dtypes, args.prompt_len, args.gen_len, args.repeats)


if __name__ == "__main__":
    main()
