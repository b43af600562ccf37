"""Group-wise asymmetric min/max quantisation (FlexGen §5.1): weights and KV cache at 4 or 8 bits.

Elements are cut into groups of g consecutive values along one axis (`group_dim`); each group keeps
its own min and scale, so one outlier only coarsens its own group. Weights (out, in) group along
the output channel (group_dim=0); cache rows (b, heads, s, head_dim) group along head_dim
(group_dim=-1), so every token row compresses on its own and a decode step quantizes just its row.

Names used below: n = length of the group axis, g = group_size, G = ceil(n / g) groups,
q_max = 2**bits - 1 (the largest code).

Storage layout of `Compressed` for an input of shape (*pre, n, *post), pre/post = the axes before
and after the group axis:
    data       uint8   (*pre, G * g * bits // 8, *post)   codes, packed along the group axis;
               at 4 bits bytes hold element pairs (2t, 2t + 1): element 2t in the high nibble,
               element 2t + 1 in the low nibble (FlexGen's order); at 8 bits one code per byte.
               Elements n..G*g-1 are padding (they repeat element n-1; dequantize drops them).
    scale_min  float16 (*pre, G, 2, *post)   [..., i, 0, ...] = scale, [..., i, 1, ...] = min
               of group i; x_hat = code / scale + min.
E.g. weight (out, in), group_dim=0: data (G*g/2, in), scale_min (G, 2, in); cache
(b, heads, s, d), group_dim=-1: data (b, heads, s, G*g/2), scale_min (b, heads, s, G, 2).
At 4 bits, g=64 that is 0.5 + 4/64 = 0.5625 byte per element, 28% of fp16.

    >>> c = quantize(torch.randn(100, 8), CompressionConfig(bits=4, group_size=64))
    >>> c.data.shape, c.scale_min.shape, dequantize(c).shape
    (torch.Size([64, 8]), torch.Size([2, 2, 8]), torch.Size([100, 8]))
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from flexgen_lab.units import ceil_div

ALLOWED_BITS = (4, 8)
# scale and min are stored in float16 (the byte models count them so, from shapes alone). Values
# saturate at +-FP16_MAX first, so every span is at most 2 * FP16_MAX and every scale at least
# q_max / (2 * FP16_MAX), a normal float16: none underflows to 0 (which decoded as 0 / 0 = NaN).
# Groups with a range below q_max / FP16_MAX (constant ones included) get scale FP16_MAX instead
# of inf, so their codes stay 0..q_max.
FP16_MAX = torch.finfo(torch.float16).max


@dataclass(frozen=True)
class CompressionConfig:
    """How to quantize one kind of tensor: code width, group length, the axis groups run along."""

    bits: int = 4
    group_size: int = 64
    group_dim: int = 0

    def __post_init__(self):
        if self.bits not in ALLOWED_BITS:
            raise ValueError(f"compress bits={self.bits!r} is not allowed; use one of "
                             f"{ALLOWED_BITS}")
        if (not isinstance(self.group_size, int) or self.group_size <= 0
                or self.group_size % 2):
            raise ValueError(f"compress group_size={self.group_size!r} is not allowed; use a "
                             "positive even integer (e.g. 64)")
        if not isinstance(self.group_dim, int):
            raise ValueError(f"compress group_dim={self.group_dim!r} is not allowed; use an "
                             "integer axis (negative counts from the end)")

    @property
    def q_max(self) -> int:
        return 2**self.bits - 1


@dataclass
class Compressed:
    """A quantized tensor as it lives at home: packed codes plus per-group [scale, min].

    See the module docstring for the exact layout of `data` and `scale_min`.
    """

    data: torch.Tensor  # uint8 codes, (*pre, G * g * bits // 8, *post)
    scale_min: torch.Tensor  # float16, (*pre, G, 2, *post)
    shape: tuple[int, ...]  # the original tensor's shape
    dtype: torch.dtype  # the original tensor's dtype
    config: CompressionConfig

    @property
    def nbytes(self) -> int:
        """Bytes held at home (codes + scales): what a copy between tiers moves."""
        return self.data.nbytes + self.scale_min.nbytes


def _axis(ndim: int, config: CompressionConfig) -> int:
    """config.group_dim as a non-negative axis of an ndim-d tensor."""
    if not -ndim <= config.group_dim < ndim:
        raise ValueError(f"compress group_dim={config.group_dim} is out of range for a "
                         f"{ndim}-d tensor; allowed: {-ndim}..{ndim - 1}")
    return config.group_dim % ndim


def compressed_nbytes(shape: tuple[int, ...] | torch.Size, config: CompressionConfig) -> int:
    """Bytes that quantize(x, config).nbytes will be for an x of `shape`, without quantizing.

    Per position off the group axis: G * g * bits / 8 code bytes + G * 2 float16 (scale, min).
    The engine sizes buffers and the cost model counts transfers with this.
    """
    ax = _axis(len(shape), config)
    n = shape[ax]
    num_groups = ceil_div(n, config.group_size)
    rest = math.prod(size for i, size in enumerate(shape) if i != ax)  # positions off the axis
    code_bytes = num_groups * config.group_size * config.bits // 8
    return rest * (code_bytes + num_groups * 2 * 2)


@torch.no_grad()
def quantize(x: torch.Tensor, config: CompressionConfig) -> Compressed:
    """Quantize x group-wise along config.group_dim; the result stays on x's device.

    code = clamp(round((x - min) * scale), 0, q_max), scale = q_max / (max - min), per group.
    Math runs in float32; min and scale are rounded to float16 *before* the codes are computed,
    so dequantize uses exactly the values the codes were made with. Error per element is then at
    most half a step, (max - min) / q_max / 2, plus float16 rounding of min and scale.
    Padding repeats the axis's last element, so it never widens the last group's range.
    The scale is rounded up to float16, so code / scale never overshoots the group's max and a
    float16 x decodes finite even at +-65504.
    Values beyond float16's range (|x| > 65504, inf) saturate at +-65504: the KV cache, quantized
    every step, relies on that (checking would cost a host sync per step). Weights go through
    `check_fp16_range` first, which refuses them instead. NaN stays NaN within its group.
    On a CPU, a tensor grouped along any axis but the first is quantized a few MB of rows at a
    time (the KV cache, written every step): the float32 passes then stay in cache.
    """
    ax = _axis(x.dim(), config)
    # rows (along axis 0, never the group axis) per pass: all on a GPU, ~_CODE_CHUNK elements here
    row = math.prod(x.shape[1:])
    step = x.shape[0] if x.is_cuda or ax == 0 else max(1, _CODE_CHUNK // max(1, row))
    if step >= x.shape[0]:
        return _quantize(x, config, ax)
    parts = [_quantize(x[start:start + step], config, ax) for start in range(0, x.shape[0], step)]
    return Compressed(torch.cat([p.data for p in parts]), torch.cat([p.scale_min for p in parts]),
                      tuple(x.shape), x.dtype, config)


def _quantize(x: torch.Tensor, config: CompressionConfig, ax: int) -> Compressed:
    """quantize() in one pass over x (ax: the group axis, non-negative)."""
    g, q_max = config.group_size, config.q_max
    n = x.shape[ax]
    num_groups = ceil_div(n, g)
    # saturate first (see the docstring): a copy, so x itself is never changed
    rows = x.detach().float().clamp(-FP16_MAX, FP16_MAX).movedim(ax, -1)  # (*pre, *post, n)
    lead = rows.shape[:-1]
    pad = num_groups * g - n
    if pad:
        rows = torch.cat([rows, rows[..., -1:].expand(*lead, pad)], dim=-1)
    groups = rows.reshape(*lead, num_groups, g)  # (*pre, *post, G, g)

    low = groups.amin(dim=-1).half()  # (*pre, *post, G)
    span = (groups.amax(dim=-1) - low.float()).clamp(min=0)
    # span 0 (constant group) gives inf, capped: codes become 0 and decode exactly to `low`.
    scale = _half_rounded_up((q_max / span).clamp(max=FP16_MAX))
    codes = ((groups - low.float()[..., None]) * scale.float()[..., None])
    codes = codes.round_().clamp_(0, q_max).to(torch.uint8)  # (*pre, *post, G, g)
    codes = codes.reshape(*lead, num_groups * g)
    if config.bits == 4:  # element 2t -> high nibble, 2t + 1 -> low nibble
        codes = (codes[..., 0::2] << 4) | codes[..., 1::2]  # (*pre, *post, G * g / 2)

    data = codes.movedim(-1, ax).contiguous()
    scale_min = torch.stack([scale, low], dim=-1)  # (*pre, *post, G, 2)
    scale_min = scale_min.movedim((-2, -1), (ax, ax + 1)).contiguous()  # (*pre, G, 2, *post)
    return Compressed(data, scale_min, tuple(x.shape), x.dtype, config)


def _half_rounded_up(x: torch.Tensor) -> torch.Tensor:
    """float32 x (positive, at most FP16_MAX) as the smallest float16 >= x."""
    rounded = x.half()
    up = torch.nextafter(rounded, torch.full_like(rounded, torch.inf))
    return torch.where(rounded.float() < x, up, rounded)


def check_fp16_range(x: torch.Tensor, name: str) -> None:
    """Refuse a tensor quantize would saturate (|x| > 65504, inf, NaN), naming it.

    For weights, quantized once at placement, where a clear error beats silently changed values.
    """
    if x.numel() == 0:
        return
    low, high = torch.aminmax(x.detach())  # no |x| copy of a whole weight; NaN if x holds one
    largest = max(-low.item(), high.item())
    if not largest <= FP16_MAX:  # NaN fails this too
        raise ValueError(f"compress: {name} holds |x| = {largest:.4g}, beyond float16's range "
                         f"(+-{FP16_MAX:.0f}), where compression keeps scale and minimum; run it "
                         "without weight compression (compress=none or compress=cache)")


@torch.no_grad()
def dequantize(c: Compressed, out: torch.Tensor | None = None) -> torch.Tensor:
    """x_hat = code / scale + min, in c.shape and c.dtype, on c.data's device.

    With `out` (same shape; c.dtype, or float32, the precision the math runs in), the result is
    written into it and `out` is returned, so the engine can reuse one buffer per layer. Math
    runs in float32, then casts to out's dtype (c.dtype without out).
    """
    if out is not None and (tuple(out.shape) != c.shape
                            or out.dtype not in (c.dtype, torch.float32)):
        raise ValueError(f"dequantize out has shape {tuple(out.shape)} and dtype {out.dtype}; "
                         f"expected {c.shape} and {c.dtype} or torch.float32")
    ax = _axis(len(c.shape), c.config)
    g, n, num_groups = c.config.group_size, c.shape[ax], c.scale_min.shape[ax]
    pre, post = math.prod(c.shape[:ax]), math.prod(c.shape[ax + 1:])
    result = out if out is not None and out.is_contiguous() else torch.empty(
        c.shape, dtype=c.dtype if out is None else out.dtype, device=c.data.device)
    if result.numel() == 0:
        return result
    # Work in the stored layout, (pre, G, g, post) with `post` contiguous (a transposed view made
    # every pass strided), as rows of k groups: one group per row, or a whole group axis per row
    # when its last group is padded, so each row's unpadded values are one contiguous run.
    k = num_groups if num_groups * g != n else 1
    rows = pre * num_groups // k
    data = c.data.reshape(rows, k, g * c.config.bits // 8, post)
    scale_min = c.scale_min.reshape(rows, k, 2, post)
    target = result.view(rows, -1)  # (rows, g * post), or (pre, n * post) when padded
    # On a CPU, decode a few MB at a time: the float32 intermediate then stays in cache (3-6x
    # faster than whole-tensor passes, measured); a GPU takes the whole tensor in one pass.
    step = rows if c.data.is_cuda else max(1, _DECODE_CHUNK // (k * g * post))
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        x_hat = _codes(data[start:stop], c.config.bits, g)  # (r, k, g, post) float32
        sm = scale_min[start:stop].float()
        x_hat.div_(sm[:, :, 0:1]).add_(sm[:, :, 1:2])
        target[start:stop].copy_(x_hat.view(stop - start, -1)[:, :target.shape[1]])
    return out.copy_(result) if out is not None and result is not out else result


# elements decoded per pass on a CPU: a 4 MB float32 intermediate, the fastest of 0.25-4 M
# elements for an 8192 x 2048 weight on this project's 2-core machine
_DECODE_CHUNK = 1 << 20
# elements quantized per pass on a CPU (the same reason: float32 passes that stay in cache)
_CODE_CHUNK = 1 << 20


def _codes(data: torch.Tensor, bits: int, g: int) -> torch.Tensor:
    """(r, k, g * bits / 8, post) stored bytes -> (r, k, g, post) float32 codes."""
    if bits == 8:
        return data.float()
    r, k, _, post = data.shape  # bytes hold pairs (2t, 2t + 1): 2t in the high nibble
    nibbles = torch.empty((r, k, g // 2, 2, post), dtype=torch.uint8, device=data.device)
    torch.bitwise_right_shift(data, 4, out=nibbles[:, :, :, 0])
    torch.bitwise_and(data, 0x0F, out=nibbles[:, :, :, 1])
    return nibbles.view(r, k, g, post).float()


def roundtrip(x: torch.Tensor, config: CompressionConfig) -> torch.Tensor:
    """dequantize(quantize(x)): the values a compressed run computes with (reference runs)."""
    return dequantize(quantize(x, config))
