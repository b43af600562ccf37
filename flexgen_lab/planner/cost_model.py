"""Cost model: predicted prefill and decode time of a policy on a hardware profile.

Two variants:
- `predict` (variant "flexgen_lab"): I/O from `traffic.link_bytes`, which equals the engine's
  own byte counters; compute from per-step terms. With overlap each window of a phase (a
  part's compute and what loads beside it: the next part's weights, its cache and
  activations) takes the longest of its link times and its compute (links are separate
  queues), and the phase their sum; without overlap everything adds up.
- `flexgen_original` (variant "flexgen-original", planner/original_cost_model.py): the
  formulas of FlexGen's experimental/cost_model.py (digest §7.3), for comparison.

Paper symbols -> ours: wg, wc, wd -> policy.weights.gpu/cpu/disk; cg, cc, cd -> policy.cache.*;
hg, hc, hd -> policy.activations.*; gbs -> gpu_batch_size; bls -> block_size; s -> prompt_len;
n -> gen_len; l -> num_layers; h1 -> hidden; h2 -> ffn; nh -> num_heads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from flexgen_lab.engine.placement import split_units
from flexgen_lab.engine.policy import Policy
from flexgen_lab.engine.transfer import LINKS
from flexgen_lab.hardware.op_table import OpTable
from flexgen_lab.hardware.profile import HardwareProfile
from flexgen_lab.models.spec import ModelSpec
from flexgen_lab.models.weights import loaded_shapes
from flexgen_lab.planner.job import Job
from flexgen_lab.planner.traffic import WINDOWS, window_bytes

VARIANTS = ("flexgen_lab", "flexgen-original")


@dataclass
class Prediction:
    prefill_s: float
    decode_s: float
    num_prompts: int
    gen_len: int
    terms: dict[str, dict[str, float]] = field(default_factory=dict)  # phase -> term -> s

    @property
    def generation_throughput(self) -> float:
        """The paper's metric: prompts x gen_len / (prefill + decode), token/s."""
        return self.num_prompts * self.gen_len / (self.prefill_s + self.decode_s)


# --- variant "flexgen_lab" -----------------------------------------------------------------

def link_rate(profile: HardwareProfile, link: str, phase: str) -> float:
    """Bytes/s of a link in a phase (the cache/activation split of gpu->cpu and cpu->disk uses
    the cache figure: it is the larger share in every FlexGen policy). The simulator uses this
    same function, so the two read one number per link."""
    if link == "cpu_to_gpu":
        return profile.bw_cpu_to_gpu
    if link == "gpu_to_cpu":
        return profile.bw_gpu_to_cpu_cache
    if link == "disk_to_cpu":
        return profile.bw_disk_to_cpu
    return (profile.bw_cpu_to_disk_cache_prefill if phase == "prefill"
            else profile.bw_cpu_to_disk_decode)


def link_seconds(moved: dict[str, int], profile: HardwareProfile, phase: str) -> dict:
    """Bytes per link over that link's bandwidth."""
    return {link: nbytes / link_rate(profile, link, phase) for link, nbytes in moved.items()}


def layer_matmul_flops(spec: ModelSpec, tokens: int) -> float:
    """2 x tokens x the decoder layer's matrix parameters (projections and MLP)."""
    params = sum(s[0] * s[1] for s in spec.layer_param_shapes().values() if len(s) == 2)
    return 2.0 * tokens * params


def attention_flops(spec: ModelSpec, queries: int, keys: float) -> float:
    """q.k^T and p.v: 4 x queries x keys x q_dim per layer (all heads)."""
    return 4.0 * queries * keys * spec.q_dim


def matrix_bytes(spec: ModelSpec, part: str, dtype_bytes: int) -> int:
    """Bytes of a part's matrices in the compute dtype (what dequantisation writes and a
    decode step streams from device memory); the head of a tied model reuses the embedding."""
    return dtype_bytes * sum(math.prod(s) for s in loaded_shapes(spec, part).values()
                             if len(s) == 2)


def step_seconds(spec: ModelSpec, policy: Policy, profile: HardwareProfile, part: str,
                 rows: int, tokens: int, keys: float, cpu_rows: float, phase: str,
                 dtype_bytes: int, dequant_weights: bool = True) -> dict[str, float]:
    """One compute step: part (embed, layer, head) for `rows` sequences of `tokens` queries
    each over `keys` keys, `cpu_rows` of them with delegated attention. Terms in seconds:

    matmul    = the operator table's time for the part at rows x tokens (table_terms), or
                2 tokens rows params / mm_flops; in decode at least matrix bytes / gpu_mem_bw
    attention = the table's, or (rows - cpu_rows) 4 tokens keys q_dim / bmm_flops (half of
                it in prefill: causal)
    cpu_attention = cpu_rows 4 keys q_dim / (cpu_flops x correction(gbs, hidden))
    dequant   = dequant_seconds: the table's times where it has them, else
                [matrix bytes (compressed weights, unless dequant_weights is false: the
                engine dequantises a part once per (token, layer), so in zig-zag only a
                block's first GPU batch pays it) + 2 rows (keys - 1) kv_dim dtype_bytes
                (compressed cache, decode) + 2 rows tokens kv_dim dtype_bytes (compressed
                cache: quantising what the step stores)] / dequant_rate
    overhead  = step_overhead_s (launches and bookkeeping per step)
    Every term is (piecewise) linear in keys and cpu_rows, so a sum of steps is about one
    call at the mean.
    """
    out = {"matmul": 0.0, "attention": 0.0, "cpu_attention": 0.0, "dequant": 0.0,
           "overhead": profile.step_overhead_s or 0.0}
    table = profile.op_table(spec, dtype_bytes)
    if table is not None:
        out.update(table_terms(table, part, rows, tokens, keys, cpu_rows, phase,
                               policy.compress_cache))
    else:
        out.update(flop_terms(spec, profile, part, rows, tokens, keys, cpu_rows, phase,
                              dtype_bytes))
    if cpu_rows and part == "layer":
        cpu = profile.cpu_flops_for(policy.gpu_batch_size, spec.hidden)
        out["cpu_attention"] = cpu_rows * attention_flops(spec, 1, keys) / cpu
    out["dequant"] = dequant_seconds(spec, policy, profile, table, part, rows, tokens, keys,
                                     phase, dtype_bytes, dequant_weights)
    return out


def dequant_seconds(spec: ModelSpec, policy: Policy, profile: HardwareProfile,
                    table: OpTable | None, part: str, rows: int, tokens: int, keys: float,
                    phase: str, dtype_bytes: int, dequant_weights: bool) -> float:
    """Dequantising a part's compressed weights and, in decode, a layer's compressed past
    keys and values, and quantising the keys and values a layer stores (rows x tokens):
    the operator table's times at the model's shapes where it has them, else bytes
    (un)packed / the profile's dequant_rate (0 without one)."""
    weights = policy.compress_weight and dequant_weights
    cache = policy.compress_cache and part == "layer"
    past = cache and phase == "decode"
    if table is not None and table.has(f"dequant_{part}"):
        return ((table.seconds(f"dequant_{part}", 1) if weights else 0.0)
                + (table.seconds("dequant_cache", rows * (keys - 1)) if past else 0.0)
                + (quant_cache_seconds(table, profile, spec, rows * tokens, dtype_bytes)
                   if cache else 0.0))
    if not profile.dequant_rate:
        return 0.0
    unpacked = matrix_bytes(spec, part, dtype_bytes) if weights else 0
    cache_rows = rows * ((keys - 1 if past else 0) + (tokens if cache else 0))
    return (unpacked + 2 * cache_rows * spec.kv_dim * dtype_bytes) / profile.dequant_rate


def quant_cache_seconds(table: OpTable, profile: HardwareProfile, spec: ModelSpec,
                        token_rows: int, dtype_bytes: int) -> float:
    """Quantising a step's stored keys and values: the table's time, or for a table stored
    before it had the op, their bytes / dequant_rate."""
    if table.has("quant_cache"):
        return table.seconds("quant_cache", token_rows)
    stored = 2 * token_rows * spec.kv_dim * dtype_bytes
    return stored / profile.dequant_rate if profile.dequant_rate else 0.0


def table_terms(table: OpTable, part: str, rows: int, tokens: int, keys: float,
                cpu_rows: float, phase: str, compressed_cache: bool = False) -> dict[str, float]:
    """matmul and attention seconds looked up in the profile's operator table (measured at
    this model's shapes; hardware/op_table.py): the part's dense operators on rows x tokens
    token rows (the head on the last position only), attention on its batch x keys (decode)
    or batch x prompt x prompt (prefill) over the sequences not delegated. A compressed cache
    is attended in the dtype it decodes into, where the table has that time."""
    if part != "layer":
        return {"matmul": table.seconds(part, rows if part == "head" else rows * tokens)}
    decode = ("attention_decode_decoded" if compressed_cache
              and table.has("attention_decode_decoded") else "attention_decode")
    attention = (table.seconds("attention_prefill", rows * tokens * keys) if phase == "prefill"
                 else table.seconds(decode, (rows - cpu_rows) * keys))
    return {"matmul": table.seconds("dense", rows * tokens), "attention": attention}


def flop_terms(spec: ModelSpec, profile: HardwareProfile, part: str, rows: int, tokens: int,
               keys: float, cpu_rows: float, phase: str, dtype_bytes: int) -> dict[str, float]:
    """matmul and attention seconds from the profile's FLOP rates (profiles without an
    operator table for this model, such as the paper's T4)."""
    out = {"matmul": 0.0, "attention": 0.0}
    mm = profile.mm_flops_prefill if phase == "prefill" else profile.mm_flops_decode
    if part == "head":
        out["matmul"] = 2.0 * rows * spec.hidden * spec.vocab / mm  # the last position only
    elif part == "layer":
        out["matmul"] = layer_matmul_flops(spec, rows * tokens) / mm
        bmm = profile.bmm_flops_prefill if phase == "prefill" else profile.bmm_flops_decode
        causal = 0.5 if phase == "prefill" else 1.0
        out["attention"] = (rows - cpu_rows) * attention_flops(spec, tokens, keys) * causal / bmm
    if phase == "decode" and profile.gpu_mem_bw and part != "embed":
        out["matmul"] = max(out["matmul"], matrix_bytes(spec, part, dtype_bytes)
                            / profile.gpu_mem_bw)
    return out


def delegated_rows(policy: Policy) -> float:
    """Mean sequences per GPU batch whose cache is off the gpu tier (the engine's exact split),
    when attention over them is delegated to the CPU; 0 otherwise."""
    if not policy.cpu_delegation:
        return 0.0
    split = split_units(policy.block_size, policy.cache)
    return (policy.block_size - split.gpu) / policy.num_gpu_batches


TERMS = ("matmul", "attention", "cpu_attention", "dequant", "overhead", "contention")


def window_compute_seconds(job: Job) -> dict[str, dict[str, dict[str, float]]]:
    """Compute time per phase, window (traffic.WINDOWS) and term: every step of the grid,
    summed (step_seconds); decoder layers 1..L-1 are the "layer" window, layer L "last".
    Compressed weights are dequantised once per block per (token, part) in zig-zag, once per
    GPU batch in row-by-row, as the engine does."""
    spec, policy, s, n = job.spec, job.policy, job.prompt_len, job.gen_len
    batches = job.prompts // policy.gpu_batch_size
    dequantising = job.blocks if job.schedule == "zigzag" else batches
    b = policy.gpu_batch_size
    phases = {"prefill": (1, s, s, 0.0),  # (token steps, t, keys, cpu rows)
              "decode": (n - 1, 1, s + n / 2, delegated_rows(policy))}
    windows = (("embed", "embed", int(job.ends[0])), ("layer", "layer", spec.num_layers - 1),
               ("last", "layer", 1), ("head", "head", int(job.ends[1])))  # a stage's ends
    out = {}
    for phase, (token_steps, t, keys, cpu_rows) in phases.items():
        out[phase] = {}
        for window, part, count in windows:
            args = (spec, policy, job.profile, part, b, t, keys, cpu_rows, phase,
                    job.dtype_bytes)
            first, rest = step_seconds(*args), step_seconds(*args, dequant_weights=False)
            out[phase][window] = {
                term: token_steps * count * (dequantising * first[term]
                                             + (batches - dequantising) * rest[term])
                for term in first}
    return out


def predict(job: Job) -> Prediction:
    """Prefill and decode seconds of the job's prompts (one block by default).

    With overlap a phase takes, window by window (traffic.window_bytes: the next part's
    weights load while a part computes; a link's time is its bytes over its bandwidth plus
    its copies times the profile's per-copy latency), the longest of the window's link times,
    its compute,
    its transfers shared among the engine's I/O workers (profile.workers(); each load or
    store holds one worker across all its links), and each batch's chain of compute ->
    activations home -> back, which only the other GPU batches' compute can hide
    (n = num_gpu_batches in zig-zag, 1 in row-by-row), summed over windows:
    T = sum_w max(copy_w, (compute_w + hidden round trip_w) / n, compute_w)
              + overlap_contention x min(copy_w, compute_w),
    copy_w = max(link_w,1 .. link_w,4, sum(link_w) / workers): the second line is what
    copies and compute running side by side cost each other (0 on a GPU; about 1 on a CPU,
    whose copies and compute share cores and memory, measured by calibrate).
    Without overlap it is the sum of everything. A pipeline stage's job has a spec with its
    own decoder layers and `ends` (traffic.window_bytes; planner/pipeline.py)."""
    profile, policy = job.profile, job.policy
    profile.require_speeds()
    others = window_bytes(job, kinds=("weights", "cache"))
    hidden = window_bytes(job, kinds=("activations",))
    compute = window_compute_seconds(job)
    latency = copy_latency_seconds(job)
    times, terms = {}, {}
    for phase in ("prefill", "decode"):
        times[phase], terms[phase] = 0.0, dict.fromkeys((*LINKS, *TERMS), 0.0)
        for window in WINDOWS:
            own = link_seconds(hidden[phase][window], profile, phase)
            io = {link: seconds + own[link] + latency[phase][window][link] for link, seconds
                  in link_seconds(others[phase][window], profile, phase).items()}
            work = sum(compute[phase][window].values())
            for term, seconds in (*io.items(), *compute[phase][window].items()):
                terms[phase][term] += seconds
            round_trip = sum(own.values())
            if not policy.overlap:
                times[phase] += sum(io.values()) + work
                continue
            copying = max(*io.values(), sum(io.values()) / profile.workers())
            contention = profile.overlap_contention * min(copying, work)
            terms[phase]["contention"] += contention
            times[phase] += max(copying, (work + round_trip) / interleaved(policy, job.schedule),
                                work) + contention
    return Prediction(times["prefill"], times["decode"], job.prompts, job.gen_len, terms)


def copy_latency_seconds(job: Job) -> dict[str, dict[str, dict]]:
    """Seconds the copies of each window cost beyond bytes / bandwidth: copies per link
    (traffic.window_bytes with requests=True) x the profile's per-copy latency."""
    if not job.profile.io_latency_s:
        return {phase: {w: dict.fromkeys(LINKS, 0.0) for w in WINDOWS}
                for phase in ("prefill", "decode")}
    copies = window_bytes(job, requests=True)
    return {phase: {w: {link: n * job.profile.latency(link) for link, n in links.items()}
                    for w, links in windows.items()} for phase, windows in copies.items()}


def interleaved(policy: Policy, schedule: str) -> int:
    """GPU batches whose steps run between a batch's step and its next one (zig-zag), so its
    activations' way home and back can hide behind their compute; 1 in row-by-row."""
    return policy.num_gpu_batches if schedule == "zigzag" else 1
