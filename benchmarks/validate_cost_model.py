"""Measured vs predicted: the cost model (on this machine's calibrated profile) against the
engine, for policies the calibration never saw.

    python -m benchmarks.validate_cost_model            # calibrate, then 13 policies

Each policy: one warm-up and 3 measured generations (median); prediction from
planner.cost_model.predict on the profile `calibrate` measures first. Prints per policy the
measured and predicted generation throughput and the relative error, then the median and
largest absolute error (target: median <= 15 %, max <= 35 %) and the zig-zag / row-by-row
throughput ratio measured vs predicted (target within 15 %).
"""

from __future__ import annotations

import statistics
import tempfile

import torch

from flexgen_lab.engine.engine import Engine
from flexgen_lab.engine.policy import Placement, Policy
from flexgen_lab.hardware import calibrate
from flexgen_lab.hardware.profile import HardwareProfile
from flexgen_lab.models.spec import ModelSpec
from flexgen_lab.models.weights import DummyWeights
from flexgen_lab.planner.cost_model import predict
from flexgen_lab.runner import compute_device, device_name
from flexgen_lab.workload import synthetic_prompts

OFFLOAD = tempfile.gettempdir() + "/flexgen_lab_validate"
CPU, DISK, MIX = Placement(0, 1), Placement(0, 0), Placement(0.3, 0.4)
POLICIES = {  # name -> (policy, schedule)
    "resident b4": (Policy(gpu_batch_size=4), "zigzag"),
    "resident b16": (Policy(gpu_batch_size=16), "zigzag"),
    "weights cpu 8x2": (Policy(gpu_batch_size=8, num_gpu_batches=2, weights=CPU), "zigzag"),
    "weights cpu 8x2 row": (Policy(gpu_batch_size=8, num_gpu_batches=2, weights=CPU),
                            "row_by_row"),
    "weights disk 16": (Policy(gpu_batch_size=16, weights=DISK), "zigzag"),
    "weights mix 8x2": (Policy(gpu_batch_size=8, num_gpu_batches=2, weights=MIX), "zigzag"),
    "cache cpu 8": (Policy(gpu_batch_size=8, cache=CPU), "zigzag"),
    "cache cpu deleg 8": (Policy(gpu_batch_size=8, cache=CPU, cpu_delegation=True), "zigzag"),
    "cache disk deleg 8": (Policy(gpu_batch_size=8, cache=DISK, cpu_delegation=True), "zigzag"),
    "acts cpu 8x2": (Policy(gpu_batch_size=8, num_gpu_batches=2, activations=CPU), "zigzag"),
    "all mix 4x2 no overlap": (Policy(gpu_batch_size=4, num_gpu_batches=2, weights=MIX,
                                      cache=MIX, activations=MIX, overlap=False), "zigzag"),
    "compressed weights cpu 8": (Policy(gpu_batch_size=8, weights=CPU, compress_weight=True),
                                 "zigzag"),
    "compressed cache cpu 8": (Policy(gpu_batch_size=8, cache=CPU, compress_cache=True),
                               "zigzag"),
}


def measured(spec, policy, schedule, prompt_len, gen_len, repeats=3) -> float:
    ids, mask = synthetic_prompts(spec, policy.block_size, prompt_len, seed=0)
    with Engine(spec, DummyWeights(spec, 0), policy, schedule, compute_device(),
                offload_dir=OFFLOAD) as engine:
        engine.generate(ids, mask, gen_len)  # warm-up
        rates = []
        for _ in range(repeats):
            gen = engine.generate(ids, mask, gen_len)
            rates.append(policy.block_size * gen_len / (gen.prefill_s + gen.decode_s))
    return statistics.median(rates)


def main() -> None:
    spec, prompt_len, gen_len = ModelSpec.from_name("opt-125m"), 64, 8
    speeds = calibrate.measure(False, OFFLOAD, torch.float32)
    caps = calibrate.default_capacities(OFFLOAD)
    profile = HardwareProfile(name="calibrated", source="this run", cpu_correction=(0, 0, 0),
                              safety_factor=0.8, **caps, **speeds)
    print(f"# measured on {device_name(compute_device())}; opt-125m fp32, prompt {prompt_len}, "
          f"{gen_len} new tokens; profile calibrated just before (same process)")
    errors, rates = [], {}
    for name, (policy, schedule) in POLICIES.items():
        real = measured(spec, policy, schedule, prompt_len, gen_len)
        guess = predict(spec, policy, schedule, profile, prompt_len, gen_len,
                        4).generation_throughput
        rates[name] = (real, guess)
        errors.append(abs(guess - real) / real)
        print(f"{name:26s} measured {real:8.2f} token/s  predicted {guess:8.2f}  "
              f"error {100 * (guess - real) / real:+6.1f} %", flush=True)
    print(f"median |error| {100 * statistics.median(errors):.1f} % (target <= 15 %), max "
          f"{100 * max(errors):.1f} % (target <= 35 %)")
    zz, rr = rates["weights cpu 8x2"], rates["weights cpu 8x2 row"]
    print(f"zig-zag / row-by-row: measured {zz[0] / rr[0]:.2f}, predicted {zz[1] / rr[1]:.2f}")


if __name__ == "__main__":
    main()
