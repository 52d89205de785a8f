"""Backend registry: which implementations of each kernel-family op exist, where each can run, which is selected.

A leaf: it imports nothing of the package. A backend (``frod_kernels/backends/``) registers itself with
:func:`register_backend` (its name, a probe, its preference) and one implementation per op with
:func:`register_impl`; adding a backend touches nothing here. What ``"auto"`` runs is policy, and lives with the
autotuner (:mod:`frod_kernels.autotune`); this module only answers which backends exist and can run, in
preference order, and which one the user selected.

Probes run once per (backend, device type) per process: whether a GPU, Triton or the compiled extension is there
does not change while the process runs.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

Probe = Callable[[str], Optional[str]]

# op name -> backend name -> implementation
_IMPLS: dict[str, dict[str, Callable]] = {}
# backend name -> (preference, probe); a higher preference runs first where nothing is measured
_BACKENDS: dict[str, tuple[int, Probe]] = {}
_reasons: dict[tuple[str, str], Optional[str]] = {}
_selected = "auto"
# Bumped whenever what a lookup here could answer changes: callers key their caches on it.
generation = 0


def _bump() -> None:
    global generation
    generation += 1


def register_backend(name: str, probe: Probe, *, preference: int) -> None:
    """Declare backend ``name``: ``probe(device_type)`` returns None where it can run, else the reason it cannot;
    among backends that can run, the one with the highest ``preference`` comes first in :func:`runnable`."""
    _BACKENDS[name] = (preference, probe)
    for key in [k for k in _reasons if k[0] == name]:
        del _reasons[key]
    _bump()


def register_impl(op: str, backend: str) -> Callable[[Callable], Callable]:
    """Decorator: register ``fn`` as ``backend``'s implementation of kernel-family op ``op``."""
    def deco(fn: Callable) -> Callable:
        _IMPLS.setdefault(op, {})[backend] = fn
        _bump()
        return fn

    return deco


def impls(op: str) -> dict[str, Callable]:
    """Backend name -> implementation of ``op``."""
    return _IMPLS.get(op, {})


def backends() -> list[str]:
    """Every registered backend, most preferred first."""
    return sorted(_BACKENDS, key=lambda b: -_BACKENDS[b][0])


def unavailable_reason(backend: str, device_type: str) -> Optional[str]:
    """None if ``backend`` can run on ``device_type``, else why not (probed once per process)."""
    key = (backend, device_type)
    if key not in _reasons:
        entry = _BACKENDS.get(backend)
        _reasons[key] = f"backend {backend!r} is not installed" if entry is None else entry[1](device_type)
    return _reasons[key]


def runnable(device_type: str) -> list[str]:
    """The backends that can run on ``device_type``, most preferred first."""
    return [b for b in backends() if unavailable_reason(b, device_type) is None]


def available_backends() -> dict[str, dict[str, Optional[str]]]:
    """For every backend and device type: ``None`` if it can run there, else the reason it cannot.

    >>> fk.available_backends()["triton"]["cpu"]
    'Triton runs on the CPU only under its interpreter (TRITON_INTERPRET=1)'
    """
    return {b: {d: unavailable_reason(b, d) for d in ("cpu", "cuda")} for b in backends()}


def get_backend() -> str:
    return _selected


def set_backend(name: str) -> None:
    """Select the backend for all later calls: ``"auto"`` or a registered backend (``"torch"``, ``"triton"``,
    ``"cuda"``)."""
    global _selected
    _selected = _check_name(name)
    _bump()


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager form of :func:`set_backend`.

    Process-wide, not thread-local: on CUDA, autograd runs backward in its own device thread, which must see the
    backend that the forward ran with.
    """
    global _selected
    prev = _selected
    set_backend(name)
    try:
        yield
    finally:
        _selected = prev
        _bump()


def _check_name(name: str) -> str:
    choices = ("auto",) + tuple(backends())
    if not isinstance(name, str) or name not in choices:
        raise ValueError(f"backend must be one of {choices}, got {name!r}")
    return name


def selected_impl(op: str, device_type: str) -> Callable:
    """The implementation of ``op`` for a backend selected by name (not ``"auto"``) on ``device_type``; raises
    RuntimeError naming the reason when that backend cannot run there. A backend may implement only some ops: the
    torch twin covers the rest on any device."""
    name = _selected
    reason = unavailable_reason(name, device_type)
    if reason is not None:
        raise RuntimeError(f"frod_kernels backend {name!r} cannot run on {device_type}: {reason}")
    ops = impls(op)
    return ops.get(name, ops["torch"])


@contextlib.contextmanager
def scoped() -> Iterator[None]:
    """Registrations and probes made inside the block are undone at its end: how tests add stand-in backends."""
    global _selected
    saved = ({op: dict(impls) for op, impls in _IMPLS.items()}, dict(_BACKENDS), dict(_reasons), _selected)
    try:
        yield
    finally:
        _IMPLS.clear()
        _IMPLS.update(saved[0])
        _BACKENDS.clear()
        _BACKENDS.update(saved[1])
        _reasons.clear()
        _reasons.update(saved[2])
        _selected = saved[3]
        _bump()
