"""The ``cpu`` backend: the two kernel families in plain C (``cpu_kernels.c``), for small calls on the CPU.

At few tokens each sparse step is tens of thousands of multiply-adds, and torch's CSR kernels (the torch twin)
spend most of their time around them: a sparse handle per call, int64 indices converted to int32, a transposed
copy of a token-major operand, MKL's threads woken. The C kernels take any strides and write the layout the next
GEMM reads, with nothing around the arithmetic. Measured on the project's CPU (2-core AMD EPYC, torch 2.13, float32,
in = 1024 with 10,485 nonzeros, 8 tokens): 0.05 ms against the twin's 0.08-0.14 for either family. They run on one
thread, so the twin's parallel kernels win on large calls; ``"auto"`` uses these up to a measured amount of work
(:func:`frod_kernels.autotune.kernels.small_on_cpu`).

Built once per process on first use by the system's C compiler (``$CC``, else ``cc``, ``gcc`` or ``clang``; well
under a second), from a source with no torch headers, so no torch version or build isolation is involved, and
loaded with ctypes, which releases the GIL during a call. The probe then runs both families once on a small
problem against plain torch arithmetic (the kernels meet the user's compiler, not CI's). Where no compiler is
found, the build or load fails, or the kernels disagree, the probe says why and the torch twin runs.
``FROD_CPU_KERNELS=0`` turns the backend off.
"""

from __future__ import annotations

import ctypes
import functools
import os
import shlex
import shutil
import subprocess
import tempfile
from typing import Optional

import torch

from .. import _env
from .._numerics import FLOAT_DTYPE_SET, acc_dtype
from ..registry import register_backend, register_impl

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_kernels.c")
FLAGS = ("-O3", "-std=c11", "-shared", "-fPIC")
_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
_ROW_GATHER_ARGS = [_I64, _I64, _PTR, _I64, _I64, _PTR, _PTR, _I64, _PTR, _PTR, _PTR, _I64, _I64]
_SAMPLED_DOT_ARGS = [_I64, _I64, _PTR, _I64, _I64, _PTR, _I64, _I64, _I64, _PTR, _PTR, _PTR, _PTR]


def compiler() -> Optional[list[str]]:
    """The compiler command: ``$CC`` (split like a shell word list), else the first of cc, gcc, clang found."""
    cc = os.environ.get("CC", "").strip()
    if cc:
        return shlex.split(cc)
    for name in ("cc", "gcc", "clang"):
        path = shutil.which(name)
        if path is not None:
            return [path]
    return None


@functools.lru_cache(maxsize=None)
def load() -> "tuple[Optional[dict], Optional[str]]":
    """``({(op, dtype): function}, None)`` once the kernels are built and loaded, else ``(None, reason)``."""
    if not _env.flag("FROD_CPU_KERNELS", True):
        return None, "turned off by FROD_CPU_KERNELS=0"
    cc = compiler()
    if cc is None:
        return None, "no C compiler found (set CC, or install cc, gcc or clang)"
    # a fresh directory per process: nothing shared to go stale or to race over; the file may go once loaded
    with tempfile.TemporaryDirectory(prefix="frod-cpu-kernels-", ignore_cleanup_errors=True) as tmp:
        lib_path = os.path.join(tmp, "frod_cpu_kernels.so")
        try:
            done = subprocess.run([*cc, *FLAGS, "-o", lib_path, SOURCE], capture_output=True, text=True, check=False,
                                  timeout=300)
        except (OSError, subprocess.TimeoutExpired) as e:
            return None, f"the C compiler {cc[0]} did not run: {e}"
        if done.returncode != 0:
            return None, (f"the C kernels did not compile ({' '.join(cc)}, exit status {done.returncode}): "
                          f"{done.stderr.strip()[-500:]}")
        try:
            lib = ctypes.CDLL(lib_path)
        except OSError as e:
            return None, f"the built C kernels do not load: {e}"
    fns = {}
    for dtype, suffix in _SUFFIX.items():
        for op, argtypes in (("row_gather_diag", _ROW_GATHER_ARGS), ("sampled_dot_diag", _SAMPLED_DOT_ARGS)):
            fn = getattr(lib, f"frod_{op}_{suffix}")
            fn.argtypes, fn.restype = argtypes, ctypes.c_int
            fns[op, dtype] = fn
    wrong = _disagreement(fns)
    if wrong is not None:
        return None, f"the C kernels built by {cc[0]} disagree with plain torch arithmetic: {wrong}"
    return fns, None


def _disagreement(fns: dict) -> Optional[str]:
    """None if the built kernels compute both families as plain torch ops do on a small problem (two tiles of
    tokens, a token-major operand: the paths a call takes), else what differs. The kernels meet the user's compiler,
    not CI's, so the probe tries them once per process, as :func:`frod_kernels.frozen_gemm.available` does."""
    g = torch.Generator().manual_seed(0)
    n, m = 6, 11
    ptr, src = torch.tensor([0, 2, 2, 3, 5, 5, 6]), torch.tensor([1, 4, 0, 2, 5, 3])
    rows = torch.repeat_interleave(torch.arange(n), ptr.diff())
    for dtype in _SUFFIX:
        A = torch.randn(m, n, generator=g, dtype=dtype).t()  # token-major, as the engine hands it over
        Q = torch.randn(n, m, generator=g, dtype=dtype)
        d, w = torch.randn(n, generator=g, dtype=dtype), torch.randn(src.numel(), generator=g, dtype=dtype)
        out, vals, diag = torch.empty(m, n, dtype=dtype).t(), torch.empty(src.numel(), dtype=dtype), \
            torch.empty(n, dtype=dtype)
        errs = (fns["row_gather_diag", dtype](n, m, A.data_ptr(), *A.stride(), d.data_ptr(), w.data_ptr(),
                                              src.numel(), ptr.data_ptr(), src.data_ptr(), out.data_ptr(),
                                              *out.stride()),
                fns["sampled_dot_diag", dtype](n, m, A.data_ptr(), *A.stride(), Q.data_ptr(), *Q.stride(),
                                               src.numel(), ptr.data_ptr(), src.data_ptr(), vals.data_ptr(),
                                               diag.data_ptr()))
        if any(errs):
            return f"{dtype}: error codes {errs} on a valid grouping"
        want = (d[:, None] * A).index_add(0, rows, w[:, None] * A[src]), (A[rows] * Q[src]).sum(1), (A * Q).sum(1)
        for name, got, ref in zip(("row_gather_diag", "sampled_dot_diag values", "sampled_dot_diag diagonal"),
                                  (out, vals, diag), want):
            if not torch.allclose(got, ref, rtol=1e-4, atol=1e-5):
                return f"{name} in {dtype}, largest difference {float((got - ref).abs().max()):.2e}"
    return None


def _probe(device_type: str) -> Optional[str]:
    if device_type != "cpu":
        return "the C kernels run on the CPU only"
    return load()[1]


# below the torch twin in the fixed order: a backend named by the user, or "auto"'s rule for small calls on the CPU
# (frod_kernels.autotune.kernels.small_on_cpu), runs it
register_backend("cpu", _probe, preference=-10)


def _operand(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _vector(name: str, t: torch.Tensor, length: Optional[int], dtype: torch.dtype, op: str) -> torch.Tensor:
    """``t`` as the contiguous 1-D ``dtype`` vector the C code indexes, its length checked (None: any)."""
    _on_cpu(name, t, op)
    if t.dim() != 1 or (length is not None and t.shape[0] != length):
        raise ValueError(f"{op}: {name}: expected shape ({'nnz' if length is None else length},), got "
                         f"{tuple(t.shape)}")
    t = t if t.dtype == dtype else t.to(dtype)
    return t if t.is_contiguous() else t.contiguous()


def _groups(ptr: torch.Tensor, src: torch.Tensor, n: int, op: str) -> tuple[torch.Tensor, torch.Tensor]:
    for name, t in (("ptr", ptr), ("src", src)):
        if t.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"{op}: {name}: expected int64 (or int32), got {t.dtype}")
    return _vector("ptr", ptr, n + 1, torch.int64, op), _vector("src", src, None, torch.int64, op)


# the name a call carries in torch.profiler, which sees no aten op here (the overhead suite counts these)
PROFILER_PREFIX = "frod_cpu::"


def _run(op: str, dtype: torch.dtype, *args) -> None:
    fn = load()[0][op, dtype]
    if torch.autograd._profiler_enabled():
        with torch.profiler.record_function(PROFILER_PREFIX + op):
            err = fn(*args)
    else:
        err = fn(*args)
    if err == -1:
        raise MemoryError(f"{op}: out of memory for the C kernel's scratch tile")
    if err:
        raise ValueError(f"{op}: " + ("ptr: expected n + 1 non-decreasing offsets from 0 to nnz" if err == -2 else
                                      "src: expected row indices in [0, n)"))


def _on_cpu(name: str, t: torch.Tensor, op: str) -> None:
    # the C code reads host memory: a device pointer would be a crash, not an error
    if not t.is_cpu:
        raise ValueError(f"{op}: {name}: expected a tensor on the CPU (backend 'cpu'), got one on {t.device}")


def _operand_2d(name: str, t: torch.Tensor, op: str, like: Optional[torch.Tensor] = None) -> None:
    _on_cpu(name, t, op)
    if t.dim() != 2:
        raise ValueError(f"{op}: {name}: expected a 2-D tensor, got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPE_SET:
        raise TypeError(f"{op}: {name}: expected float16, bfloat16, float32 or float64, got {t.dtype}")
    if like is not None and (t.shape != like.shape or t.dtype != like.dtype):
        raise ValueError(f"{op}: {name}: expected shape {tuple(like.shape)} and dtype {like.dtype} (those of P), "
                         f"got {tuple(t.shape)} and {t.dtype}")


@register_impl("row_gather_diag", "cpu")
def row_gather_diag(A, diag, weights, ptr, src):
    op = "row_gather_diag"
    _operand_2d("A", A, op)
    acc = acc_dtype(A.dtype)
    a = _operand(A, acc)
    n, m = a.shape
    ptr, src = _groups(ptr, src, n, op)
    d, w = _vector("diag", diag, n, acc, op), _vector("weights", weights, src.shape[0], acc, op)
    # the output in the operand's layout: token-major in, token-major out, so the next GEMM reads it contiguous
    out = a.new_empty(m, n).t() if a.stride(0) == 1 and m > 1 else a.new_empty(n, m)
    _run(op, acc, n, m, a.data_ptr(), a.stride(0), a.stride(1), d.data_ptr(), w.data_ptr(), src.shape[0],
         ptr.data_ptr(), src.data_ptr(), out.data_ptr(), out.stride(0), out.stride(1))
    return _operand(out, A.dtype)


@register_impl("sampled_dot_diag", "cpu")
def sampled_dot_diag(P, Q, ptr, src):
    op = "sampled_dot_diag"
    _operand_2d("P", P, op)
    _operand_2d("Q", Q, op, like=P)
    acc = acc_dtype(P.dtype)
    p, q = _operand(P, acc), _operand(Q, acc)
    n, m = p.shape
    ptr, src = _groups(ptr, src, n, op)
    vals, diag = p.new_empty(src.shape[0]), p.new_empty(n)
    _run(op, acc, n, m, p.data_ptr(), p.stride(0), p.stride(1), q.data_ptr(), q.stride(0), q.stride(1),
         src.shape[0], ptr.data_ptr(), src.data_ptr(), vals.data_ptr(), diag.data_ptr())
    return vals, diag
