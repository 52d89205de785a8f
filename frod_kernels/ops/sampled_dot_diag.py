"""``frod::sampled_dot_diag``: kernel family 2 (docs/DESIGN.md section 6), one schema for every backend."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import dispatch
from .._numerics import acc_dtype
from . import _autocast


@torch.library.custom_op("frod::sampled_dot_diag", mutates_args=())
def sampled_dot_diag(P: Tensor, Q: Tensor, ptr: Tensor, src: Tensor) -> tuple[Tensor, Tensor]:
    """``vals[k] = <P[a_k], Q[src[k]]>`` with ``a_k`` the group (row) of k, and ``diag[j] = <P[j], Q[j]>``.

    P, Q: (n, m), any strides (rows contiguous read fastest), same dtype. ptr: (n+1,) int64 group offsets. src:
    (nnz,) int64. Returns (vals (nnz,), diag (n,)) in float32 (float64 for float64). The backend is the selected
    one (:func:`frod_kernels.set_backend`), or ``"auto"``'s choice.
    """
    return dispatch.kernels(P.device.type).sampled_dot(P, Q, ptr, src)


@sampled_dot_diag.register_fake
def _(P, Q, ptr, src):
    acc = acc_dtype(P.dtype)
    return P.new_empty(src.shape[0], dtype=acc), P.new_empty(P.shape[0], dtype=acc)


_autocast.register("sampled_dot_diag", ())
