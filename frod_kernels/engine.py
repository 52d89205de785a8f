"""The three execution paths of a FRoD layer and the cost model that picks one per shape (DESIGN.md section 3).

All paths compute the same ``y = ((x V) * lambda + (x V) S^T) U^T + bias``; they differ in where the sparse
work happens and in how many dense products a step costs:

* ``SPARSE``: apply ``diag(lambda) + S`` to the activations, ``t^T = lambda * z^T + S z^T``; no per-step
  constant, the sparse work scales with tokens. Best for few tokens.
* ``FACTORED``: fold the sparse part into ``C^T = lambda * U^T + S^T U^T`` (in x out, the "full-rank update") and
  run dense products only; ``out * nnz`` work per step, independent of tokens.
* ``MATERIALIZED``: ``W'^T = V C^T`` once per step; then one GEMM forward and two backward, like a plain linear.
  Best once tokens are a few times ``in``.

Every sparse step is one of the two kernel-family ops (``frod::row_gather_diag``, ``frod::sampled_dot_diag``),
so a backend that implements those two speeds up every path.
"""

from __future__ import annotations

import torch

SPARSE, FACTORED, MATERIALIZED = 0, 1, 2
PATH_NAMES = {SPARSE: "sparse", FACTORED: "factored", MATERIALIZED: "materialized"}

# Cost of one multiply-add of a sparse step, in multiply-adds of a large dense GEMM on the same device. Measured
# with the torch backend: CPU (MKL CSR SpMM/SDDMM vs sgemm, 2 cores) about 12-20. GPU: from the roofline
# (frod_kernels.roofline), the kernel families run at about 21 FLOP/byte in bf16 against an H200's balance of
# about 184 (790 TFLOP/s over 4.3 TB/s), so about 9 at best; with it the cost model picks the roofline's best
# path for the README's shapes. On a GPU "auto" measures the paths anyway (frod_kernels.autotune); this is the
# choice where it does not.
SPARSE_COST = {"cpu": 16.0, "cuda": 8.0}

# Keep W' between forward and backward (out x in per layer) instead of rebuilding it, only where memory is
# plentiful and compute is scarce. On a GPU the rebuild costs in/b of a GEMM and keeps peak memory at LoRA's.
KEEP_MATERIALIZED_WEIGHT = {"cpu": True}


def path_costs(b: int, n_in: int, n_out: int, nnz: int, device_type: str, training: bool) -> dict[int, float]:
    """Estimated multiply-adds (GEMM-equivalent) of one forward (+ backward if ``training``) per path."""
    k = SPARSE_COST.get(device_type, SPARSE_COST["cuda"])
    c_build = k * n_out * (n_in + nnz)
    apply = k * b * (n_in + nnz)
    x_v, t_u, w_build = b * n_in * n_in, b * n_in * n_out, n_in * n_in * n_out
    fwd = {
        SPARSE: x_v + apply + t_u,
        FACTORED: c_build + x_v + t_u,
        MATERIALIZED: c_build + w_build + t_u,
    }
    if not training:
        return fwd
    keep = KEEP_MATERIALIZED_WEIGHT.get(device_type, False)
    bwd = {
        SPARSE: t_u + apply + apply + x_v,
        FACTORED: c_build + 2 * t_u + apply + x_v,
        MATERIALIZED: (0 if keep else c_build + w_build) + 2 * t_u + w_build + k * n_out * (n_in + nnz),
    }
    return {p: fwd[p] + bwd[p] for p in fwd}


def choose_path(b: int, n_in: int, n_out: int, nnz: int, device_type: str, training: bool) -> int:
    costs = path_costs(b, n_in, n_out, nnz, device_type, training)
    return min(costs, key=costs.__getitem__)


def _ops():
    return torch.ops.frod


def full_rank_update_t(U, lambda_l, s_values, lay):
    """``C^T = (diag(lambda) + S)^T U^T`` (in x out), the right-hand operand of ``y = z C^T``."""
    return _ops().row_gather_diag(U.t(), lambda_l, s_values[lay.col_perm], lay.col_ptr, lay.col_src)


def forward(x, V, U, lambda_l, s_values, lay, bias, path: int, keep_weight: bool):
    """Returns ``(y, saved)``; ``saved`` is what backward needs besides the inputs (z^T, or W'^T, or nothing).

    Activations that a sparse step reads are produced feature-major (``z^T = V^T x^T``, in x b, rows contiguous):
    the GEMM writes the transpose for free and every gather then reads whole contiguous rows.
    """
    if path == SPARSE:
        z_t = V.t() @ x.t()
        t_t = _ops().row_gather_diag(z_t, lambda_l, s_values[lay.row_perm], lay.row_ptr, lay.row_src)
        return _linear(t_t.t(), U.t(), bias), z_t
    c_t = full_rank_update_t(U, lambda_l, s_values, lay)
    if path == FACTORED:
        z_t = V.t() @ x.t()
        return _linear(z_t.t(), c_t, bias), z_t
    w_t = V @ c_t
    return _linear(x, w_t, bias), (w_t if keep_weight else x.new_empty(0))


def backward(g, x, saved, V, U, lambda_l, s_values, lay, path: int, need_x: bool, need_lambda: bool, need_s: bool):
    """Gradients ``(dx, dlambda, ds)``, each ``None`` where not needed."""
    dx = dlam = ds_grouped = None
    if path == MATERIALIZED:
        w_t = saved if saved.numel() else V @ full_rank_update_t(U, lambda_l, s_values, lay)
        if need_x:
            dx = g @ w_t.t()
        if need_lambda or need_s:
            db_t = V.t() @ (x.t() @ g)  # (dW' V)^T = V^T dW'^T, in x out
            ds_grouped, dlam = _ops().sampled_dot_diag(U.t(), db_t, lay.row_ptr, lay.row_src)
    else:
        z_t = saved
        dt_t = U.t() @ g.t()
        if need_lambda or need_s:
            ds_grouped, dlam = _ops().sampled_dot_diag(dt_t, z_t, lay.row_ptr, lay.row_src)
        if need_x:
            if path == SPARSE:
                dz = _ops().row_gather_diag(dt_t, lambda_l, s_values[lay.col_perm], lay.col_ptr, lay.col_src).t()
            else:
                dz = g @ full_rank_update_t(U, lambda_l, s_values, lay).t()
            dx = dz @ V.t()
    ds = None
    if need_s:
        ds = torch.empty_like(s_values)
        ds[lay.row_perm] = ds_grouped.to(s_values.dtype)
    return dx, (dlam.to(lambda_l.dtype) if need_lambda else None), ds


def _linear(a, w_t, bias):
    if bias is None:
        return a @ w_t
    return torch.addmm(bias.to(a.dtype), a, w_t)
