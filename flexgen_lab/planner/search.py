"""Policy search: a pulp/CBC linear program over placement fractions per (gbs, num_gpu_batches).

The LP's terms come from the same code as the predictions, never a second copy: link bytes
are the traffic model's (exactly the engine's counters) evaluated at pure placements, which
is linear in the fractions because weights, cache and activations move independently; memory
is the memory model's constant plus linear part; compute is the cost model's. Each phase's time
is at least every link's time and the compute time (overlap) or their sum (no overlap).

    python -m flexgen_lab search model=opt-30b hardware=t4-paper workload.prompt_len=512
"""

from __future__ import annotations

import dataclasses
import functools
import time
from dataclasses import dataclass

import pulp

from flexgen_lab.engine.policy import Placement, Policy
from flexgen_lab.engine.transfer import LINKS
from flexgen_lab.hardware.profile import HardwareProfile
from flexgen_lab.models.spec import ModelSpec
from flexgen_lab.planner.cost_model import (
    Prediction,
    interleaved,
    link_rate,
    predict,
    window_compute_seconds,
)
from flexgen_lab.planner.job import Job
from flexgen_lab.planner.memory_model import VARIABLES, memory_terms, peak_bytes, placing_terms
from flexgen_lab.planner.traffic import WINDOWS, window_bytes

KINDS = {"weights": "w", "cache": "c", "activations": "h"}
GPU_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128)  # the paper: multiples of 4, mostly
MAX_GPU_BATCHES = 32


@dataclass
class Found:
    policy: Policy
    schedule: str
    prediction: Prediction
    peak_bytes: dict[str, float]
    lps_solved: int
    seconds: float
    simulated: float | None = None  # the simulator's token/s of `policy`, when re-ranked
    lp_best: tuple[Policy, float, float] | None = None  # the cost model's own best: policy,
    # predicted and simulated token/s (when re-ranking chose another)
    # (simulated figures here: search.extrapolated_throughput, 8 tokens extrapolated)


def _with(policy: Policy, kind: str, tier: str) -> Policy:
    place = {"gpu": Placement(1, 0), "cpu": Placement(0, 1), "disk": Placement(0, 0)}[tier]
    return dataclasses.replace(policy, **{kind: place})


def link_coefficients(job: Job) -> dict:
    """(phase, window, link) -> {variable: bytes moved when that fraction is 1} (baseline
    all-gpu), for one block of the job's policy."""
    resident = dataclasses.replace(job.policy, weights=Placement(), cache=Placement(),
                                   activations=Placement())
    job = job.replace(policy=resident, num_prompts=None)
    base = window_bytes(job)
    coef: dict = {}
    for kind, prefix in KINDS.items():
        for tier in ("cpu", "disk"):
            moved = window_bytes(job.with_policy(_with(resident, kind, tier)))
            for phase, windows in moved.items():
                for window, links in windows.items():
                    for link, nbytes in links.items():
                        extra = nbytes - base[phase][window][link]
                        if extra:
                            coef.setdefault((phase, window, link), {})[
                                f"{prefix}{tier[0]}"] = extra
    return coef


FIT_ATTEMPTS = 4
FIT_SLACK = 1e-3  # of a tier's limit, taken off with each retry
RESIDENT = Placement(1, 0)


def homes(policy: Policy, micro_blocks: int) -> Policy:
    """The policy whose memory a pipeline stage holds: the cache and activation homes of
    `micro_blocks` blocks in flight (each keeps its own), the weights and slots once."""
    if micro_blocks == 1:
        return policy
    return dataclasses.replace(policy, num_gpu_batches=policy.num_gpu_batches * micro_blocks)


def solve(job: Job, micro_blocks: int = 1) -> Policy | None:
    """The best placement for the job's fixed (gbs, ngb, delegation, compression) on its
    profile's capacities (one block); None if none fits.

    The general LP keeps room for the slots and staging of every kind of tensor it may
    offload; a kind left wholly on the gpu tier needs none, so when the general answer keeps
    most weights there (or finds nothing) the LP with the weights pinned there is solved too,
    and the all-resident policy is a candidate of its own. The fastest by the cost model wins.
    micro_blocks > 1 (a pipeline stage): memory holds that many blocks' homes (homes()).
    """
    profile, policy = job.profile, job.policy
    job = job.replace(num_prompts=None)
    limit = {tier: capacity * profile.safety_factor
             for tier, capacity in (("gpu", profile.gpu_mem), ("cpu", profile.cpu_mem),
                                    ("disk", profile.disk_mem))}
    fit = functools.partial(_fit, job, limit, micro_blocks=micro_blocks)
    general = fit(())
    if general is None:  # without disk there are no bounce buffers to hold on the cpu tier
        general = fit((), disk=False)
    candidates = [general]
    if general is None or general.weights.gpu > 0.9:
        candidates.append(fit(("weights",)))
    resident = dataclasses.replace(policy, weights=RESIDENT, cache=RESIDENT,
                                   activations=RESIDENT)
    if _fits(job.with_policy(homes(resident, micro_blocks)), limit):
        candidates.append(resident)
    candidates = [c for c in candidates if c is not None]
    if not candidates:
        return None
    return max(candidates,
               key=lambda c: predict(job.with_policy(c)).generation_throughput)


def _fits(job: Job, limit: dict[str, float]) -> bool:
    return all(peak <= limit[tier]
               for tier, peak in peak_bytes(job, job.profile.workers()).items())


def _fit(job: Job, limit: dict[str, float], pinned: tuple[str, ...], disk: bool = True,
         micro_blocks: int = 1) -> Policy | None:
    """The LP's answer, checked against the exact peak (memory_model.peak_bytes): the LP sees
    memory linearly (a share x of b sequences), the engine rounds to whole sequences, rows and
    disk blocks, so a tier the answer overshoots is tightened and solved again."""
    lp_limit = dict(limit)
    for _ in range(FIT_ATTEMPTS):
        found = _solve_lp(job, lp_limit, pinned, disk, micro_blocks)
        if found is None:
            return None
        over = {tier: peak - limit[tier] for tier, peak in
                peak_bytes(job.with_policy(homes(found, micro_blocks)),
                           job.profile.workers()).items()
                if peak > limit[tier]}
        if not over:
            return found
        # rounding moves with the answer, so tighten by more than the overshoot
        lp_limit = {tier: value - 2 * over[tier] - FIT_SLACK * limit[tier] if tier in over
                    else value for tier, value in lp_limit.items()}
    return None


def _solve_lp(job: Job, limit: dict[str, float], pinned: tuple[str, ...], disk: bool = True,
              micro_blocks: int = 1) -> Policy | None:
    """Minimises prefill + decode time, each the sum over windows of T_w >= every link term
    and the compute of window w (overlap), or the sum of all terms (no overlap): the cost
    model's predict, written as a linear program; memory per tier at most `limit` bytes;
    the kinds in `pinned` stay wholly on the gpu tier (and need no offloading buffers);
    without `disk` nothing goes to the disk tier (and no bounce buffers are held).
    Contention (profile.overlap_contention, clipped to 1 here: beyond it the term is not
    convex) enters as T_w >= copy_i + c x compute and compute + c x copy_i, which is
    max(copy, compute) + c x min(copy, compute) for c <= 1; predict ranks the answers."""
    policy, profile, schedule = job.policy, job.profile, job.schedule
    prob = pulp.LpProblem("placement", pulp.LpMinimize)
    x = {v: pulp.LpVariable(v, 0, 1) for v in VARIABLES}
    for kind, prefix in KINDS.items():
        prob += x[f"{prefix}g"] + x[f"{prefix}c"] + x[f"{prefix}d"] == 1
        if kind in pinned:
            prob += x[f"{prefix}g"] == 1
        if not disk:
            prob += x[f"{prefix}d"] == 0
    offloaded = [kind not in pinned for kind in KINDS]
    held = job.with_policy(homes(policy, micro_blocks))
    memory = memory_terms(held, *offloaded, disk=disk, io_workers=profile.workers())
    placing = placing_terms(held, disk and offloaded[0], profile.workers())
    for tier, term in [*memory.items(), ("cpu", placing)]:
        prob += term.const + pulp.lpSum(c * x[v] for v, c in term.coef.items()) <= limit[tier]
    coef = link_coefficients(job)
    compute = _compute_exprs(job, x)
    contention = min(1.0, profile.overlap_contention)
    total = []
    for phase in ("prefill", "decode"):
        for window in WINDOWS:
            t = pulp.LpVariable(f"T_{phase}_{window}", 0)
            total.append(t)
            seconds = {link: {v: b / link_rate(profile, link, phase) for v, b in
                              coef.get((phase, window, link), {}).items()} for link in LINKS}
            links = [pulp.lpSum(c * x[v] for v, c in per.items()) for per in seconds.values()]
            # activation traffic: the "h" variables' (the baseline moves none)
            round_trip = pulp.lpSum(c * x[v] for per in seconds.values()
                                    for v, c in per.items() if v.startswith("h"))
            work = compute[(phase, window)]
            if policy.overlap:  # as predict: links, I/O workers, activation chain, compute
                copying = (*links, pulp.lpSum(links) / profile.workers())
                prob += t >= (work + round_trip) / interleaved(policy, schedule)
                for term in copying:
                    prob += t >= term + contention * work
                    prob += t >= work + contention * term
            else:
                prob += t >= pulp.lpSum(links) + work
    prob += pulp.lpSum(total)
    status = prob.solve(pulp.PULP_CBC_CMD(msg=False))
    if pulp.LpStatus[status] != "Optimal":
        return None
    v = {name: max(0.0, min(1.0, var.value() or 0.0)) for name, var in x.items()}
    return dataclasses.replace(
        policy, weights=Placement(v["wg"], min(v["wc"], 1 - v["wg"])),
        cache=Placement(v["cg"], min(v["cc"], 1 - v["cg"])),
        activations=Placement(v["hg"], min(v["hc"], 1 - v["hg"])))


def _compute_exprs(job: Job, x: dict) -> dict:
    """(phase, window) -> compute seconds of one block; with delegation, decode attention
    splits by where the cache is (gpu share on the GPU, the rest on the CPU)."""
    policy = job.policy
    on_gpu = window_compute_seconds(job.with_policy(_with(policy, "cache", "gpu")))
    on_cpu = window_compute_seconds(job.with_policy(_with(policy, "cache", "cpu")))
    out = {}
    for phase, windows in on_gpu.items():
        for window, terms in windows.items():
            fixed = terms["matmul"] + terms["dequant"] + terms["overhead"]
            if not policy.cpu_delegation or phase == "prefill":
                out[(phase, window)] = fixed + terms["attention"]
            else:
                cpu = on_cpu[phase][window]["cpu_attention"]
                out[(phase, window)] = (fixed + terms["attention"] * x["cg"]
                                        + cpu * (x["cc"] + x["cd"]))
    return out


def _doubling(limit: int) -> list[int]:
    """1, 2, 4, ... up to limit: each CBC solve costs a process start, so probe geometrically."""
    out, ngb = [], 1
    while ngb <= limit:
        out.append(ngb)
        ngb *= 2
    return out


def _choices(value: bool | None) -> list[bool]:
    """A boolean the user fixed, or both when it is left to the search (None)."""
    return [value] if value is not None else [True, False]


def search(spec: ModelSpec, profile: HardwareProfile, s: int, n: int, q: int = 2,
           base: Policy | None = None, schedule: str = "zigzag",
           delegation: bool | None = None, batch_sizes: tuple[int, ...] = GPU_BATCH_SIZES,
           max_gpu_batches: int = MAX_GPU_BATCHES,
           compress: tuple[bool | None, bool | None] = (False, False),
           max_block_size: int | None = None, rerank_top: int = 0,
           micro_blocks: int = 1, compute_on_cpu: bool = False) -> Found | None:
    """Enumerate gbs, and num_gpu_batches in doublings while throughput grows and the LP stays
    feasible (the original stepped one by one); delegation and compression (weight, cache)
    too, each when left open (None). max_block_size bounds gbs x num_gpu_batches: the
    prompts one block holds, so the latency of a block. rerank_top > 0: the cost model's
    best few answers are simulated (sim/simulator.py: the engine's op stream, its
    dependencies and I/O workers, which the LP's per-window maxima only bound) and the best
    simulated one wins. micro_blocks > 1 plans one pipeline stage (spec: its layers), whose
    memory holds that many blocks' homes. compute_on_cpu: the engine will run on a CPU
    (Job.compute_on_cpu)."""
    profile.require_speeds()
    start, found, solved = time.perf_counter(), [], 0
    job = Job(spec, base or Policy(), schedule, profile, s, n, q, compute_on_cpu=compute_on_cpu)
    booleans = [(d, w, c) for d in _choices(delegation) for w in _choices(compress[0])
                for c in _choices(compress[1])]
    for delegate, weights, cache in booleans:
        fixed = dataclasses.replace(job.policy, cpu_delegation=delegate,
                                    compress_weight=weights, compress_cache=cache)
        sizes = [b for b in batch_sizes if not max_block_size or b <= max_block_size]
        solved = _batch_sizes(job.with_policy(fixed), sizes, max_gpu_batches, found, solved,
                              max_block_size, micro_blocks)
    if not found:
        return None
    found.sort(key=lambda c: c[1].generation_throughput, reverse=True)
    (policy, pred), simulated, lp_best = found[0], None, None
    if rerank_top > 0:
        policy, pred, simulated, lp_best = _rerank(job, found[:rerank_top])
    return Found(policy, schedule, pred,
                 peak_bytes(job.with_policy(homes(policy, micro_blocks)), profile.workers()),
                 solved, time.perf_counter() - start, simulated, lp_best)


RERANK_TOKENS = 8  # tokens the re-ranking simulates; later decode steps are extrapolated
RERANK_LAYERS = (4, 8)  # depths the re-ranking simulates; deeper models are extrapolated


def _rerank(job: Job, top: list) -> tuple:
    """The best simulated of the cost model's `top` answers (best first): its policy,
    prediction and simulated token/s, and the cost model's best with its two figures when
    that is another policy."""
    simulated = [extrapolated_throughput(job.with_policy(policy)) for policy, _ in top]
    k = max(range(len(top)), key=simulated.__getitem__)
    lp_best = None if k == 0 else (top[0][0], top[0][1].generation_throughput, simulated[0])
    return top[k][0], top[k][1], simulated[k], lp_best


def extrapolated_throughput(job: Job) -> float:
    """Token/s by the simulator over the first RERANK_TOKENS tokens, the decode time
    extrapolated to n tokens (a step's time grows only with the cache, by (n - 8) / s); a
    model deeper than RERANK_LAYERS[-1] is simulated at those two depths and its phase times
    extrapolated linearly in layers (decoder layers are alike: past the pipeline's start each
    adds the same time). One simulation of OPT-175B's 16 x 16 blocks over 32 tokens
    replays a quarter of a million ops in Python (seconds); this replays a fiftieth."""
    from flexgen_lab.sim.simulator import simulate

    spec, n = job.spec, job.gen_len
    horizon = min(n, RERANK_TOKENS)
    depths = RERANK_LAYERS if spec.num_layers > RERANK_LAYERS[-1] else (spec.num_layers,)
    phases = []
    for layers in depths:
        sim = simulate(job.replace(spec=dataclasses.replace(spec, num_layers=layers),
                                   gen_len=horizon, num_prompts=None))
        decode = sim.decode_s * (n - 1) / (horizon - 1) if horizon > 1 else 0.0
        phases.append((sim.prefill_s, decode))
    if len(phases) == 2:
        (p1, d1), (p2, d2) = phases
        share = (spec.num_layers - depths[0]) / (depths[1] - depths[0])
        phases = [(p1 + share * (p2 - p1), d1 + share * (d2 - d1))]
    prefill, decode = phases[0]
    return job.policy.block_size * n / (prefill + decode)


def _batch_sizes(job: Job, batch_sizes, max_gpu_batches, answers, solved, max_block_size,
                 micro_blocks=1):
    """The search over (gbs, num_gpu_batches) for fixed booleans: every answer goes in
    `answers` as (policy, prediction); returns the LPs solved so far."""
    for gbs in batch_sizes:
        previous = None
        limit = max_gpu_batches if not max_block_size else min(max_gpu_batches,
                                                               max_block_size // gbs)
        for ngb in _doubling(limit):
            candidate = dataclasses.replace(job.policy, gpu_batch_size=gbs, num_gpu_batches=ngb)
            found = solve(job.with_policy(candidate), micro_blocks)
            solved += 1
            if found is None:
                break
            pred = predict(job.with_policy(found))
            if previous is not None and pred.generation_throughput <= previous:
                break
            previous = pred.generation_throughput
            answers.append((found, pred))
        if previous is None and gbs > 1:
            break  # this batch size fits no placement: larger ones will not either
    return solved
