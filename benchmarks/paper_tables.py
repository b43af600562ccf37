"""The paper's Table 2 (FlexGen cells) and Table 4 (ablation), simulated on the paper's T4.

    python -m benchmarks.paper_tables          # about a minute; no weights are made

For each profile (t4-paper: the machine as described; t4-paper-fitted: the original cost
model's fitted constants) every cell is the paper's own policy run through the simulator
(backend=simulated: the engine's op stream timed on the profile) and through our cost model,
and on t4-paper-fitted also through the original's formulas (cost_model.variant=
flexgen-original). Every number printed beside "paper" is simulated or modelled, never measured.
The last columns give our engine's modelled gpu peak and the tiers whose capacity it exceeds.
"""

from __future__ import annotations

import dataclasses

from flexgen_lab.__main__ import compose_run_config, load_profile
from flexgen_lab.models.spec import ModelSpec
from flexgen_lab.planner.cost_model import flexgen_original, predict
from flexgen_lab.planner.memory_model import peak_bytes
from flexgen_lab.runner import to_policy
from flexgen_lab.sim.simulator import simulate

TABLE2 = [  # (model, prompt_len, policy preset, compress, paper token/s)
    ("opt-6.7b", 512, "paper-6.7b-512", "none", 25.26),
    ("opt-30b", 512, "paper-30b-512", "none", 7.32),
    ("opt-175b", 512, "paper-175b-512", "none", 0.69),
    ("opt-6.7b", 1024, "paper-6.7b-1024", "none", 13.72),
    ("opt-30b", 1024, "paper-30b-1024", "none", 3.50),
    ("opt-175b", 1024, "paper-175b-1024", "none", 0.35),
    ("opt-6.7b", 512, "paper-6.7b-512-c", "both", 29.12),
    ("opt-30b", 512, "paper-30b-512-c", "cache", 8.38),
    ("opt-175b", 512, "paper-175b-512-c", "both", 1.12),
    ("opt-6.7b", 1024, "paper-6.7b-1024-c", "both", 13.18),
    ("opt-30b", 1024, "paper-30b-1024-c", "cache", 3.98),
    ("opt-175b", 1024, "paper-175b-1024-c", "both", 0.42),
]
TABLE4 = {  # row -> paper token/s for (opt-30b, opt-175b); None = OOM
    "all optimizations": (7.32, 0.69), "no policy search (num_gb = 1)": (7.26, 0.27),
    "no overlapping": (5.86, 0.59), "no CPU compute (no delegation)": (4.03, 0.62),
    "no disk": (7.32, None), "with DeepSpeed's policy": (1.57, 0.01),
}
GEN_LEN = 32


def cell(model: str, prompt_len: int, preset: str, profile, change: dict | None = None,
         compress: str = "none"):
    """(simulator, cost model, original formulas, gpu peak GB, tiers over capacity)."""
    cfg = compose_run_config([f"model={model}", f"policy={preset}", f"compress={compress}"])
    schedule = "row_by_row" if preset.startswith("deepspeed") else "zigzag"
    spec, policy = ModelSpec.from_name(model), dataclasses.replace(to_policy(cfg), **(change or {}))
    peaks = peak_bytes(spec, policy, prompt_len, GEN_LEN, 2)
    capacity = {"gpu": profile.gpu_mem, "cpu": profile.cpu_mem, "disk": profile.disk_mem}
    over = ",".join(t for t in capacity if peaks[t] > capacity[t]) or "fits"
    sim = simulate(spec, policy, schedule, profile, prompt_len, GEN_LEN, 2)
    ours = predict(spec, policy, schedule, profile, prompt_len, GEN_LEN, 2)
    original = flexgen_original(spec, policy, profile, prompt_len, GEN_LEN)
    return (sim.generation_throughput, ours.generation_throughput,
            original.generation_throughput, peaks["gpu"] / 1e9, over)


def no_disk(policy_preset: str, model: str):
    """'No disk': whatever the policy put on disk goes to the cpu instead."""
    p = to_policy(compose_run_config([f"model={model}", f"policy={policy_preset}"]))
    return {kind: dataclasses.replace(getattr(p, kind), cpu=1 - getattr(p, kind).gpu)
            for kind in ("weights", "cache", "activations")}


def table4_changes(model: str) -> dict[str, tuple[str, dict]]:
    size = model.split("-")[1]
    base = f"paper-{size}-512"
    return {"all optimizations": (base, {}),
            "no policy search (num_gb = 1)": (base, {"num_gpu_batches": 1}),
            "no overlapping": (base, {"overlap": False}),
            "no CPU compute (no delegation)": (base, {"cpu_delegation": False}),
            "no disk": (base, no_disk(base, model)),
            "with DeepSpeed's policy": (f"deepspeed-{size}", {})}


def row(label: str, paper: float | None, values, original: bool) -> str:
    sim, ours, orig, peak, over = values
    paper_text = f"{paper:7.2f}" if paper is not None else "    OOM"
    ratio = f"{sim / paper:5.2f}" if paper else "  -  "
    extra = f" {orig:9.3f}" if original else ""
    return (f"{label:34s} {paper_text} {sim:9.3f} {ratio} {ours:9.3f}{extra} "
            f"{peak:7.1f} {over}")


def header(original: bool) -> str:
    extra = " original" if original else ""
    return (f"{'cell':34s} {'paper':>7s} {'simulated':>9s} {'ratio':>5s} {'our model':>9s}"
            f"{extra:>10s} {'gpu GB':>7s} memory (our engine)")


def main() -> None:
    for name in ("t4-paper", "t4-paper-fitted"):
        profile, original = load_profile(name), name == "t4-paper-fitted"
        print(f"\n## Table 2, FlexGen rows, hardware={name} (token/s; simulated / modelled)")
        print(header(original))
        for model, s, preset, compress, paper in TABLE2:
            values = cell(model, s, preset, profile, compress=compress)
            print(row(f"{model} s={s} {preset}", paper, values, original), flush=True)
        print(f"\n## Table 4, s=512, hardware={name}")
        print(header(original))
        for model, column in (("opt-30b", 0), ("opt-175b", 1)):
            for label, (preset, change) in table4_changes(model).items():
                values = cell(model, 512, preset, profile, change)
                print(row(f"{model} {label}", TABLE4[label][column], values, original),
                      flush=True)


if __name__ == "__main__":
    main()
