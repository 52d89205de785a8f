"""FRoD's projections (V per category, U and lambda_l per layer, the sparse pattern), the same tensors as PEFT's.

PEFT 0.21 builds them in ``FrodModel._init_frod_projections`` (V and the pattern) and
``FrodLayer._calculate_frod_u_and_lambda`` (U, lambda_l); docs/DESIGN.md section 1 describes the construction.

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

from .build import CategoryProjection, build_projections
from .exact import basis_from_weights
from .fast import fast_basis
from .keys import category_from_key, layer_index_from_key
from .pattern import cached_pattern, sparse_pattern
from .solve import VSolver, cached_u_and_lambda, u_and_lambda

__all__ = [
    "CategoryProjection",
    "VSolver",
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
