"""The torch backend: pure-torch twins of the two kernel families, correct on any device, fast on the CPU.

The sparse steps run through torch's CSR kernels (MKL on the CPU, cuSPARSE on CUDA): measured on the CPU they are
20-40x faster than gathers plus ``index_add_`` once rows hold hundreds of tokens. The CSR tensor is a
constant-time wrapper around the cached index arrays of the layout and the current values: no sort, coalesce or
densify happens per call. Those kernels take float32/float64 only, so half-precision operands are upcast, which is
also the float32 accumulation the other backends do.

Short rows (a few tokens) are the exception: there MKL's sampled SDDMM costs milliseconds for a few thousand dot
products of length 8, while gathering both operands' rows and summing their products costs microseconds. The
crossover, :data:`GATHER_DOT_MAX_M`, was measured on the project's CPU machine (2 cores, torch 2.13, in = 1024,
1% density): the gather wins up to about 64 columns.
"""

from __future__ import annotations

import warnings

import torch

from .._numerics import acc_dtype
from ..registry import register_backend, register_impl

register_backend("torch", lambda device_type: None, preference=0)

GATHER_DOT_MAX_M = 64

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


def _to(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # a dtype check costs less host time than a no-op .to() on the hot path
    return t if t.dtype == dtype else t.to(dtype)


@register_impl("row_gather_diag", "torch")
def row_gather_diag(A, diag, weights, ptr, src):
    acc = acc_dtype(A.dtype)
    # contiguous rows for the SpMM, and a fresh contiguous result whatever A's strides (the schema promises it)
    a = _to(A, acc).contiguous()
    out = a * _to(diag, acc).unsqueeze(1)
    if src.numel() and A.shape[1]:
        out += _csr(ptr, src, _to(weights, acc), A.shape[0], A.shape[0]) @ a
    return _to(out, A.dtype)


@register_impl("sampled_dot_diag", "torch")
def sampled_dot_diag(P, Q, ptr, src):
    acc = acc_dtype(P.dtype)
    # Row-contiguous operands: MKL's SDDMM and the diagonal's elementwise product are each 2-6x slower on a
    # transposed view than one copy plus the contiguous kernels.
    p, q = _to(P, acc).contiguous(), _to(Q, acc).contiguous()
    # not einsum: with a transposed operand it lowers to a batched matmul of row-by-row copies, 10x slower
    diag = (p * q).sum(1)
    if src.numel() == 0:
        return torch.zeros(0, dtype=acc, device=P.device), diag
    if P.shape[1] <= GATHER_DOT_MAX_M:
        rows = torch.repeat_interleave(torch.arange(P.shape[0], device=P.device), ptr.diff())
        return (p[rows] * q[src]).sum(1), diag
    mask = _csr(ptr, src, torch.zeros(src.numel(), dtype=acc, device=P.device), P.shape[0], Q.shape[0])
    vals = torch.sparse.sampled_addmm(mask, p, q.transpose(0, 1), beta=0.0).values()
    return vals, diag
