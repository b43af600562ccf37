"""Measured vs predicted: the cost model and the simulator against the engine on this machine,
for policies the fit never saw.

    python -m benchmarks.validate_cost_model            # about 10 minutes on 2 cores

1. calibrate: micro-benchmarks of this machine, per-copy latencies and the model's operator
   time table at its own shapes (what `calibrate model=opt-125m` writes; no end-to-end run)
   -> the "calibrated" profile;
2. measure 12 training policies and fit the profile to them (planner/fit.py: least squares
   on phase times) -> the "fitted" profile;
3. measure 13 validation policies (tiers, both schedules, batch sizes, delegation,
   compression, overlap off) and print measured throughput beside the cost model's and the
   simulator's predictions on both profiles, each beside the policy's run-to-run spread
   ((max - min) / median of the repeats' throughput), the median and largest absolute error
   over the policies whose spread is under 15 % (the others are reported, not counted;
   targets: fitted median <= 10 %, max <= 25 %; calibrated alone median <= 15 %, max <= 35 %)
   and the zig-zag / row-by-row throughput ratio (target: within 10 % of the measured one).
Every run: one warm-up, then `--repeats` generations (default 3); each phase's time is the
median.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
from pathlib import Path

import torch

from flexgen_lab.checks import compute_device
from flexgen_lab.engine.engine import Engine
from flexgen_lab.engine.policy import Placement, Policy
from flexgen_lab.hardware import calibrate
from flexgen_lab.hardware.profile import HardwareProfile
from flexgen_lab.models.spec import ModelSpec
from flexgen_lab.models.weights import DummyWeights
from flexgen_lab.planner.cost_model import predict
from flexgen_lab.planner.fit import Observation, fit
from flexgen_lab.runner import device_name
from flexgen_lab.sim.simulator import simulate
from flexgen_lab.workload import synthetic_prompts

OFFLOAD = tempfile.gettempdir() + "/flexgen_lab_validate"
MODEL, PROMPT_LEN, GEN_LEN = "opt-125m", 64, 16
GPU, CPU, DISK, MIX = Placement(1, 0), Placement(0, 1), Placement(0, 0), Placement(0.3, 0.4)
HALF = Placement(0.5, 0.5)
TRAIN = {  # name -> (policy, schedule): what the fit sees
    "resident b1": (Policy(gpu_batch_size=1), "zigzag"),
    "resident b8": (Policy(gpu_batch_size=8), "zigzag"),
    "resident 2x2 row": (Policy(gpu_batch_size=2, num_gpu_batches=2), "row_by_row"),
    "weights cpu 4": (Policy(gpu_batch_size=4, weights=CPU), "zigzag"),
    "weights disk 4x2": (Policy(gpu_batch_size=4, num_gpu_batches=2, weights=DISK), "zigzag"),
    "weights cpu 16 no overlap": (Policy(gpu_batch_size=16, weights=CPU, overlap=False),
                                  "zigzag"),
    "cache cpu 4x2 row": (Policy(gpu_batch_size=4, num_gpu_batches=2, cache=CPU),
                          "row_by_row"),
    "cache disk 8": (Policy(gpu_batch_size=8, cache=DISK), "zigzag"),
    "cache cpu deleg 16": (Policy(gpu_batch_size=16, cache=CPU, cpu_delegation=True), "zigzag"),
    "acts disk 8": (Policy(gpu_batch_size=8, activations=DISK), "zigzag"),
    "compressed both half 8": (Policy(gpu_batch_size=8, weights=HALF, cache=HALF,
                                      compress_weight=True, compress_cache=True), "zigzag"),
    "mix deleg 8 no overlap": (Policy(gpu_batch_size=8, weights=MIX, cache=MIX,
                                      cpu_delegation=True, overlap=False), "zigzag"),
}
VALIDATE = {  # name -> (policy, schedule): never fitted on
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


SPREAD_LIMIT = 0.15  # policies noisier than this, run to run, are reported, not counted


def measure(spec, policy, schedule, repeats: int) -> tuple[Observation, float]:
    """The run's median phase times, and its run-to-run spread of throughput."""
    ids, mask = synthetic_prompts(spec, policy.block_size, PROMPT_LEN, seed=0)
    with Engine(spec, DummyWeights(spec, 0), policy, schedule, compute_device(),
                offload_dir=OFFLOAD) as engine:
        engine.generate(ids, mask, GEN_LEN)  # warm-up
        runs = [engine.generate(ids, mask, GEN_LEN) for _ in range(repeats)]
    rates = [policy.block_size * GEN_LEN / (g.prefill_s + g.decode_s) for g in runs]
    obs = Observation(spec, policy, schedule, PROMPT_LEN, GEN_LEN, policy.block_size, 4,
                      statistics.median(g.prefill_s for g in runs),
                      statistics.median(g.decode_s for g in runs))
    return obs, (max(rates) - min(rates)) / statistics.median(rates)


def predictions(obs: Observation, profile: HardwareProfile) -> tuple[float, float]:
    """(cost model, simulator) generation throughput."""
    job = obs.job(profile)
    return predict(job).generation_throughput, simulate(job).generation_throughput


TARGETS = {"calibrated": (15, 35), "fitted": (10, 25)}  # median, max |error| in %


def summary(label: str, errors: list[float], counted: list[bool]) -> str:
    absolute = [abs(e) for e, keep in zip(errors, counted, strict=True) if keep]
    if not absolute:
        return f"{label:34s} no policy with a spread under {100 * SPREAD_LIMIT:.0f} %"
    median, most = TARGETS[label.split()[0]]
    return (f"{label:34s} median |error| {100 * statistics.median(absolute):5.1f} % "
            f"(target <= {median} %), max {100 * max(absolute):5.1f} % (target <= {most} %)"
            f" over {len(absolute)} of {len(errors)} policies")


def save(profile: HardwareProfile, train: list, validation: list) -> None:
    """The calibrated profile and every measured phase time, for refitting without rerunning."""
    def rows(observations):
        return [{"policy": dataclasses.asdict(o.policy), "schedule": o.schedule,
                 "prefill_s": o.prefill_s, "decode_s": o.decode_s} for o in observations]

    path = Path(OFFLOAD) / "validate_cost_model.json"
    path.write_text(json.dumps({"profile": dataclasses.asdict(profile), "model": MODEL,
                                "prompt_len": PROMPT_LEN, "gen_len": GEN_LEN,
                                "train": rows(train), "validate": rows(validation)}, indent=1))
    print(f"measurements saved to {path}")


def calibrated_profile(spec: ModelSpec) -> HardwareProfile:
    """This machine's micro-benchmarks alone: speeds, copy latencies, the operator table."""
    device = compute_device()
    speeds = calibrate.measure(False, OFFLOAD, torch.float32)
    key, table = calibrate.model_table(spec, torch.float32, device, quick=False)
    return HardwareProfile(name="calibrated", source="this run", cpu_correction=(0, 0, 0),
                           safety_factor=0.8, **calibrate.default_capacities(OFFLOAD),
                           op_tables={key: table}, **speeds,
                           **calibrate.engine_settings(device, torch.float32, OFFLOAD))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="generations per policy")
    repeats = parser.parse_args().repeats
    spec = ModelSpec.from_name(MODEL)
    Path(OFFLOAD).mkdir(parents=True, exist_ok=True)
    calibrated = calibrated_profile(spec)
    print(f"# measured on {device_name(compute_device())}, {torch.get_num_threads()} threads; "
          f"{MODEL} fp32, prompt {PROMPT_LEN}, {GEN_LEN} new tokens; every prediction is "
          "simulated/modelled, every 'measured' is the engine run here", flush=True)
    train = [measure(spec, p, s, repeats)[0] for p, s in TRAIN.values()]
    for name, obs in zip(TRAIN, train, strict=True):
        print(f"  train {name:26s} prefill {obs.prefill_s:.4f} s, decode {obs.decode_s:.4f} s "
              f"(measured)")
    fitted, report = fit(calibrated, train)
    print("fit on", len(train), "training runs: factors",
          {k: round(v, 3) for k, v in report.factors.items()},
          f"step overhead {1e3 * report.step_overhead_s:.3f} ms; training median |error| "
          f"{100 * report.median_error:.1f} %", flush=True)
    print(f"{'policy':26s} {'measured':>9s} {'spread':>7s} | {'calibrated: model':>17s} "
          f"{'err':>7s} {'sim':>7s} {'err':>7s} | {'fitted: model':>13s} {'err':>7s} "
          f"{'sim':>7s} {'err':>7s}   (token/s)")
    errors = {"calibrated model": [], "calibrated sim": [], "fitted model": [],
              "fitted sim": []}
    rates, validation, counted = {}, [], []
    for name, (policy, schedule) in VALIDATE.items():
        obs, spread = measure(spec, policy, schedule, repeats)
        validation.append(obs)
        counted.append(spread < SPREAD_LIMIT)
        raw_model, raw_sim = predictions(obs, calibrated)
        model, sim = predictions(obs, fitted)
        real = obs.throughput
        rates[name] = (real, model, sim)
        for key, guess in zip(errors, (raw_model, raw_sim, model, sim), strict=True):
            errors[key].append((guess - real) / real)
        cells = " | ".join(" ".join(f"{v:{w}.2f} {100 * (v - real) / real:+6.1f}%"
                                    for v, w in ((m, 17 if i == 0 else 13), (s, 7)))
                           for i, (m, s) in enumerate(((raw_model, raw_sim), (model, sim))))
        print(f"{name:26s} {real:9.2f} {100 * spread:6.1f}% | {cells}", flush=True)
    for key, values in errors.items():
        print(summary(key, values, counted))
    save(calibrated, train, validation)
    zz, rr = rates["weights cpu 8x2"], rates["weights cpu 8x2 row"]
    print(f"zig-zag / row-by-row throughput: measured {zz[0] / rr[0]:.2f}, cost model "
          f"{zz[1] / rr[1]:.2f}, simulator {zz[2] / rr[2]:.2f} (fitted profile; target: "
          "within 10 % of the measured ratio)")


if __name__ == "__main__":
    main()
