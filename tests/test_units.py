"""The shared size helpers: exact at any size, and the dtype table the config accepts."""

from __future__ import annotations

from fractions import Fraction

from hypothesis import given, settings
from hypothesis import strategies as st

from flexgen_lab.config import DTYPES
from flexgen_lab.units import FLOAT_OF_SIZE, TORCH_DTYPES, ceil_div, round_up


@settings(max_examples=200, derandomize=True, database=None)
@given(st.integers(0, 2**80), st.integers(1, 2**40))
def test_ceil_div_and_round_up_are_exact(n, multiple):
    # 2**80 bytes: beyond float64's exact integers, where math.ceil(n / multiple) can be off
    quotient = Fraction(n, multiple)
    assert ceil_div(n, multiple) - 1 < quotient <= ceil_div(n, multiple)
    up = round_up(n, multiple)
    assert up % multiple == 0 and n <= up < n + multiple


def test_hand_picked_sizes():
    assert [ceil_div(n, 64) for n in (0, 1, 64, 65, 128)] == [0, 1, 1, 2, 2]
    assert [round_up(n, 4096) for n in (0, 1, 4096, 4097)] == [0, 4096, 4096, 8192]


def test_dtype_tables_agree():
    assert set(DTYPES) == {*TORCH_DTYPES, "auto"}  # the config accepts what the runner maps
    assert {name: t.itemsize for name, t in TORCH_DTYPES.items()} == {
        "float32": 4, "bfloat16": 2, "float16": 2}
    assert all(t.itemsize == size and t.is_floating_point for size, t in FLOAT_OF_SIZE.items())
