"""Independent float64 reference of a FRoD layer, and the tolerances of DESIGN.md section 5.

Dense math only, on the CPU: it shares no code with the engine or the backends, so a bug there cannot hide here.
Used by the tests and by frod-bench's check suite.
"""

from __future__ import annotations

import torch

# Relative error ||a - ref|| / ||ref|| allowed against the float64 reference (DESIGN.md section 5).
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}
# tf32 matmuls or Triton's default float32 dot.
TOLERANCE_TF32 = 1e-3


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """``||a - ref|| / ||ref||`` in float64; NaN or inf anywhere in ``a`` gives ``inf`` (never passes)."""
    a64, r64 = a.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(a64).all():
        return float("inf")
    den = torch.linalg.vector_norm(r64)
    num = torch.linalg.vector_norm(a64 - r64)
    return float(num / den) if den > 0 else float(num)


def dense_s(s_values: torch.Tensor, s_indices: torch.Tensor, n: int) -> torch.Tensor:
    S = torch.zeros(n, n, dtype=torch.float64)
    return S.index_put_((s_indices[0].long().cpu(), s_indices[1].long().cpu()), s_values.detach().double().cpu())


def reference_forward(x, V, U, lambda_l, s_values, s_indices, bias=None):
    """``y = ((x V) * lambda + (x V) S^T) U^T + bias`` in float64 on the CPU, differentiable in its float64 leaves."""
    n = V.shape[0]
    S = torch.zeros(n, n, dtype=torch.float64).index_put((s_indices[0].long().cpu(), s_indices[1].long().cpu()),
                                                         s_values)
    z = x @ V
    y = (z * lambda_l + z @ S.T) @ U.T
    return y if bias is None else y + bias


def reference_grads(x, V, U, lambda_l, s_values, s_indices, bias, grad_out):
    """Float64 output and gradients ``(y, dx, dlambda, ds, dbias)`` for upstream gradient ``grad_out``."""
    def leaf(t):
        return None if t is None else t.detach().double().cpu().requires_grad_(True)

    x64, l64, s64, b64 = leaf(x), leaf(lambda_l), leaf(s_values), leaf(bias)
    y = reference_forward(x64, V.detach().double().cpu(), U.detach().double().cpu(), l64, s64, s_indices, b64)
    y.backward(grad_out.detach().double().cpu())
    return y.detach(), x64.grad, l64.grad, s64.grad, (None if b64 is None else b64.grad)


def _group_of(ptr: torch.Tensor) -> torch.Tensor:
    """The group (output row) of every grouped nonzero, from the group offsets."""
    ptr = ptr.cpu()
    return torch.repeat_interleave(torch.arange(ptr.numel() - 1), ptr.diff())


def reference_row_gather_diag(A, diag, weights, ptr, src) -> torch.Tensor:
    """Float64 twin of ``frod::row_gather_diag``: ``out[r] = diag[r] A[r] + sum_{k in group r} weights[k] A[src[k]]``."""
    a = A.detach().double().cpu()
    out = diag.detach().double().cpu()[:, None] * a
    return out.index_add_(0, _group_of(ptr), weights.detach().double().cpu()[:, None] * a[src.cpu()])


def reference_sampled_dot_diag(P, Q, ptr, src) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 twin of ``frod::sampled_dot_diag``: ``(<P[a_k], Q[src[k]]> per nonzero, <P[j], Q[j]> per row)``."""
    p, q = P.detach().double().cpu(), Q.detach().double().cpu()
    return (p[_group_of(ptr)] * q[src.cpu()]).sum(1), (p * q).sum(1)
