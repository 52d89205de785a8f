"""``frod::row_gather_diag``: kernel family 1 (docs/DESIGN.md section 6), one schema for every backend."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import dispatch
from . import _autocast


@torch.library.custom_op("frod::row_gather_diag", mutates_args=())
def row_gather_diag(A: Tensor, diag: Tensor, weights: Tensor, ptr: Tensor, src: Tensor) -> Tensor:
    """``out[r] = diag[r] * A[r] + sum_{k in [ptr[r], ptr[r+1])} weights[k] * A[src[k]]``.

    A: (n, m), any strides (rows contiguous read fastest: a gather reads whole rows), float16/bfloat16/float32/
    float64. diag: (n,). weights: (nnz,), in group order. ptr: (n+1,) int64 group offsets. src: (nnz,) int64
    source rows. Returns a new contiguous (n, m) tensor of A's dtype, accumulated in float32 (float64 for float64).
    The backend is the selected one (:func:`frod_kernels.set_backend`), or ``"auto"``'s choice.
    """
    # the engine takes the torch twin's transposed result as it is; the op's contract is a contiguous tensor
    return dispatch.kernels(A.device.type).row_gather(A, diag, weights, ptr, src).contiguous()


@row_gather_diag.register_fake
def _(A, diag, weights, ptr, src):
    return torch.empty(A.shape, dtype=A.dtype, device=A.device)


_autocast.register("row_gather_diag", ())
