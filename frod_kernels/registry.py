"""Backend registry: which implementation of each kernel-family op runs.

The op schemas live in :mod:`frod_kernels.ops` and are declared once. A backend (``torch``, ``triton``, ``cuda``)
registers an implementation per op name with :func:`register_impl`; the op's body asks :func:`resolve` for the
implementation to run on the tensor's device. Selection is a table lookup, never a branch per backend in the op.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, Iterator

import torch

BACKENDS = ("torch", "triton", "cuda")
_CHOICES = ("auto",) + BACKENDS

# op name -> backend name -> implementation
_IMPLS: dict[str, dict[str, Callable]] = {}
# backend name -> probe returning None when it can run on `device_type`, else the reason it cannot
_PROBES: dict[str, Callable[[str], "str | None"]] = {}
# "auto"'s candidates per device type, in the fixed order used wherever nothing is measured (frod_kernels.autotune)
AUTO_ORDER: dict[str, list[str]] = {"cuda": ["cuda", "triton", "torch"], "cpu": ["torch"]}

_global_backend = "auto"


def register_impl(op: str, backend: str) -> Callable[[Callable], Callable]:
    """Decorator: register ``fn`` as ``backend``'s implementation of kernel-family op ``op``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")

    def deco(fn: Callable) -> Callable:
        _IMPLS.setdefault(op, {})[backend] = fn
        return fn

    return deco


def register_probe(backend: str, probe: Callable[[str], "str | None"]) -> None:
    _PROBES[backend] = probe


def _load_backends() -> None:
    # Imported lazily: triton and the compiled extension are optional, and their import errors are reasons the
    # probes report, not failures of `import frod_kernels`.
    from . import torch_backend  # noqa: F401
    from .triton import ops as _triton_ops  # noqa: F401
    from . import cuda_backend  # noqa: F401


def unavailable_reason(backend: str, device_type: str) -> "str | None":
    _load_backends()
    probe = _PROBES.get(backend)
    if probe is None:
        return f"backend {backend!r} is not installed"
    return probe(device_type)


def available_backends() -> dict[str, dict[str, "str | None"]]:
    """For every backend and device type: ``None`` if it can run there, else the reason it cannot.

    >>> fk.available_backends()["triton"]["cpu"]
    'no GPU and TRITON_INTERPRET is not 1'
    """
    _load_backends()
    device_types = ["cpu", "cuda"]
    return {b: {d: unavailable_reason(b, d) for d in device_types} for b in BACKENDS}


def get_backend() -> str:
    return _global_backend


def set_backend(name: str) -> None:
    """Select the backend for all later calls: ``"auto"``, ``"torch"``, ``"triton"`` or ``"cuda"``."""
    global _global_backend
    _global_backend = _check_name(name)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager form of :func:`set_backend`.

    Process-wide, not thread-local: on CUDA, autograd runs backward in its own device thread, which must see the
    backend that the forward ran with.
    """
    global _global_backend
    prev = _global_backend
    _global_backend = _check_name(name)
    try:
        yield
    finally:
        _global_backend = prev


def _check_name(name: str) -> str:
    if not isinstance(name, str) or name not in _CHOICES:
        raise ValueError(f"backend must be one of {_CHOICES}, got {name!r}")
    return name


def resolve_name(device_type: str) -> str:
    """The backend that runs on ``device_type`` now: the selected one, or auto's first that can run there."""
    _load_backends()
    name = get_backend()
    if name != "auto":
        reason = unavailable_reason(name, device_type)
        if reason is not None:
            raise RuntimeError(f"frod_kernels backend {name!r} cannot run on {device_type}: {reason}")
        return name
    for cand in AUTO_ORDER.get(device_type, ["torch"]):
        if unavailable_reason(cand, device_type) is None:
            return cand
    return "torch"


def resolve(op: str, device: torch.device) -> Callable:
    """The implementation of ``op`` that runs on ``device``. Under ``"auto"`` that is a dispatcher: it picks per
    call's shape class (:mod:`frod_kernels.autotune`: measured on a GPU, else the fixed order) and falls back to
    the torch twin where the picked kernel raises. A backend selected by name runs as it is, errors included."""
    impls = _IMPLS.get(op, {})
    if get_backend() == "auto":
        return functools.partial(_auto, op, impls, device.type)
    name = resolve_name(device.type)
    # A backend may implement only some ops; the torch twin covers the rest on any device.
    return impls.get(name, impls["torch"])


def _auto(op: str, impls: dict[str, Callable], device_type: str, *args):
    from . import autotune

    runnable = [b for b in AUTO_ORDER.get(device_type, ["torch"]) if unavailable_reason(b, device_type) is None]
    return autotune.run_guarded(op, autotune.pick_backend(op, impls, runnable, args), impls, args)
