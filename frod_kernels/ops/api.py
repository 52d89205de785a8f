""":func:`frod_linear`, the public op: argument checks, the path choice, and the call of the engine (eagerly through
:class:`_FrodLinear`, under ``torch.compile`` through the custom ops of :mod:`.frod_linear`).

Host time. A training step calls each layer with the same tensors in the same states (an optimizer step writes
the trainable ones in place), so what the checks and the setup found is kept per layer in a :class:`_Call` and a
call that finds its arguments unchanged does only :meth:`_Call.holds`: identity and state reads, no check."""

from __future__ import annotations

import weakref
from typing import Optional

import torch
from torch import Tensor

from .. import _validation, autotune, cost_model, dispatch, engine, registry
from .._numerics import FLOAT_DTYPE_SET
from .._tensor_cache import DERIVED
from ..autotune.state import MEASURED_DEVICE_TYPES, STATE
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
    return layer_call(x, V, U, False, lambda_l, s_values, s_indices, bias, layout, path)


def layer_call(x, V, u, transposed: bool, lambda_l, s_values, s_indices, bias, layout, path) -> Tensor:
    """:func:`frod_linear` with ``u`` either ``U`` or, ``transposed``, ``U^T`` (in x out): the dense path
    multiplies by ``U^T``, so a caller that stores it (:class:`frod_kernels.FrodLinear`) passes it and no view is
    made per call."""
    if torch.compiler.is_compiling():
        U = u.t() if transposed else u
        _validation.check_frod_args(x, V, U, lambda_l, s_values, s_indices, bias, layout)
        return _traced(x, V, U, lambda_l, s_values, s_indices, bias, layout, path)
    forced = None if path is None else _path_from_name(path)
    call = _CALLS.get(id(lambda_l))
    if call is None or not call.holds(x, V, u, transposed, lambda_l, s_values, s_indices, bias, layout):
        _validation.check_frod_args(x, V, u.t() if transposed and isinstance(u, Tensor) else u, lambda_l, s_values,
                                    s_indices, bias, layout)
        call = _Call(x, V, u, transposed, lambda_l, s_values, s_indices, bias, layout)
    return call.run(x, V, u, lambda_l, s_values, s_indices, bias, layout, forced)


_CALLS: dict[int, "_Call"] = {}


def _none() -> None:
    return None


class _Call:
    """One layer's arguments as checked, and what follows from them: the pattern's layouts, the path. Kept per
    ``lambda_l`` (one per layer) while the arguments hold: :meth:`holds` reads their identities and states, which
    costs a fraction of the checks, and after an optimizer step (the trainable tensors written in place) re-runs
    only their finite checks. Holds weak references only: it keeps no tensor alive."""

    __slots__ = ("device", "n_in", "n_out", "nnz", "transposed", "autocast", "mode", "refs", "u", "u_view", "state",
                 "generation", "tuning", "index", "lay", "choice", "dtype")

    def __init__(self, x, V, u, transposed, lambda_l, s_values, s_indices, bias, layout) -> None:
        self.device, self.transposed = x.device, transposed
        self.n_in, self.n_out, self.nnz = V.shape[0], u.shape[1 if transposed else 0], s_values.shape[0]
        self.index = self.lay = self.choice = None
        # the dtype the call runs in without casts: V's, where U and bias share it (a kept call's tensors keep
        # theirs: a cast is another tensor, a .data swap another state)
        self.dtype = V.dtype if u.dtype is V.dtype and (bias is None or bias.dtype is V.dtype) else None
        self.autocast = x.device.type if x.device.type in _AUTOCAST_DEVICE_TYPES else None
        mode = self.mode = _validation.finite_mode()
        if mode is True or (mode is not False and not _validation.reads_values(mode, x)) or any(
                t is not None and t.is_inference() for t in (V, u, lambda_l, s_values, s_indices, bias, layout)):
            # values to be read every call, or none readable now, or a tensor without a version counter: such a
            # call is checked in full every time, as it is not kept
            return
        key = id(lambda_l)
        base = u._base
        self.refs = (weakref.ref(V), weakref.ref(lambda_l, lambda _, key=key: _CALLS.pop(key, None)),
                     weakref.ref(s_values), weakref.ref(s_indices), _none if bias is None else weakref.ref(bias),
                     _none if layout is None else weakref.ref(layout))
        # U by identity, or a view of U made anew per call (U_t.t()) by its base and geometry
        self.u = weakref.ref(u)
        self.u_view = None if base is None else (weakref.ref(base), u.shape, u.stride())
        self.state = _state(V, u, lambda_l, s_values, s_indices, bias, layout)
        self.generation, self.tuning = registry.generation, STATE.generation
        _CALLS[key] = self

    def holds(self, x, V, u, transposed, lambda_l, s_values, s_indices, bias, layout) -> bool:
        """Whether the arguments are those checked, in the states checked (the trainable tensors' versions apart:
        a write by an optimizer step re-runs their finite checks here)."""
        refs = self.refs
        if not (refs[1]() is lambda_l and refs[0]() is V and refs[2]() is s_values and refs[3]() is s_indices
                and refs[4]() is bias and refs[5]() is layout and transposed is self.transposed):
            return False
        if self.u() is not u:
            view = self.u_view
            if view is None or u._base is not view[0]() or u.shape != view[1] or u.stride() != view[2]:
                return False
        try:
            if not (x.dtype in FLOAT_DTYPE_SET and x.layout is torch.strided and x.shape[-1] == self.n_in
                    and x.device == self.device):
                return False
        except (AttributeError, TypeError, IndexError):  # no tensor, or no dims: the full checks name it
            return False
        if ((V.requires_grad or u.requires_grad) and torch.is_grad_enabled()
                or registry.generation != self.generation or STATE.generation != self.tuning
                or _validation.finite_mode() != self.mode):
            return False
        state = _state(V, u, lambda_l, s_values, s_indices, bias, layout)
        if state != self.state:
            if state[_TRAINED_VERSIONS:] != self.state[_TRAINED_VERSIONS:]:
                return False
            # only the trainable tensors were written (an optimizer step): their finite checks, where "auto" reads
            if self.mode is not False:
                _validation.check_trainable_finite(x.device, lambda_l, s_values, bias)
            self.state = state
        return True

    def run(self, x, V, u, lambda_l, s_values, s_indices, bias, layout, path: Optional[int]) -> Tensor:
        flat = x.dim() == 2
        x2 = x if flat else x.reshape(-1, self.n_in)
        autocast = self.autocast is not None and torch.is_autocast_enabled(self.autocast)
        if autocast:
            # the custom op's autocast rule, applied here; the call then runs with autocast off
            x2, V, u, bias = _autocast.cast((x2, V, u, bias), _CAST, self.autocast)
        if x2.dtype is not self.dtype:
            V, u, bias = _in_dtype(x2.dtype, V, u, bias)
        training = _training(x, lambda_l, s_values, bias)
        if path is not None:
            p, keep = path, training and cost_model.KEEP_MATERIALIZED_WEIGHT.get(x2.device.type, False)
        else:
            choice = self.choice
            if choice is None or choice[0] != x2.shape[0] or choice[1] is not training:
                choice = self._choose(x2, V, u, lambda_l, s_values, s_indices, bias, layout, training)
            p, keep = choice[2], choice[3]
        if autocast:
            with torch.autocast(self.autocast, enabled=False):
                y = self._apply(p, keep, x2, V, u, lambda_l, s_values, s_indices, bias, layout)
        else:
            y = self._apply(p, keep, x2, V, u, lambda_l, s_values, s_indices, bias, layout)
        return y if flat else y.reshape(*x.shape[:-1], self.n_out)

    def _choose(self, x2, V, u, lambda_l, s_values, s_indices, bias, layout, training) -> tuple:
        """(tokens, training, path, keep W'), kept for the next call where no choice is measured: under ``"auto"``
        on a device whose choices can be, whether this call is measured depends on more than the shape
        (deterministic mode, a CUDA graph being captured: :func:`frod_kernels.autotune.measures`), so it is asked
        again each call."""
        b, dev = x2.shape[0], x2.device.type
        keep = training and cost_model.KEEP_MATERIALIZED_WEIGHT.get(dev, False)
        auto = registry.get_backend() == "auto"
        measured = auto and autotune.measures(x2.device)
        # The dense path runs no kernel and is there for the host's time: not a choice when a backend was named
        # (its kernels are to run) or among measured choices (devices where the host's time was not measured)
        p = cost_model.choose_path(b, self.n_in, self.n_out, self.nnz, dev, training, not auto or measured)
        if measured:
            p = _measured_path(p, x2, V, u.t() if self.transposed else u, lambda_l, s_values,
                               self.layout(s_indices, layout), bias, training, keep)
        choice = (b, training, p, keep)
        if not auto or dev not in MEASURED_DEVICE_TYPES:
            self.choice = choice
        return choice

    def _apply(self, p, keep, x2, V, u, lambda_l, s_values, s_indices, bias, layout) -> Tensor:
        if p == engine.DENSE:
            if self.index is None:
                self.index = _cached_dense_index(s_indices, self.n_in)
            return engine.dense_forward(x2, V, u if self.transposed else u.t(), lambda_l, s_values, self.index, bias)
        return _FrodLinear.apply(x2, lambda_l, s_values, bias, V, u.t() if self.transposed else u,
                                 self.layout(s_indices, layout), p, keep, dispatch.kernels(x2.device.type))

    def layout(self, s_indices, layout):
        if self.lay is None:
            self.lay = layout_of(s_indices, layout, self.n_in, self.nnz)
        return self.lay


def _state(V, u, lambda_l, s_values, s_indices, bias, layout) -> tuple:
    """The trainable tensors' versions (what an optimizer step changes), then what a write or a ``.data`` swap of
    any argument changes: the frozen tensors' versions and every storage. One flat tuple, compared once per call."""
    return (lambda_l._version, s_values._version, None if bias is None else bias._version,
            lambda_l.data_ptr(), s_values.data_ptr(), None if bias is None else bias.data_ptr(),
            V._version, V.data_ptr(), u._version, u.data_ptr(), s_indices._version, s_indices.data_ptr(),
            None if layout is None else layout._version, None if layout is None else layout.data_ptr())


# where _state's entries that an optimizer step leaves alone begin
_TRAINED_VERSIONS = 3


def _in_dtype(dtype, V, U, bias):
    """``V``, ``U`` and ``bias`` in the compute dtype (cast per call where the caller stores them in another)."""
    if V.dtype != dtype:
        V = V.to(dtype)
    if U.dtype != dtype:
        U = U.to(dtype)
    if bias is not None and bias.dtype != dtype:
        bias = bias.to(dtype)
    return V, U, bias


def _training(x, lambda_l, s_values, bias) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or lambda_l.requires_grad or s_values.requires_grad
                                        or (bias is not None and bias.requires_grad))


def _traced(x, V, U, lambda_l, s_values, s_indices, bias, layout, path) -> Tensor:
    """:func:`frod_linear` under ``torch.compile``: the custom op (with its own autocast rule), or the dense path's
    plain ops, traced as they are. The dense path is not a choice of the cost model here: a compiled graph has no
    per-op host time."""
    n_in, n_out = V.shape[0], U.shape[0]
    x2 = x if x.dim() == 2 else x.reshape(-1, n_in)
    dev = x.device.type
    V, U, bias = _in_dtype(x2.dtype, V, U, bias)
    training = _training(x, lambda_l, s_values, bias)
    keep = training and cost_model.KEEP_MATERIALIZED_WEIGHT.get(dev, False)
    if path is not None:
        p = _path_from_name(path)
    else:
        p = cost_model.choose_path(x2.shape[0], n_in, n_out, s_values.shape[0], dev, training, True)
    if p == engine.DENSE:
        index = engine.dense_index(s_indices, n_in)
        if _autocast_on(dev):
            x2, V, U, bias = _autocast.cast((x2, V, U, bias), _CAST, dev)
            with torch.autocast(dev, enabled=False):
                y = engine.dense_forward(x2, V, U.t(), lambda_l, s_values, index, bias)
        else:
            y = engine.dense_forward(x2, V, U.t(), lambda_l, s_values, index, bias)
    else:
        # without a layout, the op builds it at run time (and caches it): a data-dependent build would break the
        # graph
        y, _ = torch.ops.frod.frod_linear_fwd(x2, V, U, lambda_l, s_values, s_indices, layout, bias, p, keep)
    return y.reshape(*x.shape[:-1], n_out)


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


# autocast has no state for other device types (meta) and raises when asked
_AUTOCAST_DEVICE_TYPES = ("cpu", "cuda")


def _autocast_on(device_type: str) -> bool:
    return device_type in _AUTOCAST_DEVICE_TYPES and torch.is_autocast_enabled(device_type)


def _measured_path(cost_model_path, x2, V, U, lambda_l, s_values, lay, bias, training, keep) -> int:
    """:func:`frod_kernels.autotune.pick_path` for this call: each candidate path runs this call's forward (and,
    training, a backward with the output as its gradient: no draw from the caller's RNG, whose stream dropout
    and data order depend on) on detached copies of its inputs, outside autograd."""
    key = autotune.path_key(x2.shape[0], V.shape[0], U.shape[0], s_values.shape[0], x2.dtype, x2.device, training)
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
