"""The FRoD ops, declared once as torch custom ops (``torch.ops.frod.*``).

* ``frod::row_gather_diag`` and ``frod::sampled_dot_diag``: the two kernel families of DESIGN.md section 6. Their
  bodies look up the selected backend's implementation (:mod:`frod_kernels._backends`); torch, Triton and CUDA C++
  are implementations of these same schemas.
* ``frod::frod_linear_fwd`` / ``frod::frod_linear_bwd``: the whole layer, composed of the two families and dense
  matmuls (:mod:`frod_kernels.engine`), with autograd registered on the forward. ``torch.compile`` sees each as
  one opaque op whose output shapes the fake implementations give.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _backends, autotune, engine
from ._validation import check_frod_args
from .layout import PatternLayout, pattern_layout
from .torch_backend import acc_dtype


@torch.library.custom_op("frod::row_gather_diag", mutates_args=())
def row_gather_diag(A: Tensor, diag: Tensor, weights: Tensor, ptr: Tensor, src: Tensor) -> Tensor:
    """``out[r] = diag[r] * A[r] + sum_{k in [ptr[r], ptr[r+1])} weights[k] * A[src[k]]``.

    A: (n, m), any strides, float16/bfloat16/float32/float64. diag: (n,). weights: (nnz,), in group order.
    ptr: (n+1,) int64 group offsets. src: (nnz,) int64 source rows. Returns a new (n, m) tensor of A's dtype,
    accumulated in float32 (float64 for float64).
    """
    return _backends.resolve("row_gather_diag", A.device)(A, diag, weights, ptr, src)


@row_gather_diag.register_fake
def _(A, diag, weights, ptr, src):
    return torch.empty(A.shape, dtype=A.dtype, device=A.device)


@torch.library.custom_op("frod::sampled_dot_diag", mutates_args=())
def sampled_dot_diag(P: Tensor, Q: Tensor, ptr: Tensor, src: Tensor) -> tuple[Tensor, Tensor]:
    """``vals[k] = <P[a_k], Q[src[k]]>`` with ``a_k`` the group (row) of k, and ``diag[j] = <P[j], Q[j]>``.

    P, Q: (n, m), any strides, same dtype. Returns (vals (nnz,), diag (n,)) in float32 (float64 for float64).
    """
    return _backends.resolve("sampled_dot_diag", P.device)(P, Q, ptr, src)


@sampled_dot_diag.register_fake
def _(P, Q, ptr, src):
    acc = acc_dtype(P.dtype)
    return P.new_empty(src.shape[0], dtype=acc), P.new_empty(P.shape[0], dtype=acc)


def _layout(s_indices: Tensor, layout: Optional[Tensor], n: int, nnz: int) -> PatternLayout:
    if layout is None:
        return pattern_layout(s_indices, n)
    return PatternLayout.unpack(layout, n, nnz)


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
    lay = _layout(s_indices, layout, V.shape[0], s_values.shape[0])
    return engine.forward(x, V, U, lambda_l, s_values, lay, bias, path, keep_weight)


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
    lay = _layout(s_indices, layout, V.shape[0], s_values.shape[0])
    dx, dlam, ds = engine.backward(g, x, saved, V, U, lambda_l, s_values, lay, path, need_x, need_lambda, need_s)
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
        raise RuntimeError("frod_linear: V and U are frozen; call .requires_grad_(False) on them (they are the "
                           "shared basis and per-layer projection, not trainable parameters)")
    dx, dlam, ds, dbias = torch.ops.frod.frod_linear_bwd(
        gy.contiguous(), x, saved, V, U, lambda_l, s_values, s_indices, layout, ctx.path,
        need[0], need[3], need[4], need[7],
    )
    return (dx if need[0] else None, None, None, dlam if need[3] else None, ds if need[4] else None, None, None,
            dbias.to(gy.dtype) if need[7] else None, None, None)


frod_linear_fwd.register_autograd(_backward, setup_context=_setup_context)


# torch.autocast follows PyTorch's rule for linear layers: the activations and the frozen V, U (and bias) are cast
# to the autocast dtype, as F.linear casts its input, weight and bias. lambda_l and s_values keep their own dtype
# (float32 under PEFT's adapter autocast, like an optimizer's master weights): the kernels accumulate in float32
# anyway, so keeping them costs nothing and their gradients are never rounded to half precision. (The stock
# torch.library.register_autocast cannot express this: it casts every floating input to one fixed dtype.)
# Every FRoD op then runs with autocast off, including the backward and the two families when backward is
# called inside an autocast region: the kernels choose their own precision, and the torch backend's CSR kernels
# take no half-precision operands that autocast's matmul rule would hand them.
_AUTOCAST_CAST_ARGS = {"frod_linear_fwd": (0, 1, 2, 7), "frod_linear_bwd": (), "row_gather_diag": (),
                       "sampled_dot_diag": ()}
_autocast_lib = torch.library.Library("frod", "FRAGMENT")


def _autocast_kernel(op, device_type: str, cast_args: tuple[int, ...]):
    key = getattr(torch._C.DispatchKey, "Autocast" + torch._C._dispatch_key_for_device(device_type))
    keyset = torch._C.DispatchKeySet(key)

    def kernel(_keyset, *args):
        if cast_args:
            dtype = torch.get_autocast_dtype(device_type)
            # autocast's eligibility rule: floating tensors on this device type, never float64
            args = tuple(
                a.to(dtype) if i in cast_args and isinstance(a, Tensor) and a.is_floating_point()
                and a.device.type == device_type and a.dtype != torch.float64 else a
                for i, a in enumerate(args))
        with torch._C._ExcludeDispatchKeyGuard(keyset):
            return op(*args)

    return kernel


for _name, _cast_args in _AUTOCAST_CAST_ARGS.items():
    for _device_type in ("cpu", "cuda"):
        _autocast_lib.impl(_name, _autocast_kernel(getattr(torch.ops.frod, _name).default, _device_type, _cast_args),
                           "Autocast" + torch._C._dispatch_key_for_device(_device_type), with_keyset=True)


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
        U: (out, in) frozen per-layer projection, cast like ``V``.
        lambda_l: (in,) trainable diagonal, any float dtype (PEFT keeps it float32 under its adapter autocast).
        s_values: (nnz,) trainable off-diagonal values of S, same dtype rules as ``lambda_l``.
        s_indices: (2, nnz) int64 COO positions of S (rows, then columns), PEFT's layout: off-diagonal, in range,
            no duplicates. Its derived layouts are built on first use and cached.
        bias: optional (out,) bias, trainable if it requires grad.
        layout: optional packed layout (:func:`frod_kernels.layout.build_layout` ``(...).packed``) to use instead
            of the cache; :class:`frod_kernels.FrodLinear` passes its own so compiled graphs take it as an input.
        path: force ``"sparse"``, ``"factored"`` or ``"materialized"`` instead of the cost model's choice.

    Returns:
        (..., out) tensor of ``x``'s dtype.

    Gradients flow to ``x``, ``lambda_l``, ``s_values`` and ``bias`` (first order). ``V`` and ``U`` must not
    require grad.
    """
    check_frod_args(x, V, U, lambda_l, s_values, s_indices, bias, layout)
    n_in, n_out = V.shape[0], U.shape[0]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, n_in)
    cd = x.dtype
    V, U = V.to(cd), U.to(cd)
    if bias is not None:
        bias = bias.to(cd)
    if layout is None and not torch.compiler.is_compiling():
        layout = pattern_layout(s_indices, n_in).packed
    training = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, lambda_l, s_values, bias)
    )
    dev = x.device.type
    keep = training and engine.KEEP_MATERIALIZED_WEIGHT.get(dev, False)
    if path is not None:
        p = _path_from_name(path)
    else:
        p = engine.choose_path(x2.shape[0], n_in, n_out, s_values.shape[0], dev, training)
        if (not torch.compiler.is_compiling() and _backends.get_backend() == "auto"
                and autotune.measures(x2.device)):
            p = _measured_path(p, x2, V, U, lambda_l, s_values, s_indices, layout, bias, training, keep)
    y, _ = torch.ops.frod.frod_linear_fwd(x2, V, U, lambda_l, s_values, s_indices, layout, bias, p, keep)
    return y.reshape(*lead, n_out)


def _measured_path(cost_model_path, x2, V, U, lambda_l, s_values, s_indices, layout, bias, training, keep) -> int:
    """:func:`frod_kernels.autotune.pick_path` for this call: each candidate path runs this call's forward (and,
    training, a backward with the output as its gradient: no draw from the caller's RNG, whose stream dropout
    and data order depend on) on detached copies of its inputs, outside autograd."""
    key = autotune.path_key(x2.shape[0], V.shape[0], U.shape[0], s_values.shape[0], x2.dtype, x2.device, training)

    def run(p: int) -> Tensor:
        xd, lam, s = x2.detach(), lambda_l.detach(), s_values.detach()
        y, saved = torch.ops.frod.frod_linear_fwd(xd, V, U, lam, s, s_indices, layout,
                                                  None if bias is None else bias.detach(), p, keep)
        if training:
            torch.ops.frod.frod_linear_bwd(y, xd if p == engine.MATERIALIZED else None, saved,
                                           V, U, lam, s, s_indices, layout, p, x2.requires_grad,
                                           lambda_l.requires_grad, s_values.requires_grad,
                                           bias is not None and bias.requires_grad)
        return y

    return autotune.pick_path(key, x2.device, engine.PATH_NAMES, run, cost_model_path)


def _path_from_name(name: str) -> int:
    for k, v in engine.PATH_NAMES.items():
        if v == name:
            return k
    raise ValueError(f"path must be one of {sorted(engine.PATH_NAMES.values())}, got {name!r}")
