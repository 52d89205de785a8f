"""FRoD's projections (V per category, U and lambda_l per layer, the sparse pattern), the same tensors as PEFT's.

PEFT 0.21 builds them in ``FrodModel._init_frod_projections`` (V and the pattern) and
``FrodLayer._calculate_frod_u_and_lambda`` (U, lambda_l); DESIGN.md section 1 describes the construction.

What is the same and what is faster here:

- V: the same torch ops, in the same order, on the same float32 inputs as PEFT's ``_projection_from_weights``, so
  in the same process (same BLAS/LAPACK, same thread count) V is bitwise PEFT's. This exact route does not make
  it faster, though it is most of the time (about 80% on the CPU: the QR of the stacked weights, one n x n inverse
  per layer, the eigh): V is an eigenvector basis of an ill-conditioned matrix, so any other route (another
  factorization, float64, another thread count) can move its columns well beyond rounding (sign flips, rotations
  inside near-equal eigenvalues), and PEFT regenerates V (``save_projection=False``) or at least U (always) from
  the base weights when it loads an adapter. PEFT's own V differs between thread counts and machines for the
  same reason (MKL's QR, inverse and eigh are not bitwise reproducible across thread counts: on a 16-layer
  width-1024 Llama, 1 vs 2 threads gives a V 11-15% apart, with flipped columns), so a PEFT adapter is only
  reproducible on the same BLAS with the same threads.
- Pattern: the same ``randperm`` draw from the same generator, but the chosen positions are mapped
  arithmetically to (row, col) instead of indexing a materialized grid of all n*n positions (O(nnz) memory instead
  of O(n^2)).
- U, lambda_l: PEFT solves ``V B^T = W^T`` in float64 once per layer, each time re-factorizing the same V. Here V
  is LU-factorized once per category (the same LAPACK getrf PEFT's solve calls) and each layer is one
  triangular solve against that factorization, in float64, one layer at a time (memory stays one layer's
  float64 copy). The float64 result equals PEFT's to float64 rounding (forward error about cond(V) * 1e-16,
  far below float32 rounding), so after the cast to float32 U and lambda_l equal PEFT's to the last bit or one.
- Fast route (``method="fast"``, :func:`fast_basis`): the same math without the QR of the stacked weights and
  with Cholesky (or, for layers with at most half as many rows as columns, Woodbury) inverses, in float32; each
  float32 layer's U then comes from one matrix product instead of a float64 solve. About twice as fast on the
  CPU (all of PEFT's other steps it keeps: one in x in inverse and one product per layer, one eigh). Its V is an
  eigenbasis of PEFT's problem to the same float32 accuracy as PEFT's own (the tests measure it against a float64
  reference), but not PEFT's tensor: eigh's column signs differ, and so does the basis chosen inside near-equal
  eigenvalues. So it is only for projections that are saved with the model: FrodLinear keeps V and U as
  parameters. It is not offered for PEFT's ``get_peft_model``: PEFT 0.21 never saves U and, on load, computes it
  from the V it regenerates before loading the saved V over it, so an adapter trained on any V other than the
  one PEFT regenerates loads wrong in plain PEFT, with ``save_projection=True`` too.
- GPU route (``device="cuda"``): the decompositions run on the GPU in float64. cuSOLVER's QR and eigh are not
  LAPACK's, so its V can differ from PEFT's beyond rounding (eigenvector signs, near-equal eigenvalues), as the
  fast route's does, and it is for the same uses.
- Cache (``cache=``, :mod:`frod_kernels.cache`): every route looks its V, patterns, U and lambda_l up on disk
  first, keyed by the content of what they are computed from, so a second setup of the same model reads the
  tensors the first one computed instead of computing them again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence

import torch
from torch import Tensor
from tqdm import tqdm

from . import cache as projection_cache

__all__ = [
    "CategoryProjection",
    "basis_from_weights",
    "build_projections",
    "cached_pattern",
    "cached_u_and_lambda",
    "category_from_key",
    "fast_basis",
    "layer_index_from_key",
    "sparse_pattern",
    "u_and_lambda",
]


def category_from_key(key: str) -> str:
    """PEFT's ``_category_from_key``: the projection-sharing role of a dotted module key.

    ``model.layers.3.self_attn.q_proj`` -> ``self_attn_q_proj``; ``h.0.attn.c_attn`` -> ``attn_c_attn``;
    ``...layers.0.2`` style keys (second-to-last part a digit) -> the last part; BERT's
    ``attention.output.dense`` -> ``attention_output``.
    """
    parts = key.split(".")
    if len(parts) == 1:
        return parts[0]
    if parts[-2].isdigit():
        return parts[-1]
    category = f"{parts[-2]}_{parts[-1]}"
    if category == "output_dense" and len(parts) >= 3 and parts[-3] == "attention":
        return "attention_output"
    return category


def layer_index_from_key(key: str, fallback: int) -> int:
    """PEFT's ``_layer_index_from_key``: the integer after a ``layers`` part, else the first integer part, else
    ``fallback``."""
    parts = key.split(".")
    if "layers" in parts:
        try:
            return int(parts[parts.index("layers") + 1])
        except (ValueError, IndexError):
            pass
    for part in parts:
        if part.isdigit():
            return int(part)
    return fallback


def _float32_cpu(weights: Sequence[Tensor]) -> list[Tensor]:
    """The float32 CPU matrices PEFT decomposes (the weights themselves where they are float32 on the CPU), checked
    to be (out, in) with one in_features."""
    if len(weights) == 0:
        raise ValueError("weights: expected at least one (out, in) weight, got an empty sequence")
    matrices = [w.detach().to(torch.float32).cpu() for w in weights]
    if any(m.dim() != 2 for m in matrices) or len({m.shape[1] for m in matrices}) != 1:
        raise ValueError(f"weights: expected 2-D (out, in) weights with one in_features, got shapes "
                         f"{[tuple(m.shape) for m in matrices]}")
    return matrices


def _peft_basis(matrices: list[Tensor], regularization_alpha: float) -> Tensor:
    """PEFT's ``_projection_from_weights``, its ops in its order, in the matrices' dtype and on their device.
    Empties ``matrices``: from the stacking on, only the stacked copy is held."""
    rows = [m.shape[0] for m in matrices]
    stacked = torch.cat(matrices, dim=0)
    matrices.clear()
    if stacked.shape[0] < stacked.shape[1]:
        _, _, vh = torch.linalg.svd(stacked, full_matrices=True)
        return vh.T
    q_matrix, r_matrix = torch.linalg.qr(stacked)
    del stacked
    dim = r_matrix.shape[1]
    t_pi = torch.zeros((dim, dim), dtype=r_matrix.dtype, device=r_matrix.device)
    ridge = regularization_alpha * torch.eye(dim, dtype=r_matrix.dtype, device=r_matrix.device)
    start = 0
    for n_rows in rows:
        q_slice = q_matrix[start:start + n_rows, :]
        start += n_rows
        t_pi += torch.linalg.inv(q_slice.T @ q_slice + ridge)
    del q_matrix
    t_pi /= len(rows)
    _, eigenvectors = torch.linalg.eigh(t_pi)
    return r_matrix.T @ eigenvectors


def basis_from_weights(weights: Sequence[Tensor], regularization_alpha: float = 1e-3) -> Tensor:
    """V (in x in, float32, CPU) as PEFT's ``_projection_from_weights`` computes it from the float32 CPU copies of
    the layers' weights (each out x in), in the order given.

    The float32 ops are PEFT's own, in its order, so the result is bitwise PEFT's under the same BLAS threads.
    """
    return _peft_basis(_float32_cpu(weights), regularization_alpha)


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

    return cached_u_and_lambda(projection_cache.open_store(cache), "solve-cpu", V, W, solve)


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


def _pattern_size(n: int, sparse_rate: float) -> int:
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
    if not 0.0 <= sparse_rate <= 1.0:
        raise ValueError(f"sparse_rate: expected a fraction in [0, 1], got {sparse_rate}")
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
    if not 0.0 <= sparse_rate <= 1.0:
        raise ValueError(f"sparse_rate: expected a fraction in [0, 1], got {sparse_rate}")
    return _Patterns(projection_cache.open_store(cache), projection_prng_key, sparse_rate).draw(n)


@dataclass
class CategoryProjection:
    """The projections of one category: its shared V and pattern, and each layer's U and lambda_l."""

    name: str
    V: Tensor  # float32, CPU, (in, in)
    s_indices: Tensor  # int64 (2, nnz)
    keys: list[str]  # module keys of the category, in layer-index order
    U: dict[str, Tensor] = field(default_factory=dict)  # per key, float32 (out, in); empty if with_layers=False
    lambda_l: dict[str, Tensor] = field(default_factory=dict)  # per key, float32 (in,)


def _group(weights: Mapping[str, Tensor]) -> dict[str, list[tuple[int, str]]]:
    """category -> [(layer index, key)], sorted by layer index as PEFT sorts its per-layer dict. The fallback index
    counts every entry of ``weights`` (PEFT counts every targeted Linear/Conv1D, whether or not it uses it)."""
    groups: dict[str, list[tuple[int, str]]] = {}
    for fallback, key in enumerate(weights):
        groups.setdefault(category_from_key(key), []).append((layer_index_from_key(key, fallback), key))
    for members in groups.values():
        members.sort(key=lambda m: m[0])  # stable: keys of one layer index keep named_modules() order
    return groups


def _resolve_device(device) -> torch.device:
    dev = torch.device("cpu") if device is None else torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: got {device!r} but no CUDA device is available")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device: expected None, 'cpu' or a CUDA device, got {device!r}")
    return dev


def _basis_gpu(weights: Sequence[Tensor], regularization_alpha: float, device: torch.device) -> Tensor:
    """PEFT's construction in float64 on the GPU (cuSOLVER): equal to PEFT's V only to the conditioning of the
    eigenproblem (see the module docstring), so for checkpoints that save their projections."""
    matrices = [w.detach().to(device=device, dtype=torch.float64) for w in weights]
    return _peft_basis(matrices, regularization_alpha).float().cpu()


def _basis(weights: Sequence[Tensor], regularization_alpha: float, route: str,
           device: torch.device) -> tuple[Tensor, Optional[_FastFactors]]:
    """(V, the fast route's factors or None) by ``route``'s construction ("exact", "fast" or "cuda")."""
    if route == "cuda":
        return _basis_gpu(weights, regularization_alpha, device), None
    if route == "fast" and (factors := _fast_factors(weights, regularization_alpha)) is not None:
        return factors.V, factors
    return basis_from_weights(weights, regularization_alpha), None


def build_projections(weights: Mapping[str, Tensor], *, sparse_rate: float = 0.01, projection_prng_key: int = 0,
                      regularization_alpha: float = 1e-3, progressbar: bool = True, with_layers: bool = True,
                      device=None, method: str = "exact",
                      cache: projection_cache.CacheArg = None) -> dict[str, CategoryProjection]:
    """PEFT's projections for every category of ``weights``, as ``FrodModel._init_frod_projections`` and each
    layer's ``update_layer`` compute them.

    Args:
        weights: module key -> weight (out, in), nn.Linear orientation (pass a Conv1D's weight transposed), in
            ``named_modules()`` order, only the modules FRoD adapts (PEFT's fallback layer index counts them).
        sparse_rate: PEFT's ``sparse_rate``, in [0, 1].
        projection_prng_key: seeds the one generator that draws every category's pattern, categories in sorted
            name order (PEFT's).
        regularization_alpha: PEFT's ``regularization_alpha``.
        progressbar: a tqdm bar per category (name, layers, width).
        with_layers: also compute each layer's U and lambda_l.
        device: ``None``/``"cpu"``: the CPU route. A CUDA device: the decompositions run there in float64 (V
            equal to PEFT's only up to column signs and the eigenproblem's conditioning; ``method`` is ignored).
        method: the CPU route's V. ``"exact"``: PEFT's float32 ops (V bitwise PEFT's under the same BLAS
            threads). ``"fast"``: :func:`fast_basis` (V equal to PEFT's only up to column signs and the
            eigenproblem's conditioning): for projections that are saved with the adapter. U and lambda_l are
            solved against whichever V in float64 either way, so ``U diag(lambda_l) V^T`` reproduces each weight.
        cache: the projection cache (:func:`frod_kernels.cache.cache_dir`): None (default: on unless
            ``FROD_CACHE=0``), True, False (off) or a directory. Every tensor returned is then what the
            computation gave when its entry was written (bitwise, also under another BLAS thread count).

    Returns:
        category name -> :class:`CategoryProjection`, in sorted category order. ``keys`` lists every key of the
        category by layer index; when two keys of one category share a layer index, PEFT's V keeps only the
        last of them (its per-layer dict overwrites), and so does this V, while every key still gets U and
        lambda_l. V and U are float32: PEFT stores them in the weight's dtype (and computes U from V rounded so), so
        cast them to the weight's dtype to get PEFT's buffers. lambda_l is float32 rounded through the weight's
        dtype, as PEFT's parameter is after its adapter autocast (a bfloat16 model's lambda_l holds bfloat16
        values).
    """
    if not isinstance(sparse_rate, (int, float)) or not 0.0 <= sparse_rate <= 1.0:
        raise ValueError(f"sparse_rate: expected a fraction in [0, 1], got {sparse_rate!r}")
    if not isinstance(weights, Mapping) or len(weights) == 0:
        raise ValueError(f"weights: expected a non-empty mapping of module key -> (out, in) weight, got "
                         f"{type(weights).__name__} of length {len(weights) if hasattr(weights, '__len__') else '?'}")
    for key, w in weights.items():
        if not isinstance(w, Tensor) or w.dim() != 2 or not w.is_floating_point():
            raise ValueError(f"weights[{key!r}]: expected a 2-D floating-point (out, in) tensor, got "
                             f"{type(w).__name__}{tuple(w.shape) if isinstance(w, Tensor) else ''}")
    dev = _resolve_device(device)
    if method not in ("exact", "fast"):
        raise ValueError(f"method: expected 'exact' or 'fast', got {method!r}")
    store = projection_cache.open_store(cache)

    groups = _group(weights)
    for name, members in groups.items():
        widths = {weights[k].shape[1] for _, k in members}
        if len(widths) != 1:
            detail = ", ".join(f"{k}: {weights[k].shape[1]}" for _, k in members)
            raise ValueError(f"weights: category {name!r} mixes in_features ({detail}); the layers of one category "
                             f"share V and need one in_features")

    route = "cuda" if dev.type == "cuda" else method
    digest = dict(zip(weights, projection_cache.digests(list(weights.values())))) if store is not None else {}
    patterns = _Patterns(store, projection_prng_key, sparse_rate)
    result: dict[str, CategoryProjection] = {}
    for name in sorted(groups):
        members = groups[name]
        keys = [k for _, k in members]
        # PEFT keeps one weight per (layer index, category): the last key seen for that index.
        basis_keys = list({idx: k for idx, k in members}.values())
        width = weights[keys[0]].shape[1]
        # PEFT rounds V to the first (insertion-order) weight's dtype for its buffer, then to each layer's dtype
        # before its float64 solve: U is computed from those roundings.
        key_set = set(keys)
        buffer_dtype = weights[next(k for k in weights if k in key_set)].dtype
        # The fast route's float32 layers: B = W V^-T is Q1_l R2^-1 E, one product with factors that are well
        # conditioned, so U diag(lambda_l) V^T reproduces W to float32 rounding without a solve. Those U come from
        # the category's factors, not from V alone, so they are cached with V, in one entry.
        product = with_layers and route == "fast" and buffer_dtype == torch.float32
        basis_fields = {"route": route, "alpha": float(regularization_alpha).hex(), "product_u": product,
                        "weights": [digest[k] for k in basis_keys] if store is not None else None}
        info = {"category": name, "layers": len(basis_keys), "width": width, "route": route}
        bar = tqdm(total=1 + (len(keys) if with_layers else 0), disable=not progressbar, unit="step",
                   desc=f"FRoD {name} ({len(basis_keys)} layers, width {width})")
        with bar:
            entry = None if store is None else store.get("V", basis_fields, {"V": (torch.float32, (width, width))})
            if entry is None:
                V, factors = _basis([weights[k] for k in basis_keys], regularization_alpha, route, dev)
            else:
                V, factors = entry["V"], None
                bar.set_postfix_str("from cache")
            bar.update(1)
            proj = CategoryProjection(name=name, V=V, s_indices=patterns.draw(width, {"category": name}), keys=keys)
            if with_layers:
                fast_b: dict[str, Tensor] = {}
                if factors is not None and product:
                    fast_b = {k: q for k, q in zip(basis_keys, factors.q1) if weights[k].dtype == torch.float32}
                    factors.q1 = []
                cached_product = {} if entry is None or not product else {
                    basis_keys[j]: (entry[f"U.{j}"], entry[f"lambda_l.{j}"]) for j in entry["product_layers"].tolist()}
                product_keys = set(fast_b) | set(cached_product)
                seen: dict[torch.dtype, tuple[Tensor, Optional[str]]] = {}  # V as each weight dtype's solve sees it
                solvers: dict[torch.dtype, VSolver] = {}
                for key in keys:
                    w = weights[key]
                    if key in cached_product:
                        proj.U[key], lam = cached_product.pop(key)
                    elif key in fast_b:
                        proj.U[key], lam = _normalize_columns(fast_b.pop(key) @ factors.x)
                    else:
                        if w.dtype not in seen:
                            v = V.to(buffer_dtype).to(w.dtype)
                            seen[w.dtype] = v, None if store is None else projection_cache.tensor_digest(v)

                        def solve(v=seen[w.dtype][0], w=w):
                            if w.dtype not in solvers:
                                solvers[w.dtype] = VSolver(v, dev)
                            return solvers[w.dtype](w)

                        proj.U[key], lam = cached_u_and_lambda(store, f"lu-{dev.type}", seen[w.dtype][0], w, solve,
                                                               seen[w.dtype][1], digest.get(key),
                                                               {"category": name, "layer": key})
                    # PEFT makes lambda_l a parameter of the weight's dtype before its adapter autocast to float32.
                    proj.lambda_l[key] = lam.to(w.dtype).float()
                    bar.update(1)
            if store is not None and entry is None:
                tensors = {"V": V}
                if product:
                    # float32 layers: lambda_l is the computed one, unrounded
                    js = [j for j, k in enumerate(basis_keys) if k in product_keys]
                    tensors["product_layers"] = torch.tensor(js, dtype=torch.long)
                    for j in js:
                        key = basis_keys[j]
                        tensors[f"U.{j}"], tensors[f"lambda_l.{j}"] = proj.U[key], proj.lambda_l[key]
                store.put("V", basis_fields, tensors, info)
            result[name] = proj
    return result
