"""Row gather with diagonal (docs/DESIGN.md section 6, family 1), Triton.

``out[r] = diag[r] * A[r] + sum_{k in [ptr[r], ptr[r+1])} weights[k] * A[src[k]]``, A of shape (n, m).

Tiling: one program owns an output tile of BLOCK_R rows x BLOCK_M columns. It loads the diagonal term, then walks
the groups of its rows in lockstep (k = 0 .. the longest group of the tile; rows whose group is shorter are
masked), gathering one BLOCK_M-wide segment of a source row per row per step and accumulating in float32 (float64
for float64) registers. Every output element is written by exactly one program and summed in the layout's order
(ascending src within a group): no atomics, the same bits on every run of a tuned shape.

A's rows are always contiguous here: a gather reads whole row segments, so each one is a coalesced load. An A with
strided rows (U.t() of a row-major U) is copied row-major once before the launch, as the CUDA C++ glue does: read
through its strides, each gathered element would be its own 32-byte sector. So there is one tile table, short and
wide tiles (BLOCK_M up to 512) for many tokens and tall narrow ones for few (b = 1..16).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._numerics import bucket
from ._common import INTERPRET, autotune, tl_acc_dtype


@triton.jit
def _row_gather_diag_kernel(A, diag, weights, ptr, src, out, n, m, stride_an, m_key, n_key, deg_key,
                            ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr):
    # 64-bit row and column indices: n * m (and a padded A's span) may pass 2^31 elements.
    # One grid axis (CUDA caps axis 1 at 65535 blocks, which many tokens in small column tiles would pass), with
    # the row-blocks running fastest.
    pid = tl.program_id(0).to(tl.int64)
    n_row_blocks = tl.cdiv(n, BLOCK_R)
    # Per-row values (group bounds, diagonal, index, weight, masks) are (BLOCK_R, 1) columns of the tile, never 1-D
    # vectors: Triton 3.6's layout-conversion pass rematerializes a 1-D value that feeds both a 1-D load and a 2-D
    # one in several layouts and then pairs a load's pointer with the mask of another copy ("'tt.load' op failed to
    # verify that mask type matches ptr type").
    rows = (pid % n_row_blocks) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
    cols = (pid // n_row_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)[None, :]
    rmask = rows < n
    cmask = cols < m
    start = tl.load(ptr + rows, mask=rmask, other=0)
    end = tl.load(ptr + rows + 1, mask=rmask, other=0)
    d = tl.load(diag + rows, mask=rmask, other=0).to(ACC)
    acc = d * tl.load(A + rows * stride_an + cols, mask=rmask & cmask, other=0).to(ACC)
    # Software-pipelined by one step: the next (src, weight) pair is loaded before this step's gather, so the
    # gather's address never waits on an index load issued in the same step.
    live = start < end
    s = tl.load(src + start, mask=live, other=0)
    w = tl.load(weights + start, mask=live, other=0).to(ACC)
    for k in range(0, tl.max(end - start)):
        nxt = start + (k + 1)
        live_next = nxt < end
        s_next = tl.load(src + nxt, mask=live_next, other=0)
        w_next = tl.load(weights + nxt, mask=live_next, other=0).to(ACC)
        acc += w * tl.load(A + s * stride_an + cols, mask=live & cmask, other=0).to(ACC)
        s, w, live = s_next, w_next, live_next
    tl.store(out + rows * m + cols, acc.to(out.dtype.element_ty), mask=rmask & cmask)


def _prune(configs, named_args, **kwargs):
    # Tiles far wider or taller than the problem only mask lanes off; keep the ones that fit (at least one).
    m, n = named_args["m_key"], named_args["n_key"]
    fit = [c for c in configs if c.kwargs["BLOCK_M"] <= max(16, m) and c.kwargs["BLOCK_R"] <= max(16, n)]
    return fit or configs[:1]


# Registers a thread may use. Left to itself, ptxas (12.8 and 12.9, sm_80 and sm_90) trades a few bytes of spills
# for occupancy at 40 or 56 registers, keeping a value that only the store after the loop reads in local memory; with
# a stated budget it allocates what the loop needs. 160: what tall tiles need for sizes that are not multiples of 16
# (each lane gathers 8 rows, one unvectorized load each, ptxas unrolls 4 steps); 8 warps of it fit an SM's 65,536.
_MAX_REGS = 160


def _cfg(br, bm, warps, stages=2):
    return triton.Config({"BLOCK_R": br, "BLOCK_M": bm}, num_warps=warps, num_stages=stages, maxnreg=_MAX_REGS)


# sm_80/sm_90: 2-8 warps, at most 32 fp32 elements of the tile per thread. tests/backends/test_triton_compile.py
# compiles every config for both GPUs with every Triton of CI's matrix and fails on spills (python -m
# frod_kernels.backends.triton.compile_report prints registers, spills, shared memory and occupancy).
# Key: the size classes and the mean group length (the gathers per output row); Triton's autotuner adds every
# tensor argument's dtype. A has one layout (rows contiguous), so the layout needs no key.
_KERNEL = autotune(
    [_cfg(1, 256, 2), _cfg(1, 512, 4), _cfg(2, 512, 4), _cfg(4, 256, 4), _cfg(4, 512, 8, 3), _cfg(8, 128, 4),
     _cfg(16, 64, 4), _cfg(32, 32, 4), _cfg(64, 16, 4), _cfg(128, 16, 8)],
    _cfg(8, 32, 4), key=["m_key", "n_key", "deg_key"], prune=_prune,
)(_row_gather_diag_kernel)


def kernel_launch(A: torch.Tensor, diag: torch.Tensor, weights: torch.Tensor, ptr: torch.Tensor, src: torch.Tensor,
                  out: torch.Tensor):
    """The autotuner with its launch arguments: what :func:`row_gather_diag` launches and what
    :mod:`.compile_report` compiles for a GPU, so both see the same specialization."""
    n, m = A.shape
    if m > 1 and A.stride(1) != 1:
        A = A.contiguous()
    args = (A, diag.contiguous(), weights.contiguous(), ptr.contiguous(), src.contiguous(), out, n, m, A.stride(0),
            bucket(m), bucket(n), bucket(triton.cdiv(src.shape[0], max(n, 1))))
    return _KERNEL, args, {"ACC": tl_acc_dtype(A.dtype)}


def row_gather_diag(A: torch.Tensor, diag: torch.Tensor, weights: torch.Tensor, ptr: torch.Tensor,
                    src: torch.Tensor) -> torch.Tensor:
    n, m = A.shape
    # Triton 3.9's interpreter casts float32 to bfloat16 by truncation (a GPU rounds to nearest even): when
    # interpreting, the kernel stores float32 and torch rounds.
    store_dtype = torch.float32 if INTERPRET and A.dtype == torch.bfloat16 else A.dtype
    out = torch.empty((n, m), dtype=store_dtype, device=A.device)
    if n == 0 or m == 0:
        return out.to(A.dtype)

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_R"]) * triton.cdiv(m, meta["BLOCK_M"]),)

    kernel, args, kwargs = kernel_launch(A, diag, weights, ptr, src, out)
    kernel[grid](*args, **kwargs)
    return out.to(A.dtype)
