"""Input checks for the public entry points: every error names the argument, what it got and what was expected.

Shape, dtype, device and pattern checks always run (host-side metadata, checked once per state of a layer's
arguments: :class:`frod_kernels.ops.api._Call`; plus one pass over the pattern when its layout is first built).
Non-finite checks read tensor data, which on a GPU costs a device sync per checked tensor, so they have a switch,
:func:`set_checks` / :func:`checks` (or ``FROD_CHECK_FINITE=auto|1|0``):

* ``"auto"`` (default): only what costs no per-step sync. The frozen ``V`` and ``U`` are checked once per tensor
  version on any device (one sync per layer per process on a GPU, then never again); the trainable ``lambda_l``,
  ``s_values`` and ``bias`` (``in + nnz + out`` elements, noise next to any matmul) are checked once per version
  (each optimizer step writes them) when they live on the CPU, where reading them needs no sync.
  ``FrodLinear.from_linear`` and ``replace_linears`` check the base weights once when they build the projections.
* ``True``: every tensor input, ``x`` included, on every call and every device (a sync per call on a GPU): for
  hunting where a NaN enters.
* ``False``: none (shape and pattern checks still run).

Checks are skipped while ``torch.compile`` traces (a data-dependent branch would break the graph) and while a CUDA
graph is being captured (a sync is illegal there).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator, Union

import torch

from . import _env
from ._numerics import FLOAT_DTYPES
from ._tensor_cache import TensorCache
from .layout import packed_size


def check_tensor(name: str, t, *, dim: int | None = None, dtypes=FLOAT_DTYPES) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise TypeError(f"{name}: expected a dense (strided) tensor, got layout {t.layout}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name}: expected a {dim}-D tensor, got shape {tuple(t.shape)}")


def check_frod_args(x, V, U, lambda_l, s_values, s_indices, bias, layout=None) -> None:
    """Every argument of :func:`frod_kernels.frod_linear`, in full. A training step calls each layer with the same
    tensors in the same states, so :func:`frod_kernels.frod_linear` runs this only when a layer's arguments changed
    (:class:`frod_kernels.ops.api._Call`): after an optimizer step only the trainable tensors' finite checks re-run
    (:func:`check_trainable_finite`)."""
    check_tensor("x", x)
    if x.dim() < 1:
        raise ValueError("x: expected shape (..., in_features), got a 0-D tensor")
    mode = finite_mode()
    compiling = torch.compiler.is_compiling()
    # traced, the metadata checks become guards and no value is read
    _check_arguments(x.device, V, U, lambda_l, s_values, s_indices, bias, layout,
                     not compiling and reads_values(mode, x))
    n = V.shape[0]
    if x.shape[-1] != n:
        raise ValueError(f"x: expected last dim in_features={n} (from V), got shape {tuple(x.shape)}")
    if (V.requires_grad or U.requires_grad) and torch.is_grad_enabled():
        name = "V" if V.requires_grad else "U"
        raise ValueError(f"{name}: must not require grad (FRoD keeps the basis and projection frozen); "
                         f"call {name}.requires_grad_(False)")
    if mode is True and not compiling and reads_values(mode, x):
        for name, t in (("x", x), ("lambda_l", lambda_l), ("s_values", s_values), ("bias", bias)):
            if t is not None and _checkable(t):
                check_finite(name, t)


def reads_values(mode, x) -> bool:
    """Whether the finite checks may read tensors now: not switched off, and no CUDA graph being captured (a sync is
    illegal there)."""
    return mode is not False and not (x.device.type == "cuda" and torch.cuda.is_current_stream_capturing())


# The frozen tensors' finite checks that passed, per tensor state: an entry holds True, and a failing check raises
# before one is made.
_ONCE = TensorCache()


def _check_arguments(device: torch.device, V, U, lambda_l, s_values, s_indices, bias, layout, finite: bool) -> None:
    """All but ``x``'s shape, grad mode and the requires_grad flags. ``finite``: also the values that "auto" reads
    (V and U on any device, once per state: a sync on a GPU; the trainable tensors on the CPU only)."""
    _check_basis(V)
    n = V.shape[0]
    _check_projection(U, n)
    check_tensor("lambda_l", lambda_l, dim=1)
    if lambda_l.shape[0] != n:
        raise ValueError(f"lambda_l: expected shape ({n},), got {tuple(lambda_l.shape)}")
    check_tensor("s_values", s_values, dim=1)
    check_tensor("s_indices", s_indices, dim=2, dtypes=(torch.int64, torch.int32))
    if s_indices.shape[0] != 2:
        raise ValueError(f"s_indices: expected shape (2, nnz), got {tuple(s_indices.shape)}")
    if s_indices.shape[1] != s_values.shape[0]:
        raise ValueError(f"s_values: expected {s_indices.shape[1]} values (one per column of s_indices), "
                         f"got shape {tuple(s_values.shape)}")
    if bias is not None:
        check_tensor("bias", bias, dim=1)
        if bias.shape[0] != U.shape[0]:
            raise ValueError(f"bias: expected shape ({U.shape[0]},) (out_features, from U), got {tuple(bias.shape)}")
    for name, t in (("V", V), ("U", U), ("lambda_l", lambda_l), ("s_values", s_values), ("s_indices", s_indices),
                    ("bias", bias)):
        if t is not None and t.device != device:
            raise ValueError(f"{name}: expected device {device} (the device of x), got {t.device}")
    if layout is not None:
        check_layout(layout, n, s_indices.shape[1], device)
    if finite:
        # V and U per their own state: a call whose trainable tensors are fresh wrappers (a detach() or .to() per
        # call) misses the argument cache, and must not read in^2 + in x out elements again for it
        for name, t in (("V", V), ("U", U)):
            if _checkable(t):
                _ONCE.get(t, "finite", lambda name=name, t=t: check_finite(name, t) or True)
        check_trainable_finite(device, lambda_l, s_values, bias)


def check_trainable_finite(device: torch.device, lambda_l, s_values, bias) -> None:
    """"auto"'s finite checks of the trainable tensors: on the CPU only, where reading them needs no sync."""
    if device.type == "cpu":
        for name, t in (("lambda_l", lambda_l), ("s_values", s_values), ("bias", bias)):
            if t is not None and _checkable(t):
                check_finite(name, t)


def _check_basis(V) -> None:
    check_tensor("V", V, dim=2)
    if V.shape[1] != V.shape[0]:
        raise ValueError(f"V: expected a square (in, in) basis, got shape {tuple(V.shape)}")


def _check_projection(U, n: int) -> None:
    check_tensor("U", U, dim=2)
    if U.shape[1] != n:
        raise ValueError(f"U: expected shape (out, {n}), got {tuple(U.shape)}")


def check_layout(layout, n: int, nnz: int, device: torch.device) -> None:
    """A packed layout passed by the caller must at least be the layout of an (n, nnz) pattern on x's device."""
    check_tensor("layout", layout, dim=1, dtypes=(torch.int64,))
    want = packed_size(n, nnz)
    if layout.shape[0] != want:
        raise ValueError(f"layout: expected the packed layout of a pattern with in_features={n} and nnz={nnz} "
                         f"({want} int64 entries, frod_kernels.layout.build_layout(s_indices, {n}).packed), "
                         f"got {layout.shape[0]} entries")
    if layout.device != device:
        raise ValueError(f"layout: expected device {device} (the device of x), got {layout.device}")


# ---- non-finite checks ------------------------------------------------------------------------------------------

def _finite_from_env() -> Union[str, bool]:
    return _env.flag("FROD_CHECK_FINITE", "auto", extra=("auto",))


_global_finite: Union[str, bool] = _finite_from_env()
_local = threading.local()
_UNSET = object()


def _check_finite_mode(finite) -> Union[str, bool]:
    # identity, not equality: 1 == True and 0 == False, and a typo'd int should not pass as a bool
    if not (finite is True or finite is False or (isinstance(finite, str) and finite == "auto")):
        raise ValueError(f"finite: expected 'auto', True or False, got {finite!r}")
    return finite


def get_checks() -> dict:
    """The current check settings, e.g. ``{"finite": "auto"}``."""
    return {"finite": finite_mode()}


def set_checks(*, finite: Union[str, bool]) -> None:
    """Set the non-finite checks for all later calls: ``"auto"`` (default), ``True`` or ``False`` (see module doc)."""
    global _global_finite
    _global_finite = _check_finite_mode(finite)


@contextlib.contextmanager
def checks(*, finite: Union[str, bool]) -> Iterator[None]:
    """Context manager form of :func:`set_checks`, local to the current thread."""
    mode = _check_finite_mode(finite)
    prev = _local.__dict__.get("finite", _UNSET)
    _local.finite = mode
    try:
        yield
    finally:
        if prev is _UNSET:
            del _local.finite
        else:
            _local.finite = prev


def finite_mode() -> Union[str, bool]:
    # the thread's dict, not getattr with a default: that raises and catches an AttributeError per call outside a
    # checks() block (0.7 µs, paid by every layer call)
    return _local.__dict__.get("finite", _global_finite)


def check_finite(name: str, t: torch.Tensor) -> None:
    """Raise ValueError naming ``name`` if ``t`` holds a NaN or an infinity (reads ``t``: a sync on a GPU)."""
    bad = ~torch.isfinite(t.detach())
    if bool(bad.any()):
        count = int(bad.sum())
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{name}: expected finite values, got {count} NaN/inf of {t.numel()} (first at index "
                         f"{first}, value {t.detach()[first].item()}); frod_kernels.set_checks(finite=False) "
                         f"turns this check off")


def _checkable(t: torch.Tensor) -> bool:
    return t.device.type != "meta" and t.numel() > 0


# ---- options of FrodLinear.from_linear / replace_linears --------------------------------------------------------

def _is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_sparse_rate(sparse_rate) -> None:
    if not _is_real(sparse_rate) or not 0.0 <= sparse_rate <= 1.0:
        raise ValueError(f"sparse_rate: expected a fraction in [0, 1] (of the in x in positions that train), "
                         f"got {sparse_rate!r}")


def check_layer_options(*, sparse_rate, seed, dropout, adapter_dtype, regularization_alpha,
                        projection_method="exact") -> None:
    """The scalar options shared by ``FrodLinear.from_linear`` and ``replace_linears``."""
    if projection_method not in ("exact", "fast"):
        raise ValueError(f"projection_method: expected 'exact' (PEFT's V, bitwise) or 'fast' (saved projections), "
                         f"got {projection_method!r}")
    check_sparse_rate(sparse_rate)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed: expected an int (PEFT's projection_prng_key), got {type(seed).__name__} {seed!r}")
    if not _is_real(dropout) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout: expected a probability in [0, 1), got {dropout!r}")
    if adapter_dtype is not None and (not isinstance(adapter_dtype, torch.dtype) or adapter_dtype not in FLOAT_DTYPES):
        raise TypeError(f"adapter_dtype: expected None or one of {[str(d) for d in FLOAT_DTYPES]}, "
                        f"got {adapter_dtype!r}")
    if not _is_real(regularization_alpha) or not regularization_alpha >= 0 or regularization_alpha == float("inf"):
        raise ValueError(f"regularization_alpha: expected a finite number >= 0, got {regularization_alpha!r}")


def check_base_weight(name: str, weight: torch.Tensor) -> None:
    """A base weight the projections are computed from: floating point, and finite unless checks are off (a NaN
    there makes V, U and lambda_l NaN for the whole category). Runs once, when the layers are built."""
    check_tensor(name, weight, dim=2)
    if finite_mode() is not False and _checkable(weight):
        check_finite(name, weight)
