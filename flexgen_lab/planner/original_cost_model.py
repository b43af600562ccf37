"""The original's cost model, variant "flexgen-original": the formulas of FlexGen's
experimental/cost_model.py (digest §7.3; the code's version of the LP), one function per
term, kept for comparison with ours (planner/cost_model.py).

Paper symbols: wg, wc, wd -> policy.weights.gpu/cpu/disk; cg, cc, cd -> policy.cache.*;
hg, hc, hd -> policy.activations.*; gbs -> gpu_batch_size; bls -> block_size; s -> prompt_len;
n -> gen_len; l -> num_layers; h1 -> hidden; h2 -> ffn; nh -> num_heads.
"""

from __future__ import annotations

from flexgen_lab.engine.policy import Policy
from flexgen_lab.hardware.profile import HardwareProfile
from flexgen_lab.models.spec import ModelSpec
from flexgen_lab.planner.cost_model import Prediction
from flexgen_lab.planner.job import Job


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


def flexgen_original(job: Job) -> Prediction:
    """The original's time for one block: Tpre >= ctogp + dtocp, gtocp + ctodp, compp;
    Tgen >= ctogg + each of gtocg, dtocg, ctodg, compg (its read chain is serial, and CPU->GPU
    is outside the max in decode); T = Tpre l + Tgen (n - 1) l."""
    spec, policy, profile, gen_len = job.spec, job.policy, job.profile, job.gen_len
    profile.require_speeds()
    pre = prefill_terms(spec, policy, profile, job.prompt_len)
    gen = decode_terms(spec, policy, profile, job.prompt_len, gen_len)
    t_pre = max(pre["ctog"] + pre["dtoc"], pre["gtoc"] + pre["ctod"], pre["comp"])
    t_gen = gen["ctog"] + max(gen["gtoc"], gen["dtoc"], gen["ctod"], gen["comp"])
    layers = spec.num_layers
    return Prediction(t_pre * layers, t_gen * (gen_len - 1) * layers, policy.block_size,
                      gen_len, {"prefill": pre, "decode": gen})


def flexgen_original_memory(spec: ModelSpec, p: Policy, s: int, n: int) -> dict[str, dict]:
    """The original's memory constraints (digest §7.3), fp16 bytes, each term by name:
    constraint -> {term: bytes}; each constraint's sum must stay under capacity x 0.8.

    gpu prefill = home (wi l wg + 2 s h1 bls hg + 4 (s + n) h1 bls l cg)
                  + double-buffered weights 2 wi (1 - wg) + activations 2 s h1 gbs (1 - hg)
                  + interp (a SUM of every prefill intermediate; the paper says a max)
    gpu decode  = home (decode form) + 2 wi (1 - wg) + 2 h1 gbs (1 - hg)
                  + 4 gbs (s + n) h1 cg + interg
    cpu prefill = wi l wc + 2 s h1 bls hc + 4 s h1 bls l cc + wi (1 - wg) + 2 s h1 gbs (1 - hg)
    cpu decode  = wi l wc + 2 h1 bls hc + 4 (s + n) h1 bls l cc + wi wd + 4 h1 gbs hd
                  + 8 (s + n) h1 gbs cd + 2 nh (s + n) gbs + 2 h1 gbs
    disk        = wi l wd + 2 s h1 bls hd + 4 (s + n) h1 bls l cd
    """
    layers, h1, h2 = _shape(spec)
    nh, gbs, bls = spec.num_heads, p.gpu_batch_size, p.block_size
    w, c, a, wi, sn = p.weights, p.cache, p.activations, weight_bytes_per_layer(spec), s + n
    interp = (8 * gbs * s * h1 + gbs * (2 * s * h1 + 2 * nh * s**2) + 2 * gbs * s * h1
              + 4 * gbs * s * h1 + 2 * gbs * s * h2 + 2 * gbs * s * h1)
    interg = (8 * gbs * h1 + gbs * (2 * h1 + 2 * sn * h1 + 2 * nh * sn) * c.gpu
              + gbs * (2 * sn * h1 + 2 * h1) * c.gpu + 4 * gbs * h1 + 2 * gbs * h2
              + 2 * gbs * h1)
    return {
        "gpu prefill": {"weights home": wi * layers * w.gpu,
                        "activations home": 2 * s * h1 * bls * a.gpu,
                        "cache home": 4 * sn * h1 * bls * layers * c.gpu,
                        "weight double buffer": 2 * wi * (1 - w.gpu),
                        "activation buffer": 2 * s * h1 * gbs * (1 - a.gpu),
                        "intermediates (sum)": interp},
        "gpu decode": {"weights home": wi * layers * w.gpu,
                       "activations home": 2 * h1 * bls * a.gpu,
                       "cache home": 4 * sn * h1 * bls * layers * c.gpu,
                       "weight double buffer": 2 * wi * (1 - w.gpu),
                       "activation buffer": 2 * h1 * gbs * (1 - a.gpu),
                       "cache buffer": 4 * gbs * sn * h1 * c.gpu,
                       "intermediates (sum)": interg},
        "cpu prefill": {"weights home": wi * layers * w.cpu,
                        "activations home": 2 * s * h1 * bls * a.cpu,
                        "cache home": 4 * s * h1 * bls * layers * c.cpu,
                        "weight buffer": wi * (1 - w.gpu),
                        "activation buffer": 2 * s * h1 * gbs * (1 - a.gpu)},
        "cpu decode": {"weights home": wi * layers * w.cpu,
                       "activations home": 2 * h1 * bls * a.cpu,
                       "cache home": 4 * sn * h1 * bls * layers * c.cpu,
                       "weight buffer": wi * w.disk, "activation buffer": 4 * h1 * gbs * a.disk,
                       "cache buffer": 8 * sn * h1 * gbs * c.disk,
                       "attention buffer": 2 * nh * sn * gbs + 2 * h1 * gbs},
        "disk": {"weights home": wi * layers * w.disk,
                 "activations home": 2 * s * h1 * bls * a.disk,
                 "cache home": 4 * sn * h1 * bls * layers * c.disk},
    }
