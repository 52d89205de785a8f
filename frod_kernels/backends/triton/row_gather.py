"""Row gather with diagonal (docs/DESIGN.md section 6, family 1), Triton.

``out[r] = diag[r] * A[r] + sum_{k in [ptr[r], ptr[r+1])} weights[k] * A[src[k]]``, A of shape (n, m).

Tiling: one program owns an output tile of BLOCK_R rows x BLOCK_M columns. It loads the diagonal term, then walks
the groups of its rows in lockstep (k = 0 .. the longest group of the tile; rows whose group is shorter are
masked), gathering one BLOCK_M-wide segment of a source row per row per step and accumulating in float32 (float64
for float64) registers. Every output element is written by exactly one program and summed in the layout's order
(ascending src within a group): no atomics, the same bits on every run of a tuned shape.

Two layouts of A arrive, and each gets its own tile shapes and its own autotune table:

* rows contiguous (z^T, dt^T: in x b, the apply steps): short and wide tiles (BLOCK_M up to 512) so every gather
  is one coalesced segment of a source row; for few tokens (b = 1..16) tall narrow tiles keep the program busy.
* columns contiguous (U^T for the full-rank update C^T = lambda * U^T + S^T U^T): tiles tall along A's contiguous
  dimension (BLOCK_R up to 256), so the diagonal term reads U with coalesced loads and the store of C^T (row-major)
  is coalesced along its columns. The grid runs the row-blocks fastest, so the programs in flight share one block
  of columns of A (= BLOCK_M rows of U), which then stays in L2 while its gathers are served: U is meant to come
  from DRAM once. Each gathered element of such an A is its own 32-byte sector, though (the gather walks A's
  strided dimension); whether that L2 traffic beats a transposed copy of U (1x extra read+write, then fully
  coalesced gathers) is the first thing to measure on a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, acc_dtype, autotune, bucket


@triton.jit
def _row_gather_diag_kernel(A, diag, weights, ptr, src, out, n, m, stride_an, stride_am, m_key, n_key,
                            ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr):
    # 64-bit row and column indices: n * m (and a strided A's span) may pass 2^31 elements.
    # One grid axis (CUDA caps axis 1 at 65535 blocks, which many tokens in small column tiles would pass), with
    # the row-blocks running fastest.
    pid = tl.program_id(0).to(tl.int64)
    n_row_blocks = tl.cdiv(n, BLOCK_R)
    rows = (pid % n_row_blocks) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = (pid // n_row_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < n
    cmask = cols[None, :] < m
    col_off = cols[None, :] * stride_am

    start = tl.load(ptr + rows, mask=rmask, other=0)
    deg = tl.load(ptr + rows + 1, mask=rmask, other=0) - start
    d = tl.load(diag + rows, mask=rmask, other=0).to(ACC)
    a = tl.load(A + rows[:, None] * stride_an + col_off, mask=rmask[:, None] & cmask, other=0).to(ACC)
    acc = a * d[:, None]
    for k in range(0, tl.max(deg, axis=0)):
        live = k < deg
        s = tl.load(src + start + k, mask=live, other=0)
        w = tl.load(weights + start + k, mask=live, other=0).to(ACC)
        g = tl.load(A + s[:, None] * stride_an + col_off, mask=live[:, None] & cmask, other=0).to(ACC)
        acc += w[:, None] * g
    tl.store(out + rows[:, None] * m + cols[None, :], acc.to(out.dtype.element_ty), mask=rmask[:, None] & cmask)


def _prune(configs, named_args, **kwargs):
    # Tiles far wider or taller than the problem only mask lanes off; keep the ones that fit (at least one).
    m, n = named_args["m_key"], named_args["n_key"]
    fit = [c for c in configs if c.kwargs["BLOCK_M"] <= max(16, m) and c.kwargs["BLOCK_R"] <= max(16, n)]
    return fit or configs[:1]


def _cfg(br, bm, warps, stages=2):
    return triton.Config({"BLOCK_R": br, "BLOCK_M": bm}, num_warps=warps, num_stages=stages)


# sm_80/sm_90: 2-8 warps, at most 32 fp32 elements of the tile per thread, 2-3 stages so the next gather is in
# flight while this one's FMAs run. tests/test_triton_compile.py compiles every config for both GPUs and fails on
# spills (python -m frod_kernels.triton.compile_report prints registers, spills, shared memory and occupancy).
_ROWS_CONTIGUOUS = autotune(
    [_cfg(1, 256, 2), _cfg(1, 512, 4), _cfg(2, 512, 4), _cfg(4, 256, 4), _cfg(4, 512, 8, 3), _cfg(8, 128, 4),
     _cfg(16, 64, 4), _cfg(32, 32, 4), _cfg(64, 16, 4), _cfg(128, 16, 8)],
    _cfg(8, 32, 4), key=["m_key", "n_key"], prune=_prune,
)(_row_gather_diag_kernel)

# No 256 x 32 tile: at 8 warps sm_80's ptxas held it to 128 registers a thread and spilled (16-bit data, sizes not
# multiples of 16); at 16 warps it spilled everywhere.
_COLS_CONTIGUOUS = autotune(
    [_cfg(64, 32, 4), _cfg(128, 32, 4), _cfg(64, 64, 8), _cfg(32, 128, 8), _cfg(256, 16, 4), _cfg(128, 16, 2)],
    _cfg(16, 16, 4), key=["m_key", "n_key"], prune=_prune,
)(_row_gather_diag_kernel)


def kernel_launch(A: torch.Tensor, diag: torch.Tensor, weights: torch.Tensor, ptr: torch.Tensor, src: torch.Tensor,
                  out: torch.Tensor):
    """The autotuner that serves A's layout, with its launch arguments: what :func:`row_gather_diag` launches and
    what :mod:`.compile_report` compiles for a GPU, so both see the same specialization."""
    n, m = A.shape
    # A column-contiguous A (U.t()) is read through its strides, never copied.
    kernel = _COLS_CONTIGUOUS if A.stride(0) == 1 and A.stride(1) != 1 else _ROWS_CONTIGUOUS
    args = (A, diag.contiguous(), weights.contiguous(), ptr.contiguous(), src.contiguous(), out, n, m, A.stride(0),
            A.stride(1), bucket(m), bucket(n))
    return kernel, args, {"ACC": acc_dtype(A.dtype)}


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
