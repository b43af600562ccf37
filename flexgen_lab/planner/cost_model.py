"""Cost model: predicted prefill and decode time of a policy on a hardware profile.

Two variants:
- `predict` (variant "flexgen_lab"): I/O from `traffic.link_bytes`, which equals the engine's
  own byte counters; compute from FLOPs. Each phase takes, with overlap, the longest of its
  link times and its compute time (links are separate queues), without overlap their sum.
- `flexgen_original` (variant "flexgen-original"): the formulas of FlexGen's
  experimental/cost_model.py (digest §7.3), one function per term, for comparison.

Paper symbols -> ours: wg, wc, wd -> policy.weights.gpu/cpu/disk; cg, cc, cd -> policy.cache.*;
hg, hc, hd -> policy.activations.*; gbs -> gpu_batch_size; bls -> block_size; s -> prompt_len;
n -> gen_len; l -> num_layers; h1 -> hidden; h2 -> ffn; nh -> num_heads.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from flexgen_lab.engine.policy import Policy
from flexgen_lab.hardware.profile import HardwareProfile
from flexgen_lab.models.spec import ModelSpec
from flexgen_lab.planner.traffic import link_bytes

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

def link_seconds(moved: dict[str, int], profile: HardwareProfile, phase: str) -> dict:
    """Bytes per link over that link's bandwidth (the cache/activation split of gpu->cpu and
    cpu->disk uses the cache figure: it is the larger share in every FlexGen policy)."""
    disk_write = (profile.bw_cpu_to_disk_cache_prefill if phase == "prefill"
                  else profile.bw_cpu_to_disk_decode)
    return {"cpu_to_gpu": moved["cpu_to_gpu"] / profile.bw_cpu_to_gpu,
            "gpu_to_cpu": moved["gpu_to_cpu"] / profile.bw_gpu_to_cpu_cache,
            "disk_to_cpu": moved["disk_to_cpu"] / profile.bw_disk_to_cpu,
            "cpu_to_disk": moved["cpu_to_disk"] / disk_write}


def layer_matmul_flops(spec: ModelSpec, tokens: int) -> float:
    """2 x tokens x the decoder layer's matrix parameters (projections and MLP)."""
    params = sum(s[0] * s[1] for s in spec.layer_param_shapes().values() if len(s) == 2)
    return 2.0 * tokens * params


def attention_flops(spec: ModelSpec, queries: int, keys: int) -> float:
    """q.k^T and p.v: 4 x queries x keys x q_dim per layer (all heads)."""
    return 4.0 * queries * keys * spec.q_dim


def compute_seconds(spec: ModelSpec, policy: Policy, profile: HardwareProfile, prompt_len: int,
                    gen_len: int, num_prompts: int,
                    dtype_bytes: int = 2) -> dict[str, dict[str, float]]:
    """Matmul and attention time per phase, all layers; delegated attention on the CPU."""
    L = spec.num_layers
    head = 2.0 * num_prompts * spec.hidden * spec.vocab  # logits of the last position
    prefill = (L * (layer_matmul_flops(spec, num_prompts * prompt_len)) + head)
    out = {"prefill": {"matmul": prefill / profile.mm_flops_prefill,
                       "attention": L * num_prompts * attention_flops(spec, prompt_len,
                                                                      prompt_len) / 2
                       / profile.bmm_flops_prefill}}  # causal: half the square
    off_gpu = 1.0 - policy.cache.gpu if policy.cpu_delegation else 0.0
    keys = sum(prompt_len + i for i in range(gen_len - 1))  # summed over decode steps
    attn = L * num_prompts * attention_flops(spec, 1, keys)
    cpu = profile.cpu_flops_for(policy.gpu_batch_size, spec.hidden)
    matmul = (gen_len - 1) * (L * layer_matmul_flops(spec, num_prompts) + head)
    matmul /= profile.mm_flops_decode
    if profile.gpu_mem_bw:  # decode streams every weight from device memory once a step
        steps = (gen_len - 1) * num_prompts // policy.gpu_batch_size
        matmul = max(matmul, steps * spec.weight_bytes(dtype_bytes) / profile.gpu_mem_bw)
    out["prefill"]["dequant"] = dequant_seconds(spec, policy, profile, prompt_len, 1, dtype_bytes)
    out["decode"] = {
        "dequant": dequant_seconds(spec, policy, profile, prompt_len, gen_len, dtype_bytes)
        - out["prefill"]["dequant"],
        "matmul": matmul,
        "attention": attn * (1 - off_gpu) / profile.bmm_flops_decode,
        "cpu_attention": attn * off_gpu / cpu}
    return out


def dequant_seconds(spec: ModelSpec, policy: Policy, profile: HardwareProfile, prompt_len: int,
                    tokens: int, dtype_bytes: int) -> float:
    """Unpacking compressed weights and cache over the first `tokens` token steps.

    Weights: every compute step (token, part, GPU batch) dequantises its part's weights
    (as the original, once per GPU batch): tokens x num_gpu_batches x weight bytes.
    Cache: each decode step dequantises the past rows it reads: 2 x L x prompts x p x kv_dim.
    Divided by the profile's dequant_rate (output bytes/s); 0 when the profile has none.
    """
    if not profile.dequant_rate:
        return 0.0
    out = 0.0
    if policy.compress_weight:
        out += tokens * policy.num_gpu_batches * spec.weight_bytes(dtype_bytes)
    if policy.compress_cache:
        past = sum(prompt_len + i - 1 for i in range(1, tokens))
        out += 2 * spec.num_layers * policy.block_size * past * spec.kv_dim * dtype_bytes
    return out / profile.dequant_rate


def predict(spec: ModelSpec, policy: Policy, schedule: str, profile: HardwareProfile,
            prompt_len: int, gen_len: int, dtype_bytes: int = 2,
            num_prompts: int | None = None) -> Prediction:
    """Prefill and decode seconds of num_prompts prompts (one block by default)."""
    profile.require_speeds()
    num_prompts = num_prompts or policy.block_size
    blocks = num_prompts // policy.block_size
    moved = link_bytes(spec, policy, schedule, prompt_len, gen_len, dtype_bytes, blocks)
    compute = compute_seconds(spec, policy, profile, prompt_len, gen_len, num_prompts,
                              dtype_bytes)
    times, terms = {}, {}
    for phase in ("prefill", "decode"):
        io = link_seconds(moved[phase], profile, phase)
        compute_s = sum(compute[phase].values())
        terms[phase] = {**io, **compute[phase]}
        times[phase] = (max(*io.values(), compute_s) if policy.overlap
                        else sum(io.values()) + compute_s)
    return Prediction(times["prefill"], times["decode"], num_prompts, gen_len, terms)


# --- variant "flexgen-original" (digest §7.3; the code's version of the LP) -----------------

def _shape(spec: ModelSpec):
    return spec.num_layers, spec.hidden, spec.ffn


def weight_bytes_per_layer(spec: ModelSpec) -> float:
    """wi = 8 h1^2 + 4 h1 h2: fp16 bytes of one layer's matrices, biases left out."""
    _, h1, h2 = _shape(spec)
    return 8 * h1**2 + 4 * h1 * h2


def prefill_terms(spec, p: Policy, hw: HardwareProfile, s: int) -> dict[str, float]:
    """ctogp, gtocp, dtocp, ctodp, compp: per-layer prefill seconds of each term.

    ctogp = [wi (wc + wd) + 2 s h1 bls (hc + hd)] / ctog_bdw
    gtocp = 4 (s + 1) h1 bls (cc + cd) / gtoc_bdw_cache + 2 s h1 bls (hc + hd) / gtoc_bdw_hidden
    dtocp = [wi wd + 2 s h1 bls hd] / dtoc_bdw
    ctodp = 4 bls (s + 1) h1 cd / ctod_bdw_cache_p + 2 s h1 bls hd / ctod_bdw_hidden_p
    compp = bls (8 s h1^2 + 4 s h1 h2) / mm_flops_p + 4 bls s^2 h1 / bmm_flops_p
    """
    _, h1, h2 = _shape(spec)
    w, c, a, bls = p.weights, p.cache, p.activations, p.block_size
    wi = weight_bytes_per_layer(spec)
    return {
        "ctog": (wi * (w.cpu + w.disk) + 2 * s * h1 * bls * (a.cpu + a.disk)) / hw.bw_cpu_to_gpu,
        "gtoc": (4 * (s + 1) * h1 * bls * (c.cpu + c.disk) / hw.bw_gpu_to_cpu_cache
                 + 2 * s * h1 * bls * (a.cpu + a.disk) / hw.bw_gpu_to_cpu_hidden),
        "dtoc": (wi * w.disk + 2 * s * h1 * bls * a.disk) / hw.bw_disk_to_cpu,
        "ctod": (4 * bls * (s + 1) * h1 * c.disk / hw.bw_cpu_to_disk_cache_prefill
                 + 2 * s * h1 * bls * a.disk / hw.bw_cpu_to_disk_hidden_prefill),
        "comp": (bls * (8 * s * h1**2 + 4 * s * h1 * h2) / hw.mm_flops_prefill
                 + 4 * bls * s**2 * h1 / hw.bmm_flops_prefill),
    }


def decode_terms(spec, p: Policy, hw: HardwareProfile, s: int, n: int) -> dict[str, float]:
    """ctogg, gtocg, dtocg, ctodg, compg: per-layer seconds of one decode step.

    ctogg = [wi (wc + wd) + 2 h1 bls (hc + hd)] / ctog_bdw
    gtocg = 2 h1 bls (hc + hd) / gtoc_bdw_hidden
    dtocg = [4 bls (s + n/2) h1 cd + 2 h1 bls hd] / dtoc_bdw + wi wd / (0.95 dtoc_bdw)
    ctodg = [4 bls h1 cd + 2 h1 bls hd] / ctod_bdw_g
    compg = bls (8 h1^2 + 4 h1 h2) / mm_flops_g + 4 bls (s + n/2) h1 cg / bmm_flops_g
            + 4 bls (s + n/2) h1 (cc + cd) / cpu_flops_real   (delegation always assumed)
    """
    _, h1, h2 = _shape(spec)
    w, c, a, bls = p.weights, p.cache, p.activations, p.block_size
    wi, ctx = weight_bytes_per_layer(spec), s + n / 2
    cpu = hw.cpu_flops_for(p.gpu_batch_size, h1)
    return {
        "ctog": (wi * (w.cpu + w.disk) + 2 * h1 * bls * (a.cpu + a.disk)) / hw.bw_cpu_to_gpu,
        "gtoc": 2 * h1 * bls * (a.cpu + a.disk) / hw.bw_gpu_to_cpu_hidden,
        "dtoc": ((4 * bls * ctx * h1 * c.disk + 2 * h1 * bls * a.disk) / hw.bw_disk_to_cpu
                 + wi * w.disk / (0.95 * hw.bw_disk_to_cpu)),
        "ctod": (4 * bls * h1 * c.disk + 2 * h1 * bls * a.disk) / hw.bw_cpu_to_disk_decode,
        "comp": (bls * (8 * h1**2 + 4 * h1 * h2) / hw.mm_flops_decode
                 + 4 * bls * ctx * h1 * c.gpu / hw.bmm_flops_decode
                 + 4 * bls * ctx * h1 * (c.cpu + c.disk) / cpu),
    }


def flexgen_original(spec: ModelSpec, policy: Policy, profile: HardwareProfile, prompt_len: int,
                     gen_len: int) -> Prediction:
    """The original's time for one block: Tpre >= ctogp + dtocp, gtocp + ctodp, compp;
    Tgen >= ctogg + each of gtocg, dtocg, ctodg, compg (its read chain is serial, and CPU->GPU
    is outside the max in decode); T = Tpre l + Tgen (n - 1) l."""
    profile.require_speeds()
    pre = prefill_terms(spec, policy, profile, prompt_len)
    gen = decode_terms(spec, policy, profile, prompt_len, gen_len)
    t_pre = max(pre["ctog"] + pre["dtoc"], pre["gtoc"] + pre["ctod"], pre["comp"])
    t_gen = gen["ctog"] + max(gen["gtoc"], gen["dtoc"], gen["ctod"], gen["comp"])
    layers = spec.num_layers
    return Prediction(t_pre * layers, t_gen * (gen_len - 1) * layers, policy.block_size,
                      gen_len, {"prefill": pre, "decode": gen})
