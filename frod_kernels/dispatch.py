"""The kernels a layer call runs: the selected backend's implementations, or ``"auto"``'s
(:func:`frod_kernels.autotune.auto_kernel`), resolved once per device type and kept until a setting changes. The
engine calls them as plain functions; the kernel-family custom ops (:mod:`frod_kernels.ops`) go through the same
table."""

from __future__ import annotations

import torch

from . import autotune, registry
from .autotune.state import STATE
from .engine import Kernels

OPS = ("row_gather_diag", "sampled_dot_diag")  # in the order of Kernels' fields

_table: dict[str, tuple[tuple[int, int], Kernels]] = {}


def kernels(device_type: str) -> Kernels:
    """The implementations of both kernel families that run on ``device_type`` now."""
    generation = (registry.generation, STATE.generation)
    hit = _table.get(device_type)
    if hit is not None and hit[0] == generation:
        return hit[1]
    if device_type == "meta":
        # shapes only: the ops' fake implementations
        found = Kernels(torch.ops.frod.row_gather_diag, torch.ops.frod.sampled_dot_diag)
    elif registry.get_backend() == "auto":
        found = Kernels(*(autotune.auto_kernel(op, device_type) for op in OPS))
    else:
        found = Kernels(*(registry.selected_impl(op, device_type) for op in OPS))
    _table[device_type] = (generation, found)
    return found
