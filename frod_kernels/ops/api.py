""":func:`frod_linear`, the public op: argument checks, the path choice, and the call of the engine (eagerly through
:class:`_FrodLinear`, under ``torch.compile`` through the custom ops of :mod:`.frod_linear`)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import autotune, cost_model, dispatch, engine, registry
from .._tensor_cache import DERIVED
from .._validation import check_frod_args
from ..layout import check_pattern
from . import _autocast
from .frod_linear import layout_of

_PATHS = {name: p for p, name in engine.PATH_NAMES.items()}
# frod_linear_fwd's autocast rule: x, V, U and bias take the autocast dtype
_CAST = (0, 1, 2, 3)


def frod_linear(
    x: Tensor,
    V: Tensor,
    U: Tensor,
    lambda_l: Tensor,
    s_values: Tensor,
    s_indices: Tensor,
    bias: Optional[Tensor] = None,
    *,
    layout: Optional[Tensor] = None,
    path: Optional[str] = None,
) -> Tensor:
    """A FRoD-adapted linear layer: ``y = ((x V) * lambda_l + (x V) S^T) U^T + bias``.

    Args:
        x: (..., in) activations; float32, float16 or bfloat16 (float64 works too). Any leading dims, including
            none or zero tokens. The computation runs in ``x``'s dtype with float32 accumulation.
        V: (in, in) frozen shared basis. Cast to ``x``'s dtype if it differs (store it in that dtype to avoid the
            per-call cast).
        U: (out, in) frozen per-layer projection, cast like ``V``. Stored column-major (``U.t().contiguous().t()``,
            as :class:`frod_kernels.FrodLinear` and the PEFT integration store it), every row the sparse steps
            gather from ``U^T`` is contiguous; any other layout works, at the cost of one transposed copy per call.
        lambda_l: (in,) trainable diagonal, any float dtype (PEFT keeps it float32 under its adapter autocast).
        s_values: (nnz,) trainable off-diagonal values of S, same dtype rules as ``lambda_l``.
        s_indices: (2, nnz) int64 COO positions of S (rows, then columns), PEFT's layout: off-diagonal, in range,
            no duplicates. Its derived layouts are built on first use and cached.
        bias: optional (out,) bias, trainable if it requires grad.
        layout: optional packed layout (:func:`frod_kernels.layout.build_layout` ``(...).packed``) to use instead
            of the cache; :class:`frod_kernels.FrodLinear` passes its own so compiled graphs take it as an input.
        path: force ``"sparse"``, ``"factored"``, ``"materialized"`` or ``"dense"`` instead of the cost model's
            choice (:mod:`frod_kernels.engine`). ``"dense"`` writes ``diag(lambda_l) + S`` as an in x in matrix and
            runs no kernel of the backends: under the default backend ``"auto"`` the cost model takes it for layers
            so small that the host's time per call is the cost (on the CPU only, where that was measured).

    Returns:
        (..., out) tensor of ``x``'s dtype.

    Gradients flow to ``x``, ``lambda_l``, ``s_values`` and ``bias`` (first order). ``V`` and ``U`` must not
    require grad.
    """
    check_frod_args(x, V, U, lambda_l, s_values, s_indices, bias, layout)
    n_in, n_out, nnz = V.shape[0], U.shape[0], s_values.shape[0]
    lead = x.shape[:-1]
    x2 = x if x.dim() == 2 else x.reshape(-1, n_in)
    dev = x.device.type
    compiling = torch.compiler.is_compiling()
    autocast = _autocast_on(dev)
    if autocast and not compiling:
        # the eager path applies the custom op's autocast rule itself, then runs with autocast off
        x2, V, U, bias = _autocast.cast((x2, V, U, bias), _CAST, dev)
    cd = x2.dtype
    if V.dtype != cd:
        V = V.to(cd)
    if U.dtype != cd:
        U = U.to(cd)
    if bias is not None and bias.dtype != cd:
        bias = bias.to(cd)
    training = torch.is_grad_enabled() and (x.requires_grad or lambda_l.requires_grad or s_values.requires_grad
                                            or (bias is not None and bias.requires_grad))
    keep = training and cost_model.KEEP_MATERIALIZED_WEIGHT.get(dev, False)
    if path is not None:
        p = _path_from_name(path)
    else:
        auto = registry.get_backend() == "auto"
        measured = auto and not compiling and autotune.measures(x2.device)
        # The dense path runs no kernel and is there for the host's time: not a choice when a backend was named
        # (its kernels are to run), when compiling (the compiled graph has no per-op host time) or among measured
        # choices (devices where the host's time was not measured)
        p = cost_model.choose_path(x2.shape[0], n_in, n_out, nnz, dev, training, not auto or compiling or measured)
        if measured:
            p = _measured_path(p, x2, V, U, lambda_l, s_values, s_indices, layout, bias, training, keep)
    if p == engine.DENSE:
        # plain differentiable ops, traced as they are under torch.compile; eagerly, the index is cached
        index = engine.dense_index(s_indices, n_in) if compiling else _cached_dense_index(s_indices, n_in)
        if not autocast:
            y = engine.dense_forward(x2, V, U, lambda_l, s_values, index, bias)
        else:
            if compiling:  # the rule the eager path applied above
                x2, V, U, bias = _autocast.cast((x2, V, U, bias), _CAST, dev)
            with torch.autocast(dev, enabled=False):
                y = engine.dense_forward(x2, V, U, lambda_l, s_values, index, bias)
        return y if x.dim() == 2 else y.reshape(*lead, n_out)
    if compiling:
        # without a layout, the op builds it at run time (and caches it): a data-dependent build would break the
        # graph
        y, _ = torch.ops.frod.frod_linear_fwd(x2, V, U, lambda_l, s_values, s_indices, layout, bias, p, keep)
        return y.reshape(*lead, n_out)
    lay = layout_of(s_indices, layout, n_in, nnz)
    k = dispatch.kernels(dev)
    if autocast:
        with torch.autocast(dev, enabled=False):
            y = _FrodLinear.apply(x2, lambda_l, s_values, bias, V, U, lay, p, keep, k)
    else:
        y = _FrodLinear.apply(x2, lambda_l, s_values, bias, V, U, lay, p, keep, k)
    return y if x.dim() == 2 else y.reshape(*lead, n_out)


class _FrodLinear(torch.autograd.Function):
    """The eager layer call: :func:`frod_kernels.engine.forward` and ``backward`` with the resolved kernels."""

    @staticmethod
    def forward(ctx, x, lambda_l, s_values, bias, V, U, lay, path, keep_weight, k):
        y, saved = engine.forward(x, V, U, lambda_l, s_values, lay, bias, path, keep_weight, k)
        # the activations through save_for_backward, so checkpointing and saved-tensor hooks see them; the frozen
        # tensors and the layout as attributes, which costs less and which nothing rewrites
        ctx.save_for_backward(x if path == engine.MATERIALIZED else None, saved, lambda_l, s_values)
        ctx.V, ctx.U, ctx.lay, ctx.path, ctx.k = V, U, lay, path, k
        return y

    @staticmethod
    def backward(ctx, g):
        need_x, need_lambda, need_s, need_bias = ctx.needs_input_grad[:4]
        x, saved, lambda_l, s_values = ctx.saved_tensors
        if not g.is_contiguous():
            g = g.contiguous()
        dev = g.device.type
        if _autocast_on(dev):
            with torch.autocast(dev, enabled=False):
                dx, dlam, ds = engine.backward(g, x, saved, ctx.V, ctx.U, lambda_l, s_values, ctx.lay, ctx.path,
                                               need_x, need_lambda, need_s, ctx.k)
        else:
            dx, dlam, ds = engine.backward(g, x, saved, ctx.V, ctx.U, lambda_l, s_values, ctx.lay, ctx.path,
                                           need_x, need_lambda, need_s, ctx.k)
        return dx, dlam, ds, (g.sum(0) if need_bias else None), None, None, None, None, None, None


def _cached_dense_index(s_indices: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """:func:`frod_kernels.engine.dense_index`, cached per pattern, which is checked first as a layout build checks
    it: a duplicate or diagonal position would otherwise be written over silently."""
    def build():
        check_pattern(s_indices, n)
        # a normal tensor even when first built in inference mode: a later training call saves it for backward
        with torch.inference_mode(False):
            return engine.dense_index(s_indices, n)

    return DERIVED.get(s_indices, ("dense-index", n), build)


def _autocast_on(device_type: str) -> bool:
    # autocast has no state for other device types (meta) and raises when asked
    return device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type)


def _measured_path(cost_model_path, x2, V, U, lambda_l, s_values, s_indices, layout, bias, training, keep) -> int:
    """:func:`frod_kernels.autotune.pick_path` for this call: each candidate path runs this call's forward (and,
    training, a backward with the output as its gradient: no draw from the caller's RNG, whose stream dropout
    and data order depend on) on detached copies of its inputs, outside autograd."""
    key = autotune.path_key(x2.shape[0], V.shape[0], U.shape[0], s_values.shape[0], x2.dtype, x2.device, training)
    lay = layout_of(s_indices, layout, V.shape[0], s_values.shape[0])
    k = dispatch.kernels(x2.device.type)

    def run(p: int) -> Tensor:
        xd, lam, s = x2.detach(), lambda_l.detach(), s_values.detach()
        y, saved = engine.forward(xd, V, U, lam, s, lay, None if bias is None else bias.detach(), p, keep, k)
        if training:
            engine.backward(y, xd if p == engine.MATERIALIZED else None, saved, V, U, lam, s, lay, p,
                            x2.requires_grad, lambda_l.requires_grad, s_values.requires_grad, k)
        return y

    # the kernel paths only: the dense one is chosen by the host-time model where that was measured (the CPU)
    return autotune.pick_path(key, x2.device, engine.KERNEL_PATH_NAMES, run, cost_model_path)


def _path_from_name(name: str) -> int:
    if name not in _PATHS:
        raise ValueError(f"path must be one of {sorted(_PATHS)}, got {name!r}")
    return _PATHS[name]
