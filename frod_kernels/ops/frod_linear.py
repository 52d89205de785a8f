"""``frod::frod_linear_fwd`` / ``frod::frod_linear_bwd``: the whole layer as two custom ops, with autograd registered
on the forward. ``torch.compile`` sees each as one opaque op whose output shapes the fake implementations give.

In eager mode :func:`frod_kernels.frod_linear` runs the same engine through a plain ``autograd.Function``
(:mod:`.api`) instead: a custom op with autograd costs about 250 us of Python per forward + backward on the
project's CPU, several times a frozen linear layer's whole call, which on a GPU leaves the kernels idle. Both run
:mod:`frod_kernels.engine` with the kernels of :mod:`frod_kernels.dispatch`, so they compute the same bits.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import dispatch, engine
from ..layout import PatternLayout, pattern_layout, unpacked
from . import _autocast


def layout_of(s_indices: Tensor, layout: Optional[Tensor], n: int, nnz: int) -> PatternLayout:
    """The pattern layout a call runs with: the caller's packed one, else the cached layout of ``s_indices``."""
    return pattern_layout(s_indices, n) if layout is None else unpacked(layout, n, nnz)


@torch.library.custom_op("frod::frod_linear_fwd", mutates_args=())
def frod_linear_fwd(
    x: Tensor,
    V: Tensor,
    U: Tensor,
    lambda_l: Tensor,
    s_values: Tensor,
    s_indices: Tensor,
    layout: Optional[Tensor],
    bias: Optional[Tensor],
    path: int,
    keep_weight: bool,
) -> tuple[Tensor, Tensor]:
    lay = layout_of(s_indices, layout, V.shape[0], s_values.shape[0])
    y, saved = engine.forward(x, V, U, lambda_l, s_values, lay, bias, path, keep_weight,
                              dispatch.kernels(x.device.type))
    # A compiler plans with the fake's strides, and a fake cannot follow the engine's layout choice (z^T is a
    # transposed view for few tokens on the CPU): one b x in copy then, in compiled graphs only.
    return y, saved.contiguous()


@frod_linear_fwd.register_fake
def _(x, V, U, lambda_l, s_values, s_indices, layout, bias, path, keep_weight):
    b, n_in, n_out = x.shape[0], V.shape[0], U.shape[0]
    if path != engine.MATERIALIZED:
        saved = x.new_empty(n_in, b)
    else:
        saved = x.new_empty(n_in, n_out) if keep_weight else x.new_empty(0)
    return x.new_empty(b, n_out), saved


@torch.library.custom_op("frod::frod_linear_bwd", mutates_args=())
def frod_linear_bwd(
    g: Tensor,
    x: Optional[Tensor],
    saved: Tensor,
    V: Tensor,
    U: Tensor,
    lambda_l: Tensor,
    s_values: Tensor,
    s_indices: Tensor,
    layout: Optional[Tensor],
    path: int,
    need_x: bool,
    need_lambda: bool,
    need_s: bool,
    need_bias: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    lay = layout_of(s_indices, layout, V.shape[0], s_values.shape[0])
    dx, dlam, ds = engine.backward(g, x, saved, V, U, lambda_l, s_values, lay, path, need_x, need_lambda, need_s,
                                   dispatch.kernels(g.device.type))
    dbias = g.sum(0) if need_bias else None
    empty = g.new_empty(0)
    return tuple(t if t is not None else empty.clone() for t in (dx, dlam, ds, dbias))


@frod_linear_bwd.register_fake
def _(g, x, saved, V, U, lambda_l, s_values, s_indices, layout, path, need_x, need_lambda, need_s, need_bias):
    def maybe(flag, shape, dtype):
        return g.new_empty(shape, dtype=dtype) if flag else g.new_empty(0)

    return (
        maybe(need_x, (g.shape[0], V.shape[0]), g.dtype),
        maybe(need_lambda, lambda_l.shape, lambda_l.dtype),
        maybe(need_s, s_values.shape, s_values.dtype),
        maybe(need_bias, (U.shape[0],), g.dtype),
    )


def _setup_context(ctx, inputs, output):
    x, V, U, lambda_l, s_values, s_indices, layout, bias, path, keep_weight = inputs
    _, saved = output
    ctx.path = path
    ctx.mark_non_differentiable(saved)
    ctx.save_for_backward(x if path == engine.MATERIALIZED else None, saved, V, U, lambda_l, s_values, s_indices,
                          layout)


def _backward(ctx, gy, _gsaved):
    x, saved, V, U, lambda_l, s_values, s_indices, layout = ctx.saved_tensors
    need = ctx.needs_input_grad
    if need[1] or need[2]:
        raise RuntimeError(FROZEN_MESSAGE)
    dx, dlam, ds, dbias = torch.ops.frod.frod_linear_bwd(
        gy.contiguous(), x, saved, V, U, lambda_l, s_values, s_indices, layout, ctx.path,
        need[0], need[3], need[4], need[7],
    )
    return (dx if need[0] else None, None, None, dlam if need[3] else None, ds if need[4] else None, None, None,
            dbias.to(gy.dtype) if need[7] else None, None, None)


FROZEN_MESSAGE = ("frod_linear: V and U are frozen; call .requires_grad_(False) on them (they are the shared basis "
                  "and per-layer projection, not trainable parameters)")

frod_linear_fwd.register_autograd(_backward, setup_context=_setup_context)

# the activations, V, U and bias (arguments 0, 1, 2, 7) take the autocast dtype, as F.linear's would
_autocast.register("frod_linear_fwd", (0, 1, 2, 7))
_autocast.register("frod_linear_bwd", ())
