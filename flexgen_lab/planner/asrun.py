"""What the original FlexGen really placed for a stated policy: its midpoint rule, reproduced.

The original (FlexLLMGen flex_opt.py, `init_weight_list`) never split a weight tensor. Each
layer object listed its tensors in a fixed order; a tensor's position was the midpoint of its
byte range in that list, as a percentage of the object's bytes; the first tier, in the order
disk, cpu, gpu, whose cumulative percentage exceeded the midpoint got the whole tensor. So
`--percent 20 80` put the out-projection of each attention block and the vectors on the gpu:
about 8 % of OPT-30B, not 20 % (facts §8, digest §2.2). The paper's presets
`paper-<model>-<s>[-c]` hold the stated fractions; `...-asrun` hold what this module computes,
and tests/planner/test_asrun.py recomputes every one of them.

    >>> as_run_weights(ModelSpec.from_name("opt-30b"), Placement(gpu=0.2, cpu=0.8))
    AsRun(gpu=0.0818..., cpu=0.9181..., disk=0.0)

Layer objects and tensor orders (the original's, read from its code at commit 004ffef):
  InputEmbed     token embedding (v, h), position embedding (max_positions + 2, h)
  SelfAttention  w_q, b_q, w_k, b_k, w_v, b_v, w_out, b_out, ln_w, ln_b   (one per layer)
  MLP            fc1 (4h, h), b1, fc2 (h, 4h), b2, ln_w, ln_b              (one per layer;
                 written with spec.ffn here, which is 4h for every OPT)
  OutputEmbed    final ln_w, ln_b, token embedding (v, h) again
`sep_layer` does not matter: a TransformerLayer places its attention and MLP parts apart too.

Assumptions, where the original leaves a choice:
- Shares are by bytes of the tensors the original allocated, so the tied token embedding
  counts twice (InputEmbed and OutputEmbed each held a copy; our engine stores the head's
  copy too). All tensors are fp16, so bytes and element counts give the same shares.
- Shares are of uncompressed (fp16) bytes. With weight compression the matrices shrink to
  ~28 % and the vectors do not, so a split placement's byte shares would move slightly; none
  of the paper's compressed policies splits its weights (they are all-gpu or all-cpu).
- Percentages are the stated fractions x 100 (the original's CLI took whole percents).
- Only OPT: the original ran nothing else.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from flexgen_lab.engine.policy import Placement, Policy
from flexgen_lab.models.opt import POSITION_OFFSET
from flexgen_lab.models.spec import ModelSpec

RULE_ORDER = ("disk", "cpu", "gpu")  # the order init_weight_list walks the tiers in


@dataclass(frozen=True)
class AsRun:
    """Achieved shares of one kind of tensor on each tier (they sum to 1)."""

    gpu: float
    cpu: float
    disk: float

    def placement(self) -> Placement:
        return Placement(gpu=self.gpu, cpu=self.cpu)


def layer_objects(spec: ModelSpec) -> list[list[tuple[str, int]]]:
    """The original's layer objects for `spec`, each a list of (tensor, elements) in its order."""
    if spec.family != "opt":
        raise ValueError(f"model family {spec.family!r}: the original ran OPT only")
    h, f, v = spec.hidden, spec.ffn, spec.vocab
    input_embed = [("embed_tokens", v * h), ("embed_positions", (spec.max_positions
                                                                 + POSITION_OFFSET) * h)]
    attention = [("w_q", h * h), ("b_q", h), ("w_k", h * h), ("b_k", h), ("w_v", h * h),
                 ("b_v", h), ("w_out", h * h), ("b_out", h), ("ln_w", h), ("ln_b", h)]
    mlp = [("fc1", f * h), ("b1", f), ("fc2", h * f), ("b2", h), ("ln_w", h), ("ln_b", h)]
    output_embed = [("ln_w", h), ("ln_b", h), ("embed_tokens", v * h)]
    return [input_embed, *[attention, mlp] * spec.num_layers, output_embed]


def midpoint_percents(sizes: Sequence[int]) -> list[float]:
    """Each tensor's midpoint as a percentage of the object's size, as init_weight_list
    computes it: (cumulative size up to and including it - half its size) / total x 100."""
    total, cumulative, out = sum(sizes), 0, []
    for size in sizes:
        cumulative += size
        out.append((cumulative - size / 2) / total * 100)
    return out


def rule_percents(placement: Placement) -> list[float]:
    """Cumulative bounds in RULE_ORDER: [disk, disk + cpu, 100] in percent."""
    gpu, cpu = round(placement.gpu * 100, 9), round(placement.cpu * 100, 9)
    disk = 100 - gpu - cpu
    return [disk, disk + cpu, disk + cpu + gpu]


def midpoint_homes(sizes: Sequence[int], placement: Placement) -> list[str]:
    """The tier each tensor of one layer object goes to (get_choice: the first tier whose
    cumulative bound exceeds the midpoint; the last tier if none does)."""
    bounds = rule_percents(placement)
    homes = []
    for mid in midpoint_percents(sizes):
        homes.append(next((tier for tier, bound in zip(RULE_ORDER, bounds, strict=True)
                           if mid < bound), RULE_ORDER[-1]))
    return homes


def as_run_weights(spec: ModelSpec, placement: Placement) -> AsRun:
    """Shares of the whole model's weight bytes the original put on each tier."""
    per_tier = dict.fromkeys(RULE_ORDER, 0)
    for tensors in layer_objects(spec):
        sizes = [size for _, size in tensors]
        for size, tier in zip(sizes, midpoint_homes(sizes, placement), strict=True):
            per_tier[tier] += size
    total = sum(per_tier.values())
    return AsRun(**{tier: count / total for tier, count in per_tier.items()})


def as_run_cache(placement: Placement, gpu_batch_size: int, num_heads: int) -> AsRun:
    """The original's KV-cache split (init_cache_one_gpu_batch): whole on one tier when one
    holds 100 %, else split along the (batch x heads) axis in whole sequences, each count
    rounded down (the cpu takes the remainder when there is no disk share, else the disk)."""
    shares = {"gpu": placement.gpu, "cpu": placement.cpu, "disk": placement.disk}
    for tier, share in shares.items():
        if share >= 1 - 1e-9:
            return AsRun(**{t: float(t == tier) for t in shares})
    rows = gpu_batch_size * num_heads
    gpu = int(rows * round(placement.gpu * 100, 9) / 100) // num_heads * num_heads
    if placement.disk <= 1e-9:
        cpu = rows - gpu
    else:
        cpu = int(rows * round(placement.cpu * 100, 9) / 100) // num_heads * num_heads
    return AsRun(gpu / rows, cpu / rows, (rows - gpu - cpu) / rows)


def as_run_activations(placement: Placement) -> AsRun:
    """The original kept activations wholly on one tier and refused any split."""
    shares = AsRun(placement.gpu, placement.cpu, placement.disk)
    if max(shares.gpu, shares.cpu, shares.disk) < 1 - 1e-9:
        raise ValueError(f"activations {shares}: the original kept activations on one tier "
                         "(NotImplementedError for a split)")
    return shares


def paper_pin_weight(spec: ModelSpec) -> bool:
    """`--pin-weight` as the paper's commands ran it (benchmark/flexllmgen/bench_suite.py):
    0 for every OPT-175B case, the default 1 for the others."""
    return spec.name != "opt-175b"


def as_run_policy(spec: ModelSpec, policy: Policy, pin_weight: bool | None = None) -> Policy:
    """`policy` with every placement as the original achieved it, and pinning as it ran
    (`pin_weight`; None keeps the policy's). Our pin_memory pins the whole cpu tier; the
    original pinned the weights per `--pin-weight` and never the KV cache."""
    pin = policy.pin_memory if pin_weight is None else pin_weight
    return dataclasses.replace(
        policy, weights=as_run_weights(spec, policy.weights).placement(),
        cache=as_run_cache(policy.cache, policy.gpu_batch_size, spec.num_heads).placement(),
        activations=as_run_activations(policy.activations).placement(), pin_memory=pin)
