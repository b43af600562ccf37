"""Verify the CUDA path in one go: parity, an overlap trace, a capped-memory OPT-6.7B run.

    python -m benchmarks.cuda_check            # needs an NVIDIA GPU; about 5 minutes

1. parity: tiny OPT and Llama (dummy weights, float32) on CUDA, offloaded placements
   (pinned cpu tier, disk tier, delegation, compression) against the resident engine and
   against transformers' generate: identical tokens, logits within 1e-4;
2. overlap trace: weights on the pinned cpu tier, the next layer's load running while the
   current layer computes, with the measured cpu->gpu copy bandwidth (real PCIe copies);
3. OPT-6.7B (float16 dummy weights) under a 4 GiB gpu tier: weights 20 % gpu / 80 % pinned
   cpu, cache on the cpu tier with delegation; throughput, accounted gpu peak vs CUDA's own
   max_memory_allocated (they should agree within 10 %);
4. blocked attention: a prefill whose whole scores would take 4 GiB stays within the
   accounted gpu peak (CUDA max allocated), on SDPA's default kernels and its math path.
Prints each figure with the device; exits 1 if a check fails, 2 without a GPU.
"""

from __future__ import annotations

import sys
import tempfile
import time

import torch

from flexgen_lab.baselines import hf_generate
from flexgen_lab.engine.batch import Callbacks
from flexgen_lab.engine.engine import Engine
from flexgen_lab.engine.policy import Placement, Policy
from flexgen_lab.engine.tiers import Tiers
from flexgen_lab.models.spec import ModelSpec
from flexgen_lab.models.weights import DummyWeights
from flexgen_lab.runner import device_name
from flexgen_lab.workload import synthetic_prompts

GiB = 2**30
CUDA = torch.device("cuda")
OFFLOAD = tempfile.mkdtemp(prefix="flexgen_lab_cuda_")


class Record(Callbacks):
    def __init__(self):
        self.logits, self.ops = {}, []

    def on_logits(self, token, batch, logits):
        self.logits[(token, batch)] = logits.float().cpu()

    def on_op(self, record):
        self.ops.append(record)


def run(spec, policy, dtype=torch.float32, tiers=None, ids=None, mask=None, gen_len=8):
    record = Record()
    with Engine(spec, DummyWeights(spec, 0), policy, "zigzag", CUDA, dtype, record, tiers,
                OFFLOAD) as engine:
        gen = engine.generate(ids, mask, gen_len)
    return gen, record


def check_parity() -> bool:
    ok = True
    cases = {"pinned cpu weights": dict(weights=Placement(0, 1)),
             "disk weights + cache": dict(weights=Placement(0.2, 0.3), cache=Placement(0, 0)),
             "delegation": dict(cache=Placement(0.25, 0.5), cpu_delegation=True),
             "activations offloaded": dict(activations=Placement(0.3, 0.3))}
    for name in ("opt-tiny", "llama-tiny"):
        spec = ModelSpec.from_name(name)
        ids, mask = synthetic_prompts(spec, 6, 16, seed=0, varied_lengths=True)
        ref, ref_rec = run(spec, Policy(gpu_batch_size=3, num_gpu_batches=2), ids=ids,
                           mask=mask)
        hf = hf_generate.generate(hf_generate.hf_model(spec, DummyWeights(spec, 0),
                                                       torch.float32, CUDA), ids, mask, 8, 6)
        same = torch.equal(hf.output_ids, ref.output_ids)
        print(f"  {name} resident vs transformers on CUDA: tokens equal {same}")
        ok &= same
        for label, extra in cases.items():
            gen, rec = run(spec, Policy(gpu_batch_size=3, num_gpu_batches=2, **extra), ids=ids,
                           mask=mask)
            diff = max((rec.logits[k] - v).abs().max().item() for k, v in ref_rec.logits.items())
            good = torch.equal(gen.output_ids, ref.output_ids) and diff <= 1e-4
            print(f"  {name} {label}: tokens equal {torch.equal(gen.output_ids, ref.output_ids)},"
                  f" max logit diff {diff:.2e}")
            ok &= good
    return ok


def check_overlap() -> bool:
    spec = ModelSpec.from_name("opt-1.3b")
    ids, mask = synthetic_prompts(spec, 16, 256, seed=0)
    gen, rec = run(spec, Policy(gpu_batch_size=16, weights=Placement(0, 1)), torch.float16,
                   ids=ids, mask=mask, gen_len=4)
    computes = {(r["token"], r["layer"], r["batch"]): r for r in rec.ops if r["op"] == "compute"}
    loads = [r for r in rec.ops if r["op"] == "load_weight" and r["layer"] > 1]
    early = [r for r in loads
             if r["start_s"] < computes[(r["token"], r["layer"] - 1, 0)]["end_s"]]
    moved = sum(r["bytes"].get("cpu_to_gpu", 0) for r in loads)
    busy = sum(r["end_s"] - r["start_s"] for r in loads)
    print(f"  opt-1.3b fp16, weights on the pinned cpu tier: {len(early)}/{len(loads)} layer "
          f"loads started before the previous layer's compute ended; cpu->gpu "
          f"{moved / busy / 1e9:.1f} GB/s while loading; decode "
          f"{16 * 3 / gen.decode_s:.1f} token/s (measured)")
    return len(early) > len(loads) // 2


def check_capped_6_7b() -> bool:
    spec = ModelSpec.from_name("opt-6.7b")
    tiers = Tiers(4 * GiB, 64 * GiB, 64 * GiB, CUDA, pin_memory=True)
    policy = Policy(gpu_batch_size=8, weights=Placement(0.2, 0.8), cache=Placement(0, 1),
                    cpu_delegation=True)
    ids, mask = synthetic_prompts(spec, 8, 512, seed=0)
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    gen, _ = run(spec, policy, torch.float16, tiers, ids, mask, 16)
    real = torch.cuda.max_memory_allocated()
    accounted = tiers["gpu"].peak
    print(f"  opt-6.7b fp16, gpu tier 4 GiB: generation "
          f"{8 * 16 / (gen.prefill_s + gen.decode_s):.2f} token/s (prefill {gen.prefill_s:.1f} s,"
          f" decode {gen.decode_s:.1f} s; {time.perf_counter() - start:.0f} s with setup); "
          f"accounted gpu peak {accounted / GiB:.2f} GiB, CUDA max allocated {real / GiB:.2f} GiB"
          f" (ratio {real / accounted:.2f}) (measured)")
    return real <= 4 * GiB * 1.1 and abs(real / accounted - 1) <= 0.10


def check_blocked_attention() -> bool:
    """A prefill whose whole attention scores would take 4 GiB (16 x 32 heads x 2048^2 fp16):
    queries go in chunks (models/ops.py), so CUDA's max allocated stays within the accounted
    gpu peak, on SDPA's default kernels and on its math path (which materialises scores)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    spec = ModelSpec(name="wide-2l", family="opt", num_layers=2, hidden=2048, num_heads=32,
                     num_kv_heads=32, ffn=8192, vocab=50272, max_positions=2048)
    ids, mask = synthetic_prompts(spec, 16, 2048, seed=0)
    ok = True
    for name, backends in (("default", list(SDPBackend)), ("math", [SDPBackend.MATH])):
        tiers = Tiers(64 * GiB, 64 * GiB, 64 * GiB, CUDA)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with sdpa_kernel(backends):
            run(spec, Policy(gpu_batch_size=16), torch.float16, tiers, ids, mask, 2)
        real, accounted = torch.cuda.max_memory_allocated() - base, tiers["gpu"].peak
        print(f"  blocked attention, SDPA {name}: b=16, s=2048, accounted gpu peak "
              f"{accounted / GiB:.2f} GiB, CUDA max allocated {real / GiB:.2f} GiB "
              f"(ratio {real / accounted:.2f}) (measured)")
        ok &= real <= accounted
    return ok


def main() -> None:
    if not torch.cuda.is_available():
        print("cuda_check: no CUDA device here; run it where a GPU is")
        sys.exit(2)
    print(f"# cuda_check on {device_name(CUDA)}, torch {torch.__version__}")
    results = {}
    for name, check in (("parity", check_parity), ("overlap", check_overlap),
                        ("capped opt-6.7b", check_capped_6_7b),
                        ("blocked attention", check_blocked_attention)):
        print(f"[{name}]")
        results[name] = check()
    print("results:", results)
    sys.exit(0 if all(results.values()) else 1)


if __name__ == "__main__":
    main()
