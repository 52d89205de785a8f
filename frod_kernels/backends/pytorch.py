"""The torch backend: pure-torch twins of the two kernel families, correct on any device, fast on the CPU.

The sparse steps run through torch's CSR kernels (MKL on the CPU, cuSPARSE on CUDA): measured on the CPU they are
20-40x faster than gathers plus ``index_add_`` once rows hold hundreds of tokens. The CSR tensor is a
constant-time wrapper around the cached index arrays of the layout and the current values: no sort, coalesce or
densify happens per call. Those kernels take float32/float64 only, so half-precision operands are upcast, which is
also the float32 accumulation the other backends do.

Tiny problems are the exception: there a CSR call's fixed cost (building the handle, and MKL's threads, which
stall for milliseconds on a loaded machine) exceeds the work, and plain gathers are cheaper. The crossover,
:data:`GATHER_MAX_WORK` multiply-adds, was measured on the project's CPU machine (torch 2.13, one thread): at
64 x 128 with 40 nonzeros (5,120) the two cost the same, at 64 x 8 the gathers are 17-40% cheaper, and at
1024 x 8 with 10,485 nonzeros (84,000) CSR is 7-10x cheaper.
"""

from __future__ import annotations

import warnings

import torch

from .._numerics import acc_dtype
from .._tensor_cache import DERIVED
from ..registry import register_backend, register_impl

register_backend("torch", lambda device_type: None, preference=0)

GATHER_MAX_WORK = 4096

_warned_beta = False


def _csr(ptr: torch.Tensor, src: torch.Tensor, values: torch.Tensor, n_rows: int, n_cols: int) -> torch.Tensor:
    global _warned_beta
    if _warned_beta:
        return torch.sparse_csr_tensor(ptr, src, values, (n_rows, n_cols), check_invariants=False)
    # torch warns once per process that sparse CSR is "beta"; expected here, and not the user's concern. Caught on
    # the first construction only, rather than with a global filter that would hide it from the user's own code.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
        csr = torch.sparse_csr_tensor(ptr, src, values, (n_rows, n_cols), check_invariants=False)
        _warned_beta = True
        return csr


# A dtype or layout check costs less host time than a no-op .to() or .contiguous(), which is still an op call.
def _to(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _rows(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype`` with contiguous rows."""
    t = _to(t, dtype)
    return t if t.is_contiguous() else t.contiguous()


def _group_ids(ptr: torch.Tensor) -> torch.Tensor:
    """The group (row) of each grouped nonzero, derived once per layout."""
    return DERIVED.get(ptr, "group-ids", lambda: torch.repeat_interleave(
        torch.arange(ptr.numel() - 1, device=ptr.device), ptr.diff()))


def _tokens_major(t: torch.Tensor) -> bool:
    """Whether ``t`` (n x m) is the transpose of a contiguous (m x n) tensor: activations the CPU's GEMMs produced
    token-major (:func:`frod_kernels.engine.gemm_writes_transpose`), which the gathers then read as they are."""
    return t.shape[1] > 1 and t.stride(0) == 1 and t.stride(1) == t.shape[0]


@register_impl("row_gather_diag", "torch")
def row_gather_diag(A, diag, weights, ptr, src):
    acc = acc_dtype(A.dtype)
    n, m = A.shape
    d, w = _to(diag, acc), _to(weights, acc)
    if src.numel() * m <= GATHER_MAX_WORK:
        groups = _group_ids(ptr)
        if _tokens_major(A):  # work on the token-major rows: no transposed copy
            a = _to(A.t(), acc)
            out = a * d
            out.index_add_(1, groups, a.index_select(1, src) * w)
            return _to(out, A.dtype).t()
        a = _to(A, acc)
        out = a * d.unsqueeze(1)
        out.index_add_(0, groups, a.index_select(0, src) * w.unsqueeze(1))
        return _to(out, A.dtype)
    a = _rows(A, acc)  # contiguous rows for MKL's SpMM
    out = a * d.unsqueeze(1)
    if m:
        out += _csr(ptr, src, w, n, n) @ a
    return _to(out, A.dtype)


@register_impl("sampled_dot_diag", "torch")
def sampled_dot_diag(P, Q, ptr, src):
    acc = acc_dtype(P.dtype)
    n, m = P.shape
    if src.numel() * m <= GATHER_MAX_WORK:
        groups = _group_ids(ptr)
        if _tokens_major(P) and _tokens_major(Q):
            p, q = _to(P.t(), acc), _to(Q.t(), acc)
            return (p.index_select(1, groups) * q.index_select(1, src)).sum(0), (p * q).sum(0)
        p, q = _to(P, acc), _to(Q, acc)
        return (p.index_select(0, groups) * q.index_select(0, src)).sum(1), (p * q).sum(1)
    # Row-contiguous operands: MKL's SDDMM and the diagonal's elementwise product are each 2-6x slower on a
    # transposed view than one copy plus the contiguous kernels.
    p, q = _rows(P, acc), _rows(Q, acc)
    # not einsum: with a transposed operand it lowers to a batched matmul of row-by-row copies, 10x slower
    diag = (p * q).sum(1)
    mask = _csr(ptr, src, torch.zeros(src.numel(), dtype=acc, device=P.device), n, Q.shape[0])
    vals = torch.sparse.sampled_addmm(mask, p, q.transpose(0, 1), beta=0.0).values()
    return vals, diag
