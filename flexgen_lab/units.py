"""Sizes every part of the package counts the same way, each in one place.

Integer ceil division and rounding up to a block (disk offsets round to engine.disk.ALIGN), the
dtypes a run may ask for (their itemsize is their byte count), and the float type the planner
sizes a model with when it knows only its bytes per element. Element counts are math.prod(shape)
throughout and a tensor's bytes engine.tiers.nbytes_of(shape, dtype); budgets are parsed by
config.parse_budgets. A leaf module: it imports nothing of the package, so any layer may use it.

    >>> ceil_div(100, 64), round_up(5000, 4096), TORCH_DTYPES["bfloat16"].itemsize
    (2, 8192, 2)
"""

from __future__ import annotations

import torch

# dtype names a run accepts (config `dtype`, beside "auto") -> torch types
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# bytes per element -> a float type that size: the planner sizes tensors from dtype_bytes alone
# (bfloat16 and float16 take the same bytes, so either stands for both)
FLOAT_OF_SIZE = {2: torch.float16, 4: torch.float32}


def ceil_div(a: int, b: int) -> int:
    """ceil(a / b) for integers, exact at any size (no float division)."""
    return -(-a // b)


def round_up(n: int, multiple: int) -> int:
    """The smallest multiple of `multiple` that is >= n."""
    return ceil_div(n, multiple) * multiple
