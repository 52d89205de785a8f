"""The fast route to V: PEFT's math without the QR of the stacked weights (a sketched Cholesky-QR2), with Cholesky
or Woodbury inverses, in float32 (see :func:`fast_basis`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from .exact import _float32_cpu, basis_from_weights

_SKETCH_SEED = 0x5EED  # a private generator: the fast route never draws from the pattern's generator

def _sketch_r(mats: Sequence[Tensor], n: int) -> Tensor:
    """An upper-triangular R1 (n x n) with ``A R1^-1`` well conditioned, where A stacks ``mats`` row-wise: the R of
    a QR of a CountSketch of A (2n rows; each row of A added, with a random sign, to one of them), or of A itself
    when A has at most 2n rows. A sketch keeps A's column space to a small distortion, so ``A R1^-1`` has a
    condition number of a few, whatever A's."""
    rows = sum(m.shape[0] for m in mats)
    if rows <= 2 * n:
        return torch.linalg.qr(torch.cat(list(mats)), mode="r")[1]
    gen = torch.Generator().manual_seed(_SKETCH_SEED)
    sketch = torch.zeros(2 * n, n)
    for m in mats:
        bucket = torch.randint(2 * n, (m.shape[0],), generator=gen)
        sign = torch.randint(2, (m.shape[0], 1), generator=gen).float().mul_(2).sub_(1)
        sketch.index_add_(0, bucket, m * sign)
    return torch.linalg.qr(sketch, mode="r")[1]

def _spd_factor(matrix: Tensor) -> Optional[Tensor]:
    """Lower Cholesky factor, or None where float32 cannot factor it (not positive definite to rounding)."""
    factor, info = torch.linalg.cholesky_ex(matrix)
    return factor if int(info) == 0 else None

@dataclass
class _FastFactors:
    V: Tensor  # float32 (in, in)
    q1: list[Tensor]  # per basis layer, A's row block times R1^-1 (out, in)
    x: Tensor  # R2^-1 E: each layer's B = W V^-T is q1 @ x

def _fast_factors(weights: Sequence[Tensor], regularization_alpha: float) -> Optional[_FastFactors]:
    """The factors behind :func:`fast_basis`, or None where its route does not apply."""
    mats = _float32_cpu(weights)
    n = mats[0].shape[1]
    alpha = float(regularization_alpha)
    if sum(m.shape[0] for m in mats) < n or alpha <= 0:
        return None
    r1 = _sketch_r(mats, n)
    if not bool(torch.isfinite(r1).all()) or bool((r1.diagonal() == 0).any()):
        return None
    q1 = [torch.linalg.solve_triangular(r1, m, upper=True, left=False) for m in mats]
    del mats
    # Q1_l^T Q1_l for a direct inverse, or nothing for Woodbury's (at most half as many rows as columns)
    grams = [None if 2 * q.shape[0] <= n else q.T @ q for q in q1]
    g2 = torch.zeros(n, n)
    for q, gram in zip(q1, grams):
        if gram is None:
            g2.addmm_(q.T, q)
        else:
            g2 += gram
    l2 = _spd_factor(g2)
    if l2 is None:
        return None
    mean_inv = torch.zeros(n, n)
    g2_inv = None
    for q, gram in zip(q1, grams):
        if gram is None:
            # inv(alpha G2 + Q^T Q) = G2^-1/alpha - Y^T inv(I + Q Y^T/alpha) Y / alpha^2,  Y = Q G2^-1
            if g2_inv is None:
                g2_inv = torch.cholesky_inverse(l2)
            y = q @ g2_inv
            c = _spd_factor(torch.eye(q.shape[0]).addmm_(q, y.T, alpha=1 / alpha))
            if c is None:
                return None
            z = torch.linalg.solve_triangular(c, y, upper=False)
            mean_inv.add_(g2_inv, alpha=1 / alpha).addmm_(z.T, z, alpha=-1 / alpha ** 2)
        else:
            c = _spd_factor(gram.add_(g2, alpha=alpha))
            if c is None:
                return None
            mean_inv += torch.cholesky_inverse(c)
    del grams
    r2 = l2.mT
    t_pi = r2 @ (mean_inv / len(q1)) @ l2
    _, eigenvectors = torch.linalg.eigh((t_pi + t_pi.mT) / 2)
    V = r1.mT @ (r2.mT @ eigenvectors)
    x = torch.linalg.solve_triangular(r2, eigenvectors, upper=True)
    if not (bool(torch.isfinite(V).all()) and bool(torch.isfinite(x).all())):
        return None
    return _FastFactors(V, q1, x)

def fast_basis(weights: Sequence[Tensor], regularization_alpha: float = 1e-3) -> Tensor:
    """V by PEFT's math through a cheaper float32 route: equal to PEFT's V up to each column's sign and to the
    conditioning of the eigenproblem (see the module docstring), so only for projections that are saved.

    PEFT's ``T = mean_l inv(Q_l^T Q_l + alpha I)`` and ``V = R^T eigvecs(T)`` with ``A = Q R`` are computed without
    the QR: with ``R1`` from a sketch of A (:func:`_sketch_r`), ``Q1 = A R1^-1`` is well conditioned and its Gram
    ``G2 = Q1^T Q1 = R2^T R2`` (Cholesky) finishes the QR implicitly (Cholesky-QR2: ``R = R2 R1`` up to row
    signs). In those coordinates ``T = R2 [mean_l inv(Q1_l^T Q1_l + alpha G2)] R2^T`` and ``V = R1^T R2^T E``.
    Each inverse is a Cholesky inverse; a layer with at most half as many rows as columns uses Woodbury's
    identity (an out x out factorization instead of an in x in one). Falls back to :func:`basis_from_weights`
    (PEFT's ops) where A has fewer rows than columns (PEFT's SVD route) or where a factorization fails (A rank
    deficient to float32, ``regularization_alpha`` 0)."""
    factors = _fast_factors(weights, regularization_alpha)
    return basis_from_weights(weights, regularization_alpha) if factors is None else factors.V
