"""Derived layouts of a FRoD sparse pattern, built once per pattern and cached.

PEFT stores the pattern as COO ``s_indices`` (2 x nnz, rows then columns, unsorted). Every sparse step of FRoD is a
row-wise job over the pattern grouped either by row of ``S`` or by column of ``S`` (DESIGN.md section 6), so the
layout holds both groupings, each CSR-like, packed into one int64 tensor that an op can take as an argument:

    [row_ptr (n+1) | row_src (nnz) | row_perm (nnz) | col_ptr (n+1) | col_src (nnz) | col_perm (nnz)]

``row_*`` groups nonzero k by ``r_k`` (``row_src = c_k``) and ``col_*`` groups it by ``c_k`` (``col_src = r_k``);
within a group the order is ascending ``src``, so every reduction has one fixed order (deterministic results).
``*_perm`` maps grouped position to the position in ``s_indices``/``s_values``.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch


@dataclass(frozen=True)
class PatternLayout:
    packed: torch.Tensor
    n: int
    nnz: int

    @staticmethod
    def unpack(packed: torch.Tensor, n: int, nnz: int) -> "PatternLayout":
        return PatternLayout(packed, n, nnz)

    def _section(self, i: int) -> torch.Tensor:
        n1, z = self.n + 1, self.nnz
        bounds = [0, n1, n1 + z, n1 + 2 * z, 2 * n1 + 2 * z, 2 * n1 + 3 * z, 2 * n1 + 4 * z]
        return self.packed[bounds[i] : bounds[i + 1]]

    row_ptr = property(lambda self: self._section(0))
    row_src = property(lambda self: self._section(1))
    row_perm = property(lambda self: self._section(2))
    col_ptr = property(lambda self: self._section(3))
    col_src = property(lambda self: self._section(4))
    col_perm = property(lambda self: self._section(5))


def packed_size(n: int, nnz: int) -> int:
    return 2 * (n + 1) + 4 * nnz


def check_pattern(s_indices: torch.Tensor, n: int) -> None:
    """Raise ValueError/TypeError unless ``s_indices`` is a valid off-diagonal pattern of an n x n matrix."""
    if not isinstance(s_indices, torch.Tensor):
        raise TypeError(f"s_indices: expected a torch.Tensor, got {type(s_indices).__name__}")
    if s_indices.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"s_indices: expected an int64 (or int32) tensor, got dtype {s_indices.dtype}")
    if s_indices.dim() != 2 or s_indices.shape[0] != 2:
        raise ValueError(f"s_indices: expected shape (2, nnz), got {tuple(s_indices.shape)}")
    if s_indices.numel() == 0:
        return
    lo, hi = int(s_indices.min()), int(s_indices.max())
    if lo < 0 or hi >= n:
        raise ValueError(f"s_indices: entries must lie in [0, {n}) for in_features={n}, got range [{lo}, {hi}]")
    rows, cols = s_indices[0].long(), s_indices[1].long()
    if bool((rows == cols).any()):
        k = int((rows == cols).nonzero()[0])
        raise ValueError(f"s_indices: diagonal entry ({int(rows[k])}, {int(cols[k])}) at position {k}; the diagonal "
                         "belongs to lambda_l, S holds off-diagonal entries only")
    key = torch.sort(rows * n + cols).values
    dup = key[1:] == key[:-1]
    if bool(dup.any()):
        k = int(key[1:][dup][0])
        raise ValueError(f"s_indices: duplicate entry ({k // n}, {k % n}); each position may appear once")


def build_layout(s_indices: torch.Tensor, n: int, validate: bool = True) -> PatternLayout:
    """Build the packed layout of ``s_indices`` for an ``n x n`` S, on the device of ``s_indices``."""
    if validate:
        check_pattern(s_indices, n)
    rows, cols = s_indices[0].long(), s_indices[1].long()
    nnz = rows.numel()
    parts = []
    for major, minor in ((rows, cols), (cols, rows)):
        perm = torch.argsort(major * n + minor)
        counts = torch.bincount(major, minlength=n) if nnz else torch.zeros(n, dtype=torch.long, device=rows.device)
        ptr = torch.zeros(n + 1, dtype=torch.long, device=rows.device)
        torch.cumsum(counts, 0, out=ptr[1:])
        parts += [ptr, minor[perm], perm]
    return PatternLayout(torch.cat(parts), n, nnz)


# Derived values keyed by the identity of their source tensor, with a weakref check: tensors hash by identity but
# compare elementwise, so a WeakKeyDictionary cannot hold them, and id() values are reused once a tensor is freed.
# A tensor's _version changes with every in-place write, so a rewritten source never hits; an entry is dropped when
# its source is freed.
_CACHE: dict[tuple, tuple[weakref.ref, int, Any]] = {}


def cached_derived(src: torch.Tensor, tag: tuple, build: Callable[[], Any]) -> Any:
    """``build()``'s value for ``(src, tag)``, built on first use and kept until ``src`` is freed or written."""
    key = (id(src),) + tag
    # inference tensors carry no version counter, and cannot be written outside inference mode either
    version = -1 if src.is_inference() else src._version
    hit = _CACHE.get(key)
    if hit is not None and hit[0]() is src and hit[1] == version:
        return hit[2]
    value = build()
    _CACHE[key] = (weakref.ref(src, _evict(key)), version, value)
    return value


def _evict(key: tuple):
    def cb(ref: weakref.ref) -> None:
        if _CACHE.get(key, (None,))[0] is ref:
            del _CACHE[key]

    return cb


def pattern_layout(s_indices: torch.Tensor, n: int) -> PatternLayout:
    """The cached layout of ``s_indices`` (built on first use, validated then)."""
    return cached_derived(s_indices, ("layout", n), lambda: build_layout(s_indices, n))
