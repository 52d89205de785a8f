"""Sampled dot with diagonal (docs/DESIGN.md section 6, family 2), Triton: SDDMM fused with the diagonal gradient.

``vals[k] = <P[a_k], Q[src[k]]>`` for each nonzero k (``a_k``: the row whose group holds k) and
``diag[j] = <P[j], Q[j]>``, P and Q of shape (n, m); ``dS`` and ``dlambda`` in one pass over P and Q.

Tiling: one program owns BLOCK_R rows of P, one chunk of the reduction dimension m, and walks its rows' groups
BLOCK_K nonzeros at a time. For each BLOCK_M-wide slice of the chunk it loads the P tile (BLOCK_R x BLOCK_M) once
and the BLOCK_R x BLOCK_K gathered Q rows, and accumulates the products in a 3-D register tile reduced over m at
the end: a P row is read once per BLOCK_K nonzeros of its group (from L1/L2 after the first), a Q row segment once
per nonzero that names it. The diagonal dots ride along in the first group tile's sweep, so they cost one more
load of Q's own rows and no extra pass over P.

Long reductions (many tokens: m = 16384) are split into a fixed number of chunks that depends on m only; each
chunk writes its partial dots to its own row of a (chunks x nnz) buffer, and a second pass sums the rows in chunk
order. No atomics, one fixed summation order: the same bits on every run of a tuned shape. Few tokens take one
chunk and write the results directly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._numerics import bucket
from ._common import autotune, tl_acc_dtype

# Reduction length per chunk, and the most chunks. 2048 tokens keep a 4096 x 16384 problem at 8 chunks (16k+
# programs with one-row tiles) while the partial buffers stay at a few nnz-sized rows.
SPLIT_CHUNK = 2048
MAX_SPLITS = 16


@triton.jit
def _sampled_dot_diag_kernel(P, Q, ptr, src, vals, diag, n, m, nnz, chunk, stride_pn, stride_pm, stride_qn, stride_qm,
                             m_key, deg_key, layout_key, ACC: tl.constexpr, BLOCK_R: tl.constexpr,
                             BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    split = tl.program_id(1).to(tl.int64)
    m_lo = split * chunk
    m_hi = tl.minimum(m_lo + chunk, m)
    rmask = rows < n
    start = tl.load(ptr + rows, mask=rmask, other=0)
    deg = tl.load(ptr + rows + 1, mask=rmask, other=0) - start
    p_rows = P + rows[:, None] * stride_pn
    q_rows = Q + rows[:, None] * stride_qn
    n_tiles = tl.maximum(tl.cdiv(tl.max(deg, axis=0), BLOCK_K), 1)  # at least one sweep, for the diagonal
    for kt in range(0, n_tiles):
        kk = kt * BLOCK_K + tl.arange(0, BLOCK_K)
        live = kk[None, :] < deg[:, None]  # (BLOCK_R, BLOCK_K)
        s = tl.load(src + start[:, None] + kk[None, :], mask=live, other=0)
        q_gather = Q + s[:, :, None] * stride_qn
        dmask = rmask & (kt == 0)
        acc = tl.zeros((BLOCK_R, BLOCK_K, BLOCK_M), dtype=ACC)
        dacc = tl.zeros((BLOCK_R, BLOCK_M), dtype=ACC)
        for mo in range(m_lo, m_hi, BLOCK_M):
            cols = mo + tl.arange(0, BLOCK_M)
            cmask = cols < m_hi
            p = tl.load(p_rows + cols[None, :] * stride_pm, mask=rmask[:, None] & cmask[None, :], other=0).to(ACC)
            qd = tl.load(q_rows + cols[None, :] * stride_qm, mask=dmask[:, None] & cmask[None, :], other=0).to(ACC)
            dacc += p * qd
            q = tl.load(q_gather + cols[None, None, :] * stride_qm, mask=live[:, :, None] & cmask[None, None, :],
                        other=0).to(ACC)
            acc += p[:, None, :] * q
        tl.store(vals + split * nnz + start[:, None] + kk[None, :], tl.sum(acc, axis=2), mask=live)
        tl.store(diag + split * n + rows, tl.sum(dacc, axis=1), mask=dmask)


def _prune(configs, named_args, **kwargs):
    m, deg = named_args["m_key"], named_args["deg_key"]
    fit = [c for c in configs if c.kwargs["BLOCK_M"] <= max(16, m) and c.kwargs["BLOCK_K"] <= max(4, 2 * deg)]
    return fit or configs[:1]


def _cfg(br, bk, bm, warps, stages=2):
    return triton.Config({"BLOCK_R": br, "BLOCK_K": bk, "BLOCK_M": bm}, num_warps=warps, num_stages=stages)


# sm_80/sm_90: the 3-D tile stays at 4096 elements per program, 16-32 per thread, so acc and the gathered Q tile fit
# in registers. The 4 x 8 x 128 and 32 x 8 x 16 tiles take 8 warps: at 4, sm_80's ptxas spilled them (float32, or
# sizes not multiples of 16). tests/backends/test_triton_compile.py compiles every config for both GPUs and fails on
# spills.
# Key: the size classes, the operands' layout (which of P and Q has contiguous rows: a tile tuned for coalesced rows
# is the wrong one for strided rows), and, added by Triton's autotuner, every tensor argument's dtype.
_KERNEL = autotune(
    [_cfg(1, 16, 256, 4), _cfg(1, 32, 128, 4), _cfg(1, 64, 64, 8), _cfg(2, 16, 128, 4), _cfg(4, 8, 128, 8),
     _cfg(4, 16, 64, 4), _cfg(16, 8, 32, 4), _cfg(32, 8, 16, 8), _cfg(64, 4, 16, 8), _cfg(16, 16, 16, 4)],
    _cfg(8, 4, 32, 4), key=["m_key", "deg_key", "layout_key"], prune=_prune,
)(_sampled_dot_diag_kernel)


def _layout_class(P: torch.Tensor, Q: torch.Tensor) -> int:
    """0-3: bit 0 set where P's rows are contiguous, bit 1 where Q's are (a single column counts as contiguous)."""
    return sum(bit for bit, t in ((1, P), (2, Q)) if t.shape[1] <= 1 or t.stride(1) == 1)


def n_splits(m: int) -> int:
    """Chunks of the reduction dimension: a function of m only, so the summation order never depends on tuning."""
    return max(1, min(MAX_SPLITS, triton.cdiv(m, SPLIT_CHUNK)))


def kernel_launch(P: torch.Tensor, Q: torch.Tensor, ptr: torch.Tensor, src: torch.Tensor, vals: torch.Tensor,
                  diag: torch.Tensor):
    """The autotuner and its launch arguments for output buffers ``vals`` (chunks x nnz) and ``diag`` (chunks x n):
    what :func:`sampled_dot_diag` launches and what :mod:`.compile_report` compiles for a GPU."""
    n, m = P.shape
    nnz = src.shape[0]
    chunk = triton.cdiv(m, vals.shape[0])
    mean_deg = triton.cdiv(nnz, n)
    args = (P, Q, ptr.contiguous(), src.contiguous(), vals, diag, n, m, nnz, chunk, P.stride(0), P.stride(1),
            Q.stride(0), Q.stride(1), bucket(m), bucket(mean_deg), _layout_class(P, Q))
    return _KERNEL, args, {"ACC": tl_acc_dtype(P.dtype)}


def sampled_dot_diag(P: torch.Tensor, Q: torch.Tensor, ptr: torch.Tensor, src: torch.Tensor):
    n, m = P.shape
    nnz = src.shape[0]
    acc = torch.float64 if P.dtype == torch.float64 else torch.float32
    if n == 0 or m == 0:
        return torch.zeros(nnz, dtype=acc, device=P.device), torch.zeros(n, dtype=acc, device=P.device)
    splits = n_splits(m)
    # One chunk writes the results in place; several write partial rows that the second pass sums in order.
    vals = torch.empty((splits, nnz), dtype=acc, device=P.device)
    diag = torch.empty((splits, n), dtype=acc, device=P.device)

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_R"]), splits)

    kernel, args, kwargs = kernel_launch(P, Q, ptr, src, vals, diag)
    kernel[grid](*args, **kwargs)
    if splits == 1:
        return vals[0], diag[0]
    return vals.sum(0), diag.sum(0)
