"""Refine a hardware profile's speeds from measured runs: least squares on phase times.

    python -m flexgen_lab calibrate fit=true name=calibrated      # runs stored with that profile

Micro-benchmarks (calibrate) measure each speed alone, at shapes that are not the model's and
without the engine's own bookkeeping; the runs in the store say what the engine really
achieved. The fit scales each speed group by a factor and sets the per-step overhead so that
the cost model's prefill and decode times match the measured ones (operator tables, where
the profile has them, are scaled per group of operators like a speed) (residuals: log predicted /
measured, one per phase and run), with a weak pull towards the measured speeds so that a
speed the runs hardly exercise keeps its micro-benchmark value. A share of the runs is held
out and the fitted profile is reported on them, never fitted on them.

    >>> fitted, report = fit(profile, train)
    >>> report.median_error, errors(fitted, held_out)
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass

import numpy as np
from scipy.optimize import least_squares

from flexgen_lab.engine.policy import Policy
from flexgen_lab.hardware.op_table import COMPRESSION_OPS
from flexgen_lab.hardware.profile import HardwareProfile
from flexgen_lab.models.spec import ModelSpec
from flexgen_lab.planner.cost_model import predict
from flexgen_lab.planner.job import Job
from flexgen_lab.units import TORCH_DTYPES

# fitted factor -> the profile fields it scales together
SPEED_GROUPS = {
    "mm_flops_prefill": ("mm_flops_prefill",), "mm_flops_decode": ("mm_flops_decode",),
    "bmm_flops_prefill": ("bmm_flops_prefill",), "bmm_flops_decode": ("bmm_flops_decode",),
    "cpu_flops": ("cpu_flops",), "gpu_mem_bw": ("gpu_mem_bw",),
    "dequant_rate": ("dequant_rate",), "bw_cpu_to_gpu": ("bw_cpu_to_gpu",),
    "bw_gpu_to_cpu": ("bw_gpu_to_cpu_cache", "bw_gpu_to_cpu_hidden"),
    "bw_disk_to_cpu": ("bw_disk_to_cpu",),
    "bw_cpu_to_disk": ("bw_cpu_to_disk_cache_prefill", "bw_cpu_to_disk_hidden_prefill",
                       "bw_cpu_to_disk_decode"),
}
# fitted factor -> the operator-table ops it speeds up (profiles with tables, from calibrate)
TABLE_GROUPS = {"op_dense": ("dense", "embed"),
                "op_attention": ("attention_decode", "attention_prefill",
                                 "attention_decode_decoded"),
                "op_head": ("head",),
                "op_dequant": tuple(op for op in COMPRESSION_OPS if op.startswith(
                    ("dequant", "quant")))}
OVERHEAD_RANGE = (1e-7, 0.1)  # seconds per compute step
STARTING_OVERHEADS = (1e-6, 1e-4, 1e-3)
PRIOR_WEIGHT = 0.03  # pull of log(factor) towards 0 (the micro-benchmark), per factor
SENSITIVITY = 1e-3  # a factor whose doubling moves no phase time by 0.1 % is not fitted


@dataclass(frozen=True)
class Observation:
    """One measured run: what ran and how long its phases took."""

    spec: ModelSpec
    policy: Policy
    schedule: str
    prompt_len: int
    gen_len: int
    num_prompts: int
    dtype_bytes: int
    prefill_s: float
    decode_s: float
    run_id: int | None = None

    @property
    def throughput(self) -> float:
        return self.num_prompts * self.gen_len / (self.prefill_s + self.decode_s)

    def job(self, profile: HardwareProfile) -> Job:
        return Job(self.spec, self.policy, self.schedule, profile, self.prompt_len,
                   self.gen_len, self.dtype_bytes, self.num_prompts)


@dataclass
class FitReport:
    factors: dict[str, float]  # speed group -> fitted multiplier of the base profile's speed
    step_overhead_s: float
    fitted_on: int  # runs
    train_errors: list[float]  # relative errors of generation throughput, fitted profile

    @property
    def median_error(self) -> float:
        return statistics.median(abs(e) for e in self.train_errors)


def predicted_phases(profile: HardwareProfile, obs: Observation) -> tuple[float, float]:
    pred = predict(obs.job(profile))
    return pred.prefill_s, pred.decode_s


def errors(profile: HardwareProfile, observations: list[Observation]) -> list[float]:
    """(predicted - measured) / measured generation throughput, run by run."""
    out = []
    for obs in observations:
        prefill, decode = predicted_phases(profile, obs)
        guess = obs.num_prompts * obs.gen_len / (prefill + decode)
        out.append((guess - obs.throughput) / obs.throughput)
    return out


def _apply(base: HardwareProfile, names: list[str], x: np.ndarray) -> HardwareProfile:
    changes, table_factors = {}, {}
    for name, value in zip(names, x, strict=True):
        if name == "step_overhead_s":
            changes[name] = math.exp(value)
        elif name in TABLE_GROUPS:
            table_factors |= dict.fromkeys(TABLE_GROUPS[name], math.exp(value))
        else:
            for key in SPEED_GROUPS[name]:
                changes[key] = getattr(base, key) * math.exp(value)
    if table_factors:
        changes["op_tables"] = {key: table.scaled(table_factors)
                                for key, table in base.op_tables.items()}
    return base.replace(**changes)


def _phase_residuals(profile: HardwareProfile, observations: list[Observation]) -> np.ndarray:
    """log(predicted / measured) of every run's prefill and decode time."""
    out = []
    for obs in observations:
        prefill, decode = predicted_phases(profile, obs)
        out.append(math.log(prefill / obs.prefill_s))
        if obs.gen_len > 1:
            out.append(math.log(decode / obs.decode_s))
    return np.array(out)


def _residuals(base, names, x, observations) -> np.ndarray:
    prior = [PRIOR_WEIGHT * v for n, v in zip(names, x, strict=True) if n != "step_overhead_s"]
    return np.concatenate([_phase_residuals(_apply(base, names, x), observations), prior])


def _exercised(base: HardwareProfile, observations: list[Observation]) -> list[str]:
    """Speed groups the runs depend on: doubling the speed moves some phase time."""
    names = [n for n, keys in SPEED_GROUPS.items() if getattr(base, keys[0])]
    names += list(TABLE_GROUPS) if base.op_tables else []
    before = _phase_residuals(base, observations)
    kept = []
    for name in names:
        doubled = _phase_residuals(_apply(base, [name], np.array([math.log(2)])), observations)
        if np.max(np.abs(doubled - before)) > SENSITIVITY:
            kept.append(name)
    return kept


def fit(base: HardwareProfile, observations: list[Observation]) -> tuple[HardwareProfile,
                                                                         FitReport]:
    """The profile whose speeds (scaled per group) and step overhead best explain the runs."""
    if not observations:
        raise ValueError("fit: no runs to fit on (store measured runs with this profile first)")
    base.require_speeds()
    names = [*_exercised(base, observations), "step_overhead_s"]
    lower = np.full(len(names), math.log(1e-3))
    upper = np.full(len(names), math.log(1e3))
    lower[-1], upper[-1] = (math.log(v) for v in OVERHEAD_RANGE)
    # phase times are maxima of terms, so the problem is not convex: start from several
    # overheads (none, launch-sized, Python-sized) and keep the best solution
    results = []
    for overhead in STARTING_OVERHEADS:
        x0 = np.zeros(len(names))
        x0[-1] = math.log(overhead)
        results.append(least_squares(lambda x: _residuals(base, names, x, observations), x0,
                                     bounds=(lower, upper), x_scale=1.0, diff_step=1e-4))
    result = min(results, key=lambda r: r.cost)
    fitted = _apply(base, names, result.x)
    factors = {n: math.exp(v) for n, v in zip(names, result.x, strict=True)
               if n != "step_overhead_s"}
    return fitted, FitReport(factors, fitted.step_overhead_s, len(observations),
                             errors(fitted, observations))


def split(observations: list[Observation], holdout: float) -> tuple[list, list]:
    """(fit, held out): every k-th run (by run order) is held out, k = round(1 / holdout)."""
    if not 0 < holdout < 1:
        raise ValueError(f"holdout={holdout!r}: a fraction in (0, 1)")
    every = max(2, round(1 / holdout))
    held = [obs for n, obs in enumerate(observations) if n % every == every - 1]
    return [obs for n, obs in enumerate(observations) if n % every != every - 1], held


def observation_from_row(row: dict) -> Observation:
    """A stored run (an ok, measured flexgen_lab row) as an Observation."""
    config = json.loads(row["config_json"])
    model = config["model"]
    spec = (ModelSpec.from_hf_config(model["path"]) if model.get("path")
            else ModelSpec.from_name(row["model"]))
    policy = Policy.from_store_row(row)
    dtype_bytes = TORCH_DTYPES[row["dtype"]].itemsize
    return Observation(spec, policy, row["schedule"], int(row["prompt_len"]),
                       int(row["gen_len"]), int(row["num_prompts"]), dtype_bytes,
                       float(row["prefill_s"]), float(row["decode_s"]), int(row["run_id"]))
