"""Group-wise quantisation: error within half a step per group, exact sizes, FlexGen's layout."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flexgen_lab.engine import compress
from flexgen_lab.engine.cache_homes import cache_config, cache_group
from flexgen_lab.engine.compress import (
    FP16_MAX,
    CompressionConfig,
    check_fp16_range,
    compressed_nbytes,
    dequantize,
    quantize,
    roundtrip,
)
from flexgen_lab.engine.policy import Policy
from flexgen_lab.models.spec import ModelSpec

FP16_ROUND = 2.0**-11  # float16's relative rounding error (half an ulp)


def error_bound(x: torch.Tensor, config: CompressionConfig,
                out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Per element of x: half a quantisation step of its group, plus float16/output rounding.

    Groups come from the data alone (real elements only, padding excluded); the output is cast
    to out_dtype (default x.dtype).
    """
    ax, g, q_max = config.group_dim % x.dim(), config.group_size, 2**config.bits - 1
    rows = x.float().movedim(ax, -1)
    n = rows.shape[-1]
    num_groups = -(-n // g)
    pad = num_groups * g - n
    low = torch.nn.functional.pad(rows, (0, pad), value=float("inf"))
    high = torch.nn.functional.pad(rows, (0, pad), value=float("-inf"))
    low = low.reshape(*rows.shape[:-1], num_groups, g).amin(-1, keepdim=True)
    high = high.reshape(*rows.shape[:-1], num_groups, g).amax(-1, keepdim=True)
    min_rounding = low.abs() * FP16_ROUND + 1e-7  # +1e-7: float16 subnormals near 0
    step = (high - low + min_rounding) / q_max
    step = torch.maximum(step, torch.tensor(1 / torch.finfo(torch.float16).max))  # tiny ranges
    per_group = step / 2 * (1 + 4 * FP16_ROUND) + min_rounding  # scale stored as float16
    per_elem = per_group.expand(*rows.shape[:-1], num_groups, g).reshape(*rows.shape[:-1], -1)
    out_rounding = rows.abs() * torch.finfo(out_dtype or x.dtype).eps  # casting x_hat back
    return (per_elem[..., :n] + 2 * out_rounding).movedim(-1, ax)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize(
    "shape, group_dim",
    [((100, 24), 0),  # weight (out, in), 100 = 64 + a padded group of 36
     ((2, 3, 5, 128), -1),  # cache (b, heads, s, head_dim): 2 groups per row
     ((2, 3, 5, 16), 3)],  # head_dim 16 < group 64: one padded group per row
)
def test_roundtrip_error_within_half_a_step(shape, group_dim, bits, dtype):
    torch.manual_seed(0)
    x = (torch.randn(shape) * 3 + 1).to(dtype)
    config = CompressionConfig(bits=bits, group_size=64, group_dim=group_dim)
    x_hat = roundtrip(x, config)
    assert x_hat.shape == x.shape and x_hat.dtype == dtype
    assert torch.isfinite(x_hat).all()
    err = (x_hat.float() - x.float()).abs()
    assert (err <= error_bound(x, config)).all(), err.max()


@pytest.mark.parametrize("bits", [4, 8])
def test_constant_and_padded_groups_are_finite_and_exact(bits):
    x = torch.full((100, 4), 0.3)  # every group constant; the second padded (36 of 64 real)
    x[:, 1] = 0.0
    x[64:, 2] = -7.5  # constant groups with different values per column
    config = CompressionConfig(bits=bits, group_size=64)
    c = quantize(x, config)
    assert torch.isfinite(c.scale_min.float()).all()
    torch.testing.assert_close(dequantize(c), x.half().float(), rtol=0, atol=0)


def test_head_dim_smaller_than_group_is_finite():
    x = torch.randn(1, 2, 3, 16)
    x[0, 0, 0] = 1.25  # one constant row
    c = quantize(x, CompressionConfig(group_size=64, group_dim=-1))
    assert c.data.shape == (1, 2, 3, 32) and c.scale_min.shape == (1, 2, 3, 1, 2)
    x_hat = dequantize(c)
    assert torch.isfinite(x_hat).all()
    assert (x_hat[0, 0, 0] == 1.25).all()


# Values that broke float16 scale and minimum: a group spanning +-1e9 or reaching inf decoded to
# NaN (its scale underflowed to 0), one spanning +-7e4 decoded -7e4 as -65504 but 7e4 as 7e4.
LARGE = [1e9, -1e9, 7e4, -7e4, FP16_MAX, -FP16_MAX, 65520.0, float("inf"), float("-inf")]
VALUES = st.one_of(st.sampled_from([*LARGE, 0.0, 1e-8, -3.0]), st.floats(-1e10, 1e10, width=32),
                   st.floats(-4.0, 4.0, width=32))


@st.composite
def tensors_and_configs(draw):
    """A (rows, cols) tensor of VALUES in float32, bfloat16 or float16 (where beyond 65504 is
    inf), and a config grouping along either axis."""
    rows, cols = draw(st.integers(1, 9)), draw(st.integers(1, 4))
    values = draw(st.lists(VALUES, min_size=rows * cols, max_size=rows * cols))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    config = CompressionConfig(bits=draw(st.sampled_from([4, 8])),
                               group_size=draw(st.sampled_from([2, 4, 6])),
                               group_dim=draw(st.sampled_from([0, -1])))
    return torch.tensor(values).reshape(rows, cols).to(dtype), config


@settings(max_examples=150, derandomize=True, database=None, deadline=None)
@given(tensors_and_configs())
def test_values_beyond_float16_saturate_and_never_decode_nan(case):
    """The KV cache's case (quantized every step, unchecked): beyond +-65504 (inf included)
    stores exactly what +-65504 stores, and decodes finite, within half a step of it."""
    x, config = case
    saturated = x.float().clamp(-FP16_MAX, FP16_MAX)
    c, expected = quantize(x, config), quantize(saturated, config)
    assert torch.equal(c.data, expected.data) and torch.equal(c.scale_min, expected.scale_min)
    scale = c.scale_min.select(config.group_dim % 2 + 1, 0)  # (G, 2, cols) or (rows, G, 2)
    assert torch.isfinite(scale).all() and (scale >= 2**-14).all()  # normal float16, never 0
    x_hat = dequantize(c)
    assert x_hat.dtype == x.dtype and torch.isfinite(x_hat).all()
    err = (x_hat.float() - saturated).abs()
    assert (err <= error_bound(saturated, config, out_dtype=x.dtype)).all(), err.max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("large", [1e9, 7e4, float("inf")])
def test_group_spanning_large_values_decodes_symmetrically(large, bits, dtype):
    x = torch.tensor([-large, -1.0, 0.0, 0.5, large]).to(dtype)  # one padded group of 6
    x_hat = roundtrip(x, CompressionConfig(bits=bits, group_size=6)).float()
    half_step = 2 * FP16_MAX / (2**bits - 1) / 2
    assert torch.isfinite(x_hat).all()
    expected = torch.tensor([-FP16_MAX, -1.0, 0.0, 0.5, FP16_MAX])
    assert ((x_hat - expected).abs() <= half_step * 1.01).all(), x_hat
    assert x_hat[0] == x_hat.new_tensor(-FP16_MAX).to(dtype)  # both ends saturate
    assert x_hat[4] > FP16_MAX - half_step


def test_float16_at_its_limits_decodes_finite():
    """The scale is rounded up to float16, so the group's top code never decodes past 65504
    (rounded to nearest it could: 65504 + 64 casts to inf)."""
    for top in (FP16_MAX, 65000.0, 60000.0, 1.0):
        x = torch.tensor([-FP16_MAX, -1.0, top], dtype=torch.float16)
        for bits in (4, 8):
            x_hat = roundtrip(x, CompressionConfig(bits=bits, group_size=4))
            assert torch.isfinite(x_hat).all() and x_hat.max() <= top, (top, bits, x_hat)


@pytest.mark.parametrize("value", [1e9, -7e4, 65520.0, float("inf"), float("nan")])
def test_check_fp16_range_refuses_naming_the_tensor(value):
    w = torch.randn(8, 4)
    w[3, 1] = value
    with pytest.raises(ValueError, match=r"layer0002\.fc1\.weight.*compress=none"):
        check_fp16_range(w.to(torch.bfloat16), "layer0002.fc1.weight")
    w[3, 1] = -FP16_MAX  # the largest float16 still fits
    check_fp16_range(w, "layer0002.fc1.weight")
    check_fp16_range(torch.empty(0, 4), "empty")


@pytest.mark.parametrize("bits", [4, 8])
def test_empty_tensors_round_trip(bits):
    """Sparse attention may keep no past position at all (int(sparsity x p) = 0)."""
    for shape, dim in (((2, 4, 0, 16), -1), ((0, 8), 0), ((3, 0), 0)):
        x = torch.randn(shape)
        x_hat = roundtrip(x, CompressionConfig(bits=bits, group_size=6, group_dim=dim))
        assert x_hat.shape == x.shape


def test_storage_sizes_for_a_concrete_shape():
    x = torch.randn(100, 48, dtype=torch.float16)
    c4 = quantize(x, CompressionConfig(bits=4, group_size=64, group_dim=0))
    num_groups, numel_padded = 2 * 48, 128 * 48
    assert c4.data.dtype == torch.uint8 and c4.scale_min.dtype == torch.float16
    assert c4.data.shape == (64, 48) and c4.scale_min.shape == (2, 2, 48)
    assert c4.nbytes == numel_padded // 2 + num_groups * 2 * 2
    c8 = quantize(x, CompressionConfig(bits=8, group_size=64, group_dim=0))
    assert c8.data.shape == (128, 48)
    assert c8.nbytes == numel_padded + num_groups * 2 * 2


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize(
    "shape, group_dim, group_size",
    [((100, 48), 0, 64), ((7, 33), 1, 8), ((2, 3, 5, 16), -1, 64), ((4, 6, 10), 1, 4)],
)
def test_compressed_nbytes_matches_quantize(shape, group_dim, group_size, bits):
    config = CompressionConfig(bits=bits, group_size=group_size, group_dim=group_dim)
    assert compressed_nbytes(shape, config) == quantize(torch.randn(shape), config).nbytes


def test_4bit_weight_is_under_30_percent_of_fp16():
    w = torch.randn(2048, 2048, dtype=torch.float16)
    c = quantize(w, CompressionConfig(bits=4, group_size=64, group_dim=0))
    assert c.nbytes == compressed_nbytes(w.shape, c.config)
    assert c.nbytes <= 0.30 * w.nbytes  # 0.5625 / 2 = 0.28


def test_nibble_order_and_scale_min_layout():
    # min 0, max 15 -> scale 1, codes equal the values: pairs (0, 15) and (5, 10)
    x = torch.tensor([0.0, 15.0, 5.0, 10.0])
    c = quantize(x, CompressionConfig(bits=4, group_size=4))
    assert c.data.tolist() == [0x0F, 0x5A]  # even element high nibble, odd element low nibble
    assert c.scale_min.tolist() == [[1.0, 0.0]]  # [scale, min] of the one group
    c8 = quantize(torch.tensor([0.0, 255.0, 7.0, 100.0]), CompressionConfig(bits=8, group_size=4))
    assert c8.data.tolist() == [0, 255, 7, 100]
    # group_dim=0 on a matrix: rows 2t and 2t + 1 of a column share byte row t
    w = torch.tensor([[0.0, 15.0], [15.0, 0.0], [5.0, 1.0], [10.0, 2.0]])
    cw = quantize(w, CompressionConfig(bits=4, group_size=4, group_dim=0))
    assert cw.data.tolist() == [[0x0F, 0xF0], [0x5A, 0x12]]  # column 1: scale 1, min 0
    assert cw.scale_min.shape == (1, 2, 2)


def test_appended_cache_row_quantizes_like_the_whole_cache():
    torch.manual_seed(1)
    cache = torch.randn(2, 4, 9, 128, dtype=torch.float16)  # (b, heads, s, head_dim)
    config = CompressionConfig(bits=4, group_size=64, group_dim=-1)
    whole = quantize(cache, config)
    row = quantize(cache[:, :, -1:], config)
    assert torch.equal(row.data, whole.data[:, :, -1:])
    assert torch.equal(row.scale_min, whole.scale_min[:, :, -1:])


def test_dequantize_writes_into_out():
    x = torch.randn(70, 12, dtype=torch.bfloat16)
    c = quantize(x, CompressionConfig())
    out = torch.empty_like(x)
    result = dequantize(c, out=out)
    assert result.data_ptr() == out.data_ptr()
    assert torch.equal(out, dequantize(c))
    wide = dequantize(c, out=torch.empty(70, 12))  # float32: the math's own precision
    assert wide.dtype == torch.float32 and torch.equal(wide.to(torch.bfloat16), out)
    assert not torch.equal(wide, out.float())  # not a bfloat16 decode widened afterwards
    with pytest.raises(ValueError, match="dtype"):
        dequantize(c, out=torch.empty(70, 12, dtype=torch.float16))


def decoded_by_the_layout(c) -> torch.Tensor:
    """x_hat from the documented layout, element by element along the group axis: element i
    is in group i // g; at 4 bits in byte (i // g) * g / 2 + (i % g) // 2, high nibble when
    i % g is even. An independent reading of the format, slow and plain."""
    ax = c.config.group_dim % len(c.shape)
    g, n = c.config.group_size, c.shape[ax]
    i = torch.arange(n)
    group, j = i // g, i % g
    if c.config.bits == 4:
        byte = c.data.index_select(ax, group * (g // 2) + j // 2).long()
        shift = torch.where(j % 2 == 0, 4, 0).reshape([-1 if d == ax else 1
                                                      for d in range(len(c.shape))])
        codes = (byte >> shift) & 0x0F
    else:
        codes = c.data.index_select(ax, i).long()
    scale = c.scale_min.select(ax + 1, 0).index_select(ax, group).float()
    low = c.scale_min.select(ax + 1, 1).index_select(ax, group).float()
    return (codes.float() / scale + low).to(c.dtype)


@settings(max_examples=40, deadline=None)
@given(shape=st.lists(st.integers(1, 9), min_size=1, max_size=4),
       data=st.data(), bits=st.sampled_from([4, 8]), group_size=st.sampled_from([2, 4, 6, 64]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), into=st.booleans(),
       chunk=st.sampled_from([1, 5, 1 << 20]))
def test_dequantize_decodes_the_documented_layout(shape, data, bits, group_size, dtype, into,
                                                  chunk):
    """Both paths (a fresh result, or decoded into `out`) give exactly the values the layout
    documents, for drawn shapes, axes, group sizes and widths, decoded in one pass or in
    chunks of drawn size (a CPU decodes a few MB at a time)."""
    ax = data.draw(st.integers(-len(shape), len(shape) - 1))
    shape[ax] = data.draw(st.integers(1, 3 * group_size))  # whole and padded groups
    x = (torch.randn(shape) * 4).to(dtype)
    c = quantize(x, CompressionConfig(bits=bits, group_size=group_size, group_dim=ax))
    out = torch.full(shape, float("nan"), dtype=dtype) if into else None
    with mock.patch.object(compress, "_DECODE_CHUNK", chunk):
        result = dequantize(c, out=out)
    assert torch.equal(result, decoded_by_the_layout(c))
    if into:
        assert result.data_ptr() == out.data_ptr()


@settings(max_examples=40, deadline=None)
@given(shape=st.lists(st.integers(1, 9), min_size=1, max_size=4), data=st.data(),
       bits=st.sampled_from([4, 8]), group_size=st.sampled_from([2, 6, 64]),
       chunk=st.sampled_from([1, 7, 40]))
def test_quantize_in_chunks_equals_one_pass(shape, data, bits, group_size, chunk):
    """A CPU quantizes a few MB of rows at a time (chunks of drawn size here, down to one row):
    the codes and scales equal one pass over the whole tensor, for drawn shapes and axes."""
    ax = data.draw(st.integers(-len(shape), len(shape) - 1))
    shape[ax] = data.draw(st.integers(1, 3 * group_size))  # whole and padded groups
    x = torch.randn(shape) * 4
    config = CompressionConfig(bits=bits, group_size=group_size, group_dim=ax)
    with mock.patch.object(compress, "_CODE_CHUNK", chunk):
        chunked = quantize(x, config)
    whole = compress._quantize(x, config, ax % len(shape))
    assert torch.equal(chunked.data, whole.data)
    assert torch.equal(chunked.scale_min, whole.scale_min)
    assert chunked.shape == whole.shape == tuple(shape)


def test_cache_rows_are_quantized_a_chunk_at_a_time():
    """A prefill's cache rows (tokens, n, heads, head_dim) are quantized in pieces of at most
    _CODE_CHUNK elements (rows along the token axis), not in one pass over every token."""
    rows = torch.randn(40, 2, 3, 64)
    seen = []
    real = compress._quantize
    with mock.patch.object(compress, "_CODE_CHUNK", 2 * 3 * 64 * 8), \
            mock.patch.object(compress, "_quantize",
                              side_effect=lambda x, *a: seen.append(x.shape[0]) or real(x, *a)):
        quantize(rows, CompressionConfig(group_dim=-1))
    assert seen == [8] * 5


@pytest.mark.parametrize(
    "kwargs, field",
    [(dict(bits=3), "bits=3"), (dict(bits=16), "bits=16"), (dict(group_size=0), "group_size=0"),
     (dict(group_size=-64), "group_size=-64"), (dict(group_size=63), "group_size=63")],
)
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        CompressionConfig(**kwargs)


def test_group_dim_out_of_range_names_the_field():
    with pytest.raises(ValueError, match="group_dim=2"):
        quantize(torch.randn(4, 64), CompressionConfig(group_dim=2))


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 70), st.integers(1, 9), st.sampled_from((4, 8)),
       st.sampled_from((2, 6, 16, 64)), st.booleans())
def test_stored_forms_from_shapes_are_what_stored_arrays_makes(rows, cols, bits, group, packed):
    """The traffic and memory models count stored bytes from shapes; the engine stores
    tensors: the two descriptions must agree array by array."""
    from flexgen_lab.engine.weight_homes import stored_arrays, stored_forms

    config = CompressionConfig(bits, group, 0) if packed else None
    tensor = torch.randn(rows, cols)
    made = stored_arrays(tensor, config, "w")
    forms = stored_forms((rows, cols), torch.float32, config)
    assert [(tuple(t.shape), t.dtype, per) for t, per in made.values()] == forms


@pytest.mark.parametrize("head_dim, group, expected", [
    (128, 64, 64), (64, 64, 64), (80, 64, 40), (16, 64, 16), (96, 64, 48), (80, 8, 8),
    (81, 64, 64)])
def test_cache_group_divides_head_dim(head_dim, group, expected):
    assert cache_group(head_dim, group) == expected


@given(head_dim=st.integers(1, 300), group=st.integers(1, 128).map(lambda g: 2 * g))
def test_cache_group_is_the_largest_even_divisor_not_above_the_group(head_dim, group):
    g = cache_group(head_dim, group)
    assert g % 2 == 0 and g <= max(group, 2)
    if head_dim % 2 == 0:
        assert head_dim % g == 0 and g <= group
        assert not any(head_dim % h == 0 for h in range(g + 2, min(head_dim, group) + 1, 2))
    else:
        assert g == group  # no even divisor: the policy's groups, padded


def test_opt_2_7b_cache_rows_pack_without_padding():
    """head_dim 80: groups of 40 store a 4-bit row in 48 bytes per head, where groups of 64
    padded it to 128 codes (72 bytes), and decode no worse."""
    spec = ModelSpec.from_name("opt-2.7b")
    config = cache_config(Policy(compress_cache=True), spec)
    padded = CompressionConfig(4, 64, -1)
    row = (spec.num_kv_heads, spec.head_dim)
    assert compressed_nbytes(row, config) == spec.num_kv_heads * 48
    assert compressed_nbytes(row, padded) == spec.num_kv_heads * 72
    torch.manual_seed(0)
    x = torch.randn(16, *row)
    assert (roundtrip(x, config) - x).abs().mean() < (roundtrip(x, padded) - x).abs().mean()
