"""Values derived from a tensor, kept until the tensor is written, replaced or freed: how the package caches by
one tensor's identity (pattern layouts, device copies, finite checks, solver factorizations, content digests).
A layer call's arguments, several tensors at once, are kept by the same rules in :class:`frod_kernels.ops.api._Call`.

Tensors hash by identity but compare elementwise, so a WeakKeyDictionary cannot hold them, and ``id()`` values are
reused once a tensor is freed: an entry keeps a weak reference and is dropped when its tensor is freed. An entry
also records the tensor's version counter (bumped by every in-place write) and data pointer (changed by a
``.data`` assignment or a move, which keep the Python object), so a rewritten tensor never hits.

A view is keyed by the tensor it views and its own geometry, not by its own identity: a module that hands out a
fresh view per call (``FrodLinear.U``, the transpose of its stored ``U_t``) still hits. A view shares its base's
version counter, so a write through either is seen.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, Hashable

import torch


def state(t: torch.Tensor) -> tuple[int, int]:
    """What changes when ``t``'s contents may have: (version, data pointer). Inference tensors carry no version
    counter and cannot be written outside inference mode."""
    return (-1 if t.is_inference() else t._version), t.data_ptr()


def _owner_and_key(src: torch.Tensor, tag: Hashable) -> tuple[torch.Tensor, tuple]:
    base = src._base
    if base is None:
        return src, (id(src), tag)
    return base, (id(base), tag, src.shape, src.stride(), src.storage_offset())


class TensorCache:
    """``get(src, tag, build)``: ``build()``'s value for ``(src, tag)``, built on first use and kept until ``src`` is
    written, replaced or freed (or :meth:`clear`). Instances are independent, so a short-lived user (one PEFT
    injection) can drop all its entries at once."""

    def __init__(self) -> None:
        self._entries: dict[tuple, tuple[weakref.ref, tuple[int, int], Any]] = {}

    def get(self, src: torch.Tensor, tag: Hashable, build: Callable[[], Any], stamp: Hashable = None) -> Any:
        """``stamp``: more that the value depends on (other tensors' states); unlike ``tag`` it is not part of the
        key, so a new stamp replaces the entry instead of adding one."""
        owner, key = _owner_and_key(src, tag)
        now = (state(src), stamp)
        hit = self._entries.get(key)
        if hit is not None and hit[1] == now and hit[0]() is owner:
            return hit[2]
        value = build()
        self._entries[key] = (weakref.ref(owner, self._evict(key)), now, value)
        return value

    def peek(self, src: torch.Tensor, tag: Hashable, stamp: Hashable = None) -> Any:
        """The value cached for ``(src, tag)`` in ``src``'s current state (and ``stamp``), or None."""
        owner, key = _owner_and_key(src, tag)
        hit = self._entries.get(key)
        if hit is not None and hit[1] == (state(src), stamp) and hit[0]() is owner:
            return hit[2]
        return None

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def _evict(self, key: tuple):
        entries = self._entries

        def cb(ref: weakref.ref) -> None:
            if entries.get(key, (None,))[0] is ref:
                del entries[key]

        return cb


# The process-wide cache for what lives as long as its source (layouts, device copies, checks).
DERIVED = TensorCache()
