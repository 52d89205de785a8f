"""U and lambda_l per layer: PEFT's ``B = solve(V, W^T)^T`` in float64, ``lambda_l`` its column norms, ``U = B /
lambda_l``; through the projection cache."""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from .. import cache as projection_cache
from .store import open_store


def _normalize_columns(bi: Tensor) -> tuple[Tensor, Tensor]:
    """PEFT's ``U = B / lambda_l`` (columns with lambda_l <= 1e-12 zero) in ``bi``'s dtype, then float32. For a
    float64 ``bi`` each element is the same division as PEFT's masked copy, done in place on ``bi`` (no
    zeros_like, no masked copies)."""
    lambda_l = torch.linalg.norm(bi, dim=0)
    nonzero = lambda_l > 1e-12
    bi.div_(torch.where(nonzero, lambda_l, torch.ones_like(lambda_l)))
    bi[:, ~nonzero] = 0
    return bi.float().contiguous(), lambda_l.float()

def u_and_lambda(V: Tensor, W: Tensor, *, cache: projection_cache.CacheArg = False) -> tuple[Tensor, Tensor]:
    """(U float32 (out, in), lambda_l float32 (in,)) as PEFT's ``Linear._calculate_frod_u_and_lambda``:
    ``B = solve(V, W^T)^T`` in float64 (pinv fallback for a singular V), ``lambda_l`` its column norms,
    ``U = B / lambda_l`` (columns with ``lambda_l <= 1e-12`` stay zero). ``W`` is (out, in), nn.Linear orientation.
    ``cache``: look the result up in (and write it to) the projection cache (:func:`frod_kernels.cache.cache_dir`)."""
    if V.dim() != 2 or V.shape[0] != V.shape[1]:
        raise ValueError(f"V: expected a square (in, in) basis, got shape {tuple(V.shape)}")
    if W.dim() != 2 or W.shape[1] != V.shape[0]:
        raise ValueError(f"W: expected shape (out, {V.shape[0]}) (in_features from V), got {tuple(W.shape)}")

    def solve():
        w = W.detach().to(torch.float64).cpu()
        v = V.detach().to(torch.float64).cpu()
        try:
            bi = torch.linalg.solve(v, w.T).T
        except RuntimeError:
            bi = w @ torch.linalg.pinv(v, rtol=1e-6).T
        return _normalize_columns(bi)

    return cached_u_and_lambda(open_store(cache), "solve-cpu", V, W, solve)

def cached_u_and_lambda(store: Optional[projection_cache.Store], solver: str, V: Tensor, W: Tensor,
                        compute: Callable[[], tuple[Tensor, Tensor]], V_digest: Optional[str] = None,
                        W_digest: Optional[str] = None, info: Optional[dict] = None) -> tuple[Tensor, Tensor]:
    """``compute()``'s (U, lambda_l) for ``V B^T = W^T``, through the cache's U entry keyed by the content of V (as
    the solve sees it: its dtype), of W and by ``solver`` (a name for the computation; entries with one name must
    come from the same code). ``store`` None: just ``compute()``. The digests, where the caller has them, save
    hashing again."""
    if store is None:
        return compute()
    V_digest = V_digest or projection_cache.tensor_digest(V)
    W_digest = W_digest or projection_cache.tensor_digest(W)
    out = store.fetch("U", {"solver": solver, "V": V_digest, "W": W_digest},
                      lambda: dict(zip(("U", "lambda_l"), compute())),
                      expect={"U": (torch.float32, (W.shape[0], V.shape[0])),
                              "lambda_l": (torch.float32, (V.shape[0],))},
                      info={"width": V.shape[0], "out": W.shape[0], "solver": solver, **(info or {})})
    return out["U"], out["lambda_l"]

class VSolver:
    """Solves ``V B^T = W^T`` for many W with one factorization of V (PEFT factorizes V once per layer)."""

    def __init__(self, V: Tensor, device: torch.device):
        self.device = device
        v = V.detach().to(device=device, dtype=torch.float64)
        self.lu, self.pivots, info = torch.linalg.lu_factor_ex(v)
        # PEFT's solve raises on a singular V and falls back to pinv; lu_factor's info flags the same case.
        self.pinv_t = torch.linalg.pinv(v, rtol=1e-6).T if int(info) != 0 else None

    def __call__(self, W: Tensor) -> tuple[Tensor, Tensor]:
        w = W.detach().to(device=self.device, dtype=torch.float64)
        if self.pinv_t is not None:
            bi = w @ self.pinv_t
        else:
            bi = torch.linalg.lu_solve(self.lu, self.pivots, w.T).T
        u, lam = _normalize_columns(bi)
        return u.cpu(), lam.cpu()
