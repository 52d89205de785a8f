"""Dtypes and size classes shared by the ops, the backends and the autotuner."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# for membership tests on a hot path (a set lookup, not a scan with tensor-dtype comparisons)
FLOAT_DTYPE_SET = frozenset(FLOAT_DTYPES)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulator of every kernel: float64 for float64 data, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def bucket(n: int) -> int:
    """A size's class: its power of two, so that autotuners tune once per class (token counts vary per step)."""
    return 1 << max(int(n) - 1, 0).bit_length()


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
