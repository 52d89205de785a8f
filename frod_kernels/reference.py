"""Independent float64 reference of a FRoD layer and of PEFT's eigenproblem behind V, and the tolerances of
docs/DESIGN.md section 5.

Dense math only, on the CPU: it shares no code with the engine or the backends, so a bug there cannot hide here.
Used by the tests and by frod-bench's check suite.
"""

from __future__ import annotations

import torch

# Relative error ||a - ref|| / ||ref|| allowed against the float64 reference (docs/DESIGN.md section 5).
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
    """Float64 twin of ``frod::row_gather_diag``:
    ``out[r] = diag[r] A[r] + sum_{k in group r} weights[k] A[src[k]]``."""
    a = A.detach().double().cpu()
    out = diag.detach().double().cpu()[:, None] * a
    return out.index_add_(0, _group_of(ptr), weights.detach().double().cpu()[:, None] * a[src.cpu()])


def reference_sampled_dot_diag(P, Q, ptr, src) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 twin of ``frod::sampled_dot_diag``: ``(<P[a_k], Q[src[k]]> per nonzero, <P[j], Q[j]> per row)``."""
    p, q = P.detach().double().cpu(), Q.detach().double().cpu()
    return (p[_group_of(ptr)] * q[src.cpu()]).sum(1), (p * q).sum(1)


def reference_frod_eigenproblem(weights, regularization_alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's construction of a category's V (docs/DESIGN.md section 1) in float64, stopped before its eigh: ``(R, T)``
    with ``A = Q R`` the stacked weights (each (out, in), at least as many rows as columns in all) and
    ``T = mean_l inv(Q_l^T Q_l + alpha I)``, so that PEFT's V is ``R^T eigvecs(T)``, eigenvalues ascending."""
    A = torch.cat([w.detach().double().cpu() for w in weights])
    if A.shape[0] < A.shape[1]:
        raise ValueError(f"weights: PEFT takes its SVD route for {A.shape[0]} stacked rows < {A.shape[1]} columns")
    Q, R = torch.linalg.qr(A)
    eye = torch.eye(A.shape[1], dtype=torch.float64)
    T = torch.zeros_like(eye)
    start = 0
    for w in weights:
        block = Q[start:start + w.shape[0]]
        start += w.shape[0]
        T += torch.linalg.inv(block.T @ block + regularization_alpha * eye)
    return R, T / len(weights)


def eigenbasis_error(V: torch.Tensor, R: torch.Tensor, T: torch.Tensor) -> dict[str, float]:
    """How far ``V`` is from being PEFT's basis ``R^T eigvecs(T)`` (:func:`reference_frod_eigenproblem`), in
    measures that do not depend on what eigh may choose freely (each column's sign, the basis inside near-equal
    eigenvalues): with ``E = R^-T V``, its distance from orthonormal, how far ``E^T T E`` is from diagonal, and how
    far its diagonal falls from ascending, relative to ``||T||``."""
    E = torch.linalg.solve_triangular(R.T, V.detach().double().cpu(), upper=False)
    n = E.shape[1]
    D = E.T @ T @ E
    diag = D.diagonal()
    return {
        "orthonormality": ((E.T @ E - torch.eye(n, dtype=torch.float64)).norm() / n ** 0.5).item(),
        "off_diagonal": ((D - torch.diag(diag)).norm() / T.norm()).item(),
        "descent": (torch.clamp(diag[:-1] - diag[1:], min=0).max() / T.norm()).item() if n > 1 else 0.0,
    }
