"""The sparse pattern of S, drawn exactly as PEFT draws it, through the projection cache."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import cache as projection_cache
from .._validation import check_sparse_rate
from .store import open_store


def _pattern_size(n: int, sparse_rate: float) -> int:
    check_sparse_rate(sparse_rate)
    n_off = n * (n - 1)
    nnz = min(int(n * n * sparse_rate), n_off)
    if sparse_rate > 0 and n_off > 0:
        nnz = max(1, nnz)
    return nnz

def sparse_pattern(n: int, sparse_rate: float, generator: torch.Generator) -> Tensor:
    """PEFT's pattern of an n x n S: int64 (2, nnz), rows then columns, unsorted, drawn from ``generator`` exactly
    as PEFT draws it (one ``randperm`` of the n*(n-1) off-diagonal positions when nnz > 0, nothing otherwise).

    PEFT indexes a materialized row-major list of the off-diagonal positions with the permutation; position p of
    that list is row ``p // (n-1)``, column ``c + (c >= row)`` with ``c = p % (n-1)`` (the diagonal skipped).
    """
    if n < 0:
        raise ValueError(f"n: expected a non-negative size, got {n}")
    nnz = _pattern_size(n, sparse_rate)
    if nnz == 0:
        return torch.empty(2, 0, dtype=torch.long)
    perm = torch.randperm(n * (n - 1), generator=generator)[:nnz]
    rows = torch.div(perm, n - 1, rounding_mode="floor")
    cols = perm - rows * (n - 1)
    cols += (cols >= rows).long()
    return torch.stack([rows, cols])

class _Patterns:
    """Categories' patterns drawn in turn from one generator seeded with ``seed`` (PEFT's order), each through the
    cache's S entry. The randperm is most of a cached setup's time otherwise (about 0.5 s at width 2048). A hit
    stores the generator's state after its draw, which the next miss resumes from: the state before a draw is
    fixed by the seed and the sizes drawn before it, which key the entry."""

    def __init__(self, store: Optional[projection_cache.Store], seed: int, sparse_rate: float):
        self.store, self.seed, self.sparse_rate = store, seed, sparse_rate
        self.generator = torch.Generator(device="cpu").manual_seed(seed)
        self.draws: list[int] = []  # the sizes of the randperms drawn so far

    def draw(self, n: int, info: Optional[dict] = None) -> Tensor:
        nnz = _pattern_size(n, self.sparse_rate)
        if self.store is None or nnz == 0:  # an empty pattern draws nothing
            return sparse_pattern(n, self.sparse_rate, self.generator)
        fields = {"seed": self.seed, "torch": torch.__version__, "draws_before": self.draws, "n": n, "nnz": nnz}
        self.draws = self.draws + [n * (n - 1)]

        def compute():
            s_indices = sparse_pattern(n, self.sparse_rate, self.generator)
            return {"s_indices": s_indices, "generator_state": self.generator.get_state()}

        out = self.store.fetch("S", fields, compute, info={"width": n, "nnz": nnz, **(info or {})},
                               expect={"s_indices": (torch.long, (2, nnz)), "generator_state": (torch.uint8, None)})
        self.generator.set_state(out["generator_state"])  # a hit did not draw: resume where its draw left off
        return out["s_indices"]

def cached_pattern(n: int, sparse_rate: float, projection_prng_key: int,
                   cache: projection_cache.CacheArg = None) -> Tensor:
    """``sparse_pattern(n, sparse_rate, torch.Generator().manual_seed(projection_prng_key))`` (a first category's
    pattern), through the projection cache."""
    return _Patterns(open_store(cache), projection_prng_key, sparse_rate).draw(n)
