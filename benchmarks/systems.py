"""One system timed in this process: what benchmarks/vs_baselines.py runs in a fresh child.

    python -m benchmarks.systems '{"system": "accelerate", "model": "opt-1.3b", ...}'

prints one JSON line: generation and decode token/s of each timed repeat (after a warm-up
generation), the torch thread count, the achieved placement and the generations' peak RSS
above the loaded model (anonymous and file-backed). The setup (exporting the checkpoint,
building our weight cache) happens before the first generation and is not timed; every repeat
is one generation, timed as the paper does (prefill = first token, decode = the rest).

Systems:
  hf           transformers' generate, everything in memory
  accelerate   Accelerate big-model inference; `compute_share` of the weights where it
               computes, the rest on its disk (mapped safetensors, read through the page cache)
  ours         flexgen_lab's engine; `w_gpu`/`w_cpu` placement (the rest on the disk tier),
               `disk_io` direct or buffered, block = gpu_batch_size x num_gpu_batches
  llamacpp     llama.cpp on a GGUF file written from the same weights in `dtype` (or, with
               `file: own`, the `gguf` file itself, e.g. SmolLM2's Q4_1); batch 1 through its
               high-level API, larger batches in one batched llama_decode per step

`gguf` (a path) takes the weights from a .gguf file (dequantised) instead of dummy weights.
"""

from __future__ import annotations

import json
import sys
import time

import torch

from flexgen_lab.baselines import accelerate_offload, hf_generate
from flexgen_lab.baselines.export import checkpoint_dir
from flexgen_lab.baselines.rss import PeakRssSplit
from flexgen_lab.engine.engine import Engine
from flexgen_lab.engine.policy import Placement, Policy
from flexgen_lab.models.gguf import GGUFWeights
from flexgen_lab.models.spec import ModelSpec
from flexgen_lab.models.weights import DummyWeights
from flexgen_lab.units import TORCH_DTYPES
from flexgen_lab.workload import synthetic_prompts, unpadded

CPU = torch.device("cpu")


def accelerate_model(spec, weights, dtype, share: float, offload_dir: str, scratch):
    """Accelerate's model with about `share` of the weight bytes where it computes. Its
    planner holds back the largest layer on a device, so that layer is added to the budget;
    the placement it achieved is reported, not assumed."""
    path = checkpoint_dir(weights, spec, dtype, offload_dir)
    skeleton = accelerate_offload.meta_model(path, dtype)
    total = sum(p.numel() * p.element_size() for p in skeleton.parameters())
    largest = max(sum(p.numel() * p.element_size() for p in layer.parameters())
                  for layer in skeleton.modules() if type(layer).__name__.endswith("Layer"))
    budget = total + largest if share >= 1 else int(share * total) + largest
    device_map = accelerate_offload.plan(skeleton, {"cpu": budget}, dtype)
    placed = accelerate_offload.achieved_bytes(skeleton, device_map, CPU)
    model = accelerate_offload.load(path, dtype, device_map, scratch)
    return model, {tier: n / total for tier, n in placed.items()}


def policy_of(args: dict, batch: int) -> Policy:
    """Our engine's policy from a child's arguments (block = gpu_batch_size x the rest)."""
    gbs = args.get("gpu_batch_size") or batch
    return Policy(gpu_batch_size=gbs, num_gpu_batches=batch // gbs,
                  weights=Placement(args["w_gpu"], args["w_cpu"]),
                  cache=Placement(*args.get("cache", (1.0, 0.0))),
                  activations=Placement(*args.get("activations", (1.0, 0.0))),
                  compress_weight=args.get("compress_weight", False),
                  compress_cache=args.get("compress_cache", False))


def build(args: dict, spec, weights, dtype, stack):
    """(generate(ids, mask) -> Generation, achieved weight shares per tier)."""
    batch, gen_len = args["batch"], args["gen_len"]
    if args["system"] == "hf":
        model = hf_generate.hf_model(spec, weights, dtype)
        return (lambda ids, mask: hf_generate.generate(model, ids, mask, gen_len, batch),
                {"gpu": 1.0, "cpu": 0.0, "disk": 0.0})
    if args["system"] == "accelerate":
        scratch = stack.enter_context(accelerate_offload.scratch_dir(args["offload_dir"]))
        model, shares = accelerate_model(spec, weights, dtype, args["compute_share"],
                                         args["offload_dir"], scratch)
        return (lambda ids, mask: hf_generate.generate(model, ids, mask, gen_len, batch, CPU),
                shares)
    if args["system"] == "llamacpp":
        from flexgen_lab.baselines import llamacpp
        from flexgen_lab.baselines.export import gguf_file

        path = weights.path if args.get("file") == "own" else gguf_file(
            weights, spec, dtype, args["offload_dir"], rewrite=True)
        return (lambda ids, mask: llamacpp.generate(path, unpadded(ids, mask), gen_len, batch),
                {"gpu": 0.0, "cpu": 1.0, "disk": 0.0})
    engine = stack.enter_context(Engine(spec, weights, policy_of(args, batch), "zigzag", CPU,
                                        dtype, offload_dir=args["offload_dir"],
                                        disk_io=args.get("disk_io", "direct")))
    placed = engine.placement_report()["weights"]
    total = sum(v["achieved"] for v in placed.values())
    return (lambda ids, mask: engine.generate(ids, mask, gen_len),
            {tier: v["achieved"] / total for tier, v in placed.items()})


def measure(args: dict) -> dict:
    from contextlib import ExitStack

    torch.set_num_threads(args["threads"])
    dtype = TORCH_DTYPES[args["dtype"]]
    if args.get("gguf"):
        weights = GGUFWeights(args["gguf"], name=args["model"])
        spec = weights.spec
    else:
        spec = ModelSpec.from_name(args["model"])
        weights = DummyWeights(spec, 0)
    ids, mask = synthetic_prompts(spec, args["batch"], args["prompt_len"], seed=0)
    n, gen_len = args["batch"], args["gen_len"]
    with ExitStack() as stack, torch.inference_mode():
        start = time.perf_counter()
        generate, shares = build(args, spec, weights, dtype, stack)
        setup_s = time.perf_counter() - start
        with PeakRssSplit() as rss:
            gens = [generate(ids, mask) for _ in range(args["warmup"] + args["repeats"])]
    timed = gens[args["warmup"]:]
    return {
        "generation_token_s": [n * gen_len / (g.prefill_s + g.decode_s) for g in timed],
        "decode_token_s": [n * (gen_len - 1) / g.decode_s for g in timed],
        "prefill_s": [g.prefill_s for g in timed],
        "tokens": gens[-1].output_ids[:, :gen_len].tolist(),
        "threads": torch.get_num_threads(), "setup_s": setup_s, "weights": shares,
        "peak_rss_anon_bytes": rss.peak_anon_bytes, "peak_rss_file_bytes": rss.peak_file_bytes,
    }


if __name__ == "__main__":
    print(json.dumps(measure(json.loads(sys.argv[1]))))
