"""Derived layouts of a FRoD sparse pattern, built once per pattern and cached.

PEFT stores the pattern as COO ``s_indices`` (2 x nnz, rows then columns, unsorted). Every sparse step of FRoD is a
row-wise job over the pattern grouped either by row of ``S`` or by column of ``S`` (docs/DESIGN.md section 6), so the
layout holds both groupings, each CSR-like, packed into one int64 tensor that an op can take as an argument:

    [row_ptr (n+1) | row_src (nnz) | row_perm (nnz) | col_ptr (n+1) | col_src (nnz) | col_perm (nnz)]

``row_*`` groups nonzero k by ``r_k`` (``row_src = c_k``) and ``col_*`` groups it by ``c_k`` (``col_src = r_k``);
within a group the order is ascending ``src``, so every reduction has one fixed order (deterministic results).
``*_perm`` maps grouped position to the position in ``s_indices``/``s_values``.
"""

from __future__ import annotations

import torch

from ._tensor_cache import DERIVED


class PatternLayout:
    """The grouped views of one packed layout (``packed``: the int64 tensor an op takes), sliced once."""

    __slots__ = ("packed", "n", "nnz", "row_ptr", "row_src", "row_perm", "col_ptr", "col_src", "col_perm")

    def __init__(self, packed: torch.Tensor, n: int, nnz: int):
        self.packed, self.n, self.nnz = packed, n, nnz
        n1, z = n + 1, nnz
        bounds = [0, n1, n1 + z, n1 + 2 * z, 2 * n1 + 2 * z, 2 * n1 + 3 * z, 2 * n1 + 4 * z]
        (self.row_ptr, self.row_src, self.row_perm, self.col_ptr, self.col_src,
         self.col_perm) = (packed[bounds[i]:bounds[i + 1]] for i in range(6))


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


def pattern_layout(s_indices: torch.Tensor, n: int) -> PatternLayout:
    """The cached layout of ``s_indices`` (built on first use, validated then)."""
    return DERIVED.get(s_indices, ("layout", n), lambda: build_layout(s_indices, n))


def unpacked(packed: torch.Tensor, n: int, nnz: int) -> PatternLayout:
    """The views of a packed layout that a caller passed (validated by the caller), sliced once per tensor."""
    return DERIVED.get(packed, ("unpacked", n, nnz), lambda: PatternLayout(packed, n, nnz))


def inverse_order(perm: torch.Tensor) -> torch.Tensor:
    """``inv`` with ``inv[perm[i]] = i``, cached per grouping: gathering grouped values by it puts them back in the
    order of ``s_indices``, a gather instead of the scatter by ``perm`` (2-3x cheaper on the CPU at 10,000
    nonzeros)."""
    def build() -> torch.Tensor:
        # a normal tensor even when first built in inference mode: later training calls use it too
        with torch.inference_mode(False):
            return torch.empty_like(perm).index_copy_(0, perm, torch.arange(perm.numel(), device=perm.device))

    return DERIVED.get(perm, "inverse-order", build)
