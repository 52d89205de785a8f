"""The three execution paths of a FRoD layer: one forward and one backward each, composed of dense matmuls and the
two kernel families (docs/DESIGN.md sections 3 and 6). :mod:`frod_kernels.cost_model` picks a path per shape.

All paths compute the same ``y = ((x V) * lambda + (x V) S^T) U^T + bias``; they differ in where the sparse
work happens and in how many dense products a step costs:

* ``SPARSE``: apply ``diag(lambda) + S`` to the activations, ``t^T = lambda * z^T + S z^T``; no per-step
  constant, the sparse work scales with tokens. Best for few tokens.
* ``FACTORED``: fold the sparse part into ``C^T = lambda * U^T + S^T U^T`` (in x out, the "full-rank update") and
  run dense products only; ``out * nnz`` work per step, independent of tokens.
* ``MATERIALIZED``: ``W'^T = V C^T`` once per step; then one GEMM forward and two backward, like a plain linear.
  Best once tokens are a few times ``in``.
* ``DENSE``: write ``M^T = (diag(lambda) + S)^T`` as a dense in x in matrix and run ``y = ((x V) M^T) U^T`` as
  three GEMMs, composed of differentiable torch ops (:func:`dense_forward`) so that autograd derives the backward
  in C++, with no Python per backward step. ``b * in^2`` more multiply-adds per product than the sparse steps,
  and about half the host time of the other paths: the path for layers so small that the host's time per op is
  the cost (:mod:`frod_kernels.cost_model`). The kernel families play no part in it.

Every sparse step of the first three paths (:data:`KERNEL_PATHS`, which :func:`forward` and :func:`backward` run)
is a call of ``kernels.row_gather`` or ``kernels.sampled_dot`` (a :class:`Kernels`, resolved once per device by
:mod:`frod_kernels.dispatch`): a plain function call, no custom-op dispatch per step.

Layouts. A gather reads whole rows of its operand, so every operand it gathers from is row-contiguous: the
activations ``z^T``, ``dt^T`` (in x b) and ``U^T`` (in x out). ``U^T`` is row-contiguous when U is stored
column-major (shape (out, in), strides (1, out)): :class:`frod_kernels.FrodLinear` and the PEFT integration store
it so, at no cost in memory, and no call copies it. The activations are produced feature-major by the GEMM itself
(``z^T = V^T x^T``: cuBLAS writes the transpose for free) except where that GEMM is slow: MKL runs the skinny
transposed product ``V^T x^T`` several times slower than ``x V`` for few tokens (measured on the project's CPU:
38x at 8 tokens, in = 1024), so there ``z = x V`` is computed and the CPU's kernels read its transpose as it is
(:data:`FEATURE_MAJOR_MIN_TOKENS`): the C kernels through a tile copy, writing their result in the same layout, so
the next product reads it contiguous. Other kernels copy such an operand to contiguous rows.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from . import frozen_gemm
from ._numerics import acc_dtype
from .layout import inverse_order

SPARSE, FACTORED, MATERIALIZED, DENSE = 0, 1, 2, 3
PATH_NAMES = {SPARSE: "sparse", FACTORED: "factored", MATERIALIZED: "materialized", DENSE: "dense"}
KERNEL_PATHS = (SPARSE, FACTORED, MATERIALIZED)
KERNEL_PATH_NAMES = {p: PATH_NAMES[p] for p in KERNEL_PATHS}

# Fewest tokens for which an activation a gather reads is produced feature-major by its GEMM, per device type
# (see the module docstring). On the CPU the crossover lies between 8 and 64 tokens (2 cores, in = 1024).
FEATURE_MAJOR_MIN_TOKENS = {"cpu": 64}


class Kernels(NamedTuple):
    """The implementations a call runs: the two kernel families with the ``frod::`` op signatures."""

    row_gather: Callable
    sampled_dot: Callable


def gemm_writes_transpose(b: int, device_type: str) -> bool:
    """Whether an activation of ``b`` tokens that a gather reads is written feature-major by its GEMM (else it is
    the transposed view of a token-major product)."""
    return b >= FEATURE_MAJOR_MIN_TOKENS.get(device_type, 0)


def _feature_major(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``(a @ w)^T`` (w: the frozen V or U, a: b x in), as the device's GEMMs produce it fastest: a packed product
    (:mod:`frod_kernels.frozen_gemm`) writes it token-major, faster than MKL writes either layout."""
    if gemm_writes_transpose(a.shape[0], a.device.type) and not frozen_gemm.packs(a, w):
        return w.t() @ a.t()
    return frozen_gemm.mm(a, w).t()


def _frozen_left(w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``w @ b`` for the frozen ``w`` (``V`` or ``V^T``): as ``(b^T w^T)^T`` where that product is packed."""
    if frozen_gemm.packs(b.t(), w.t()):
        return frozen_gemm.mm(b.t(), w.t()).t()
    return w @ b


def full_rank_update_t(U, lambda_l, s_values, lay, k: Kernels):
    """``C^T = (diag(lambda) + S)^T U^T`` (in x out), the right-hand operand of ``y = z C^T``."""
    return k.row_gather(U.t(), lambda_l, s_values.index_select(0, lay.col_perm), lay.col_ptr, lay.col_src)


def forward(x, V, U, lambda_l, s_values, lay, bias, path: int, keep_weight: bool, k: Kernels):
    """Returns ``(y, saved)``; ``saved`` is what backward needs besides the inputs (z^T, or W'^T, or nothing)."""
    if path not in KERNEL_PATHS:
        raise ValueError(f"path: the engine runs the kernel paths {KERNEL_PATHS}, got {path} (the dense path is "
                         "dense_forward)")
    if path == SPARSE:
        z_t = _feature_major(x, V)
        t_t = k.row_gather(z_t, lambda_l, s_values.index_select(0, lay.row_perm), lay.row_ptr, lay.row_src)
        return frozen_gemm.mm(t_t.t(), U.t(), bias), z_t
    c_t = full_rank_update_t(U, lambda_l, s_values, lay, k)
    if path == FACTORED:
        z_t = _feature_major(x, V)
        return frozen_gemm.plain(z_t.t(), c_t, bias), z_t
    w_t = _frozen_left(V, c_t)
    return frozen_gemm.plain(x, w_t, bias), (w_t if keep_weight else x.new_empty(0))


def dense_index(s_indices: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where ``lambda`` and ``s_values`` go in ``M^T`` flattened row-major: the diagonal, and each ``S[r, c]`` at
    ``M^T[c, r]``."""
    diag = torch.arange(n, device=s_indices.device) * (n + 1)
    return diag, s_indices[1].long() * n + s_indices[0].long()


def dense_forward(x, V, U_t, lambda_l, s_values, index, bias):
    """The ``DENSE`` path, forward only: autograd records it and derives the backward. ``U_t``: ``U^T`` (in x out), the
    operand of the last product. ``index``: :func:`dense_index`. ``M`` and the product that applies it run in the
    accumulator dtype, as the kernel families do: a half-precision ``M`` would round ``lambda``, not just the
    result. ``lambda`` and ``s_values`` are written by separate copies so that their gradients come back as separate
    tensors, not views of one.

    Written for host time, the path's reason to exist: each line here is paid per layer call, and in a training
    step the Python around the ops costs about what the ops do (no no-op casts: each is still an op call)."""
    n = V.shape[0]
    acc = acc_dtype(x.dtype)
    lam = lambda_l if lambda_l.dtype is acc else lambda_l.to(acc)
    s = s_values if s_values.dtype is acc else s_values.to(acc)
    if x.is_cpu:
        # put_ writes flat positions without a view (an autograd node less); accumulate=True, adding to zeros, is
        # the variant torch.use_deterministic_algorithms allows on the CPU
        m_t = lam.new_zeros(n, n)
        m_t.put_(index[0], lam, accumulate=True)
        m_t.put_(index[1], s, accumulate=True)
    else:  # put_ has no deterministic CUDA variant, index_copy_ has
        m_t = lam.new_zeros(n * n).index_copy_(0, index[0], lam).index_copy_(0, index[1], s).view(n, n)
    t = torch.mm(x, V)
    t = torch.mm(t if t.dtype is acc else t.to(acc), m_t)
    return frozen_gemm.plain(t if t.dtype is x.dtype else t.to(x.dtype), U_t, bias)


def backward(g, x, saved, V, U, lambda_l, s_values, lay, path: int, need_x: bool, need_lambda: bool,
             need_s: bool, k: Kernels):
    """Gradients ``(dx, dlambda, ds)``, each ``None`` where not needed."""
    dx = dlam = ds_grouped = None
    if path == MATERIALIZED:
        w_t = saved if saved.numel() else _frozen_left(V, full_rank_update_t(U, lambda_l, s_values, lay, k))
        if need_x:
            dx = g @ w_t.t()
        if need_lambda or need_s:
            db_t = _frozen_left(V.t(), x.t() @ g)  # (dW' V)^T = V^T dW'^T, in x out
            ds_grouped, dlam = k.sampled_dot(U.t(), db_t, lay.row_ptr, lay.row_src)
    else:
        z_t = saved
        dt_t = _feature_major(g, U)
        if need_lambda or need_s:
            ds_grouped, dlam = k.sampled_dot(dt_t, z_t, lay.row_ptr, lay.row_src)
        if need_x:
            if path == SPARSE:
                dz = k.row_gather(dt_t, lambda_l, s_values.index_select(0, lay.col_perm), lay.col_ptr, lay.col_src).t()
            else:
                dz = g @ full_rank_update_t(U, lambda_l, s_values, lay, k).t()
            dx = frozen_gemm.mm(dz, V.t())
    ds = None
    if need_s:
        if ds_grouped.dtype != s_values.dtype:
            ds_grouped = ds_grouped.to(s_values.dtype)
        ds = ds_grouped.index_select(0, inverse_order(lay.row_perm))
    if need_lambda and dlam.dtype != lambda_l.dtype:
        dlam = dlam.to(lambda_l.dtype)
    return dx, (dlam if need_lambda else None), ds
