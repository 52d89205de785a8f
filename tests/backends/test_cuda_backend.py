"""The CUDA C++ backend (csrc/): how it reports why it cannot run, its schemas and argument checks, and both kernels
against the float64 reference (docs/DESIGN.md section 5) over odd row lengths, aligned and misaligned row strides: on a
GPU through the torch glue, kernel by kernel and through every path; on the CPU, the same kernel and launcher source
run by csrc/simt_host.h (a warp emulation), wherever a C++ compiler and the CUDA headers are found."""

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import frod_kernels as fk
from frod_kernels import dispatch
from frod_kernels.backends import cuda as cuda_backend
from frod_kernels.layout import build_layout
from frod_kernels.reference import reference_grads, reference_row_gather_diag, reference_sampled_dot_diag, rel_err

from conftest import random_pattern, random_problem, tol

_REASON = fk.available_backends()["cuda"]["cuda"]
needs_cuda = pytest.mark.skipif(_REASON is not None, reason=f"cuda backend cannot run: {_REASON}")
_EXT, _EXT_REASON = cuda_backend.load_extension()
needs_extension = pytest.mark.skipif(_EXT is None, reason=f"extension not loadable: {_EXT_REASON}")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CSRC = Path(__file__).resolve().parents[2] / "csrc"


def test_probe_gives_a_reason_or_runs():
    reasons = fk.available_backends()["cuda"]
    assert isinstance(reasons["cpu"], str) and "CUDA devices only" in reasons["cpu"]
    if torch.cuda.is_available() and _EXT_REASON is None:
        assert reasons["cuda"] is None
        return
    assert isinstance(reasons["cuda"], str) and reasons["cuda"]
    if not torch.cuda.is_available():
        assert reasons["cuda"].startswith("no CUDA GPU")
    if _EXT_REASON is not None:
        assert _EXT_REASON in reasons["cuda"]


def test_selecting_cuda_where_it_cannot_run_raises():
    x, V, U, lam, s, idx, b = random_problem(16, 12, 20)
    with fk.use_backend("cuda"), pytest.raises(RuntimeError, match="backend 'cuda' cannot run on cpu"):
        fk.frod_linear(x, V, U, lam, s, idx, b, path="sparse")


def test_build_marker_decides_version_match(tmp_path):
    def binary(tag):
        p = tmp_path / f"_C_{len(list(tmp_path.iterdir()))}.so"
        body = b"" if tag is None else b"frod-kernels-cuda-build torch=" + tag.encode() + b";"
        p.write_bytes(b"\x7fELF\x00junk" + body + b"\x00more")
        return str(p)

    assert cuda_backend.check_build(binary(cuda_backend.build_tag(torch.__version__))) is None
    reason = cuda_backend.check_build(binary("0.0.1_cu999"))
    assert reason.startswith("version mismatch") and "0.0.1_cu999" in reason and torch.__version__ in reason
    assert "no build marker" in cuda_backend.check_build(binary(None))


@needs_extension
@pytest.mark.parametrize("op", ["row_gather_diag", "sampled_dot_diag"])
def test_cpp_schema_matches_python(op):
    py = str(getattr(torch.ops.frod, op).default._schema)
    cpp = str(getattr(torch.ops.frod_cuda, op).default._schema)
    assert cpp.removeprefix("frod_cuda::") == py.removeprefix("frod::")


# The glue's argument checks run before any CUDA call, so on the CPU they are reached by dispatching straight to the
# CUDA kernel with CPU tensors; a call that passes them fails later, at the device guard.
_CUDA_KEY = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)


def _gather_args():
    return dict(A=torch.randn(4, 5), diag=torch.randn(4), weights=torch.randn(2), ptr=torch.tensor([0, 1, 1, 2, 2]),
                src=torch.tensor([1, 2]))


@needs_extension
@pytest.mark.parametrize("change,error,match", [
    (dict(A=torch.randn(5)), ValueError, "A: expected a 2-D tensor"),
    (dict(A=torch.ones(4, 5, dtype=torch.int32)), TypeError, "A: expected float16, bfloat16, float32 or float64"),
    (dict(ptr=torch.tensor([0, 1, 1, 2])), ValueError, r"ptr: expected shape \(5,\)"),
    (dict(src=torch.tensor([1, 2], dtype=torch.int32)), TypeError, "src: expected int64"),
    (dict(diag=torch.randn(3)), ValueError, r"diag: expected shape \(4,\)"),
    (dict(weights=torch.randn(1)), ValueError, r"weights: expected shape \(2,\)"),
    (dict(A=torch.randn(4, 1).expand(4, 2**31)), ValueError, "rows of 2147483648 elements"),
])
def test_row_gather_glue_checks_its_arguments(change, error, match):
    args = {**_gather_args(), **change}
    with pytest.raises(error, match=match):
        torch.ops.frod_cuda.row_gather_diag.default.redispatch(_CUDA_KEY, *args.values())


@needs_extension
@pytest.mark.parametrize("change,error,match", [
    (dict(P=torch.randn(4)), ValueError, "P: expected a 2-D tensor"),
    (dict(Q=torch.randn(4, 6)), ValueError, r"Q: expected shape \[4, 5\] \(that of P\)"),
    (dict(Q=torch.randn(4, 5, dtype=torch.float64)), TypeError, "Q: expected dtype Float"),
    (dict(ptr=torch.tensor([[0, 1, 1, 2, 2]])), ValueError, "ptr: expected a 1-D tensor"),
    (dict(P=torch.randn(4, 1).expand(4, 2**31), Q=torch.randn(4, 1).expand(4, 2**31)), ValueError,
     "rows of 2147483648 elements"),
])
def test_sampled_dot_glue_checks_its_arguments(change, error, match):
    args = {**dict(P=torch.randn(4, 5), Q=torch.randn(4, 5), ptr=torch.tensor([0, 1, 1, 2, 2]),
                   src=torch.tensor([1, 2])), **change}
    with pytest.raises(error, match=match):
        torch.ops.frod_cuda.sampled_dot_diag.default.redispatch(_CUDA_KEY, *args.values())


@needs_extension
def test_glue_reaches_the_device_with_valid_arguments():
    with pytest.raises(RuntimeError, match="non-CUDA"):
        torch.ops.frod_cuda.row_gather_diag.default.redispatch(_CUDA_KEY, *_gather_args().values())


# --------------------------------------------------------------------------------- cases for the GPU and the CPU runs

# (n, m, nnz): one-element rows, rows shorter than one 16-byte slot, lengths no vector width divides, rows longer
# than one segment (32 lanes x 4 slots), no nonzeros, no columns; n not a multiple of a block's 4 warps.
SHAPES = [(37, 1, 60), (37, 5, 0), (64, 8, 300), (29, 13, 100), (67, 33, 400), (65, 300, 500), (33, 1031, 200),
          (20, 4099, 40), (20, 0, 40)]
# How the operand's rows lie: "contiguous" (row stride m: aligned only when 16 bytes divide a row), "padded" (row
# stride rounded up to 16 bytes: every row aligned, and a tail where m is not a multiple), "offset" (row stride
# m + 3, starting one element in: no two rows alike).
LAYOUTS = ["contiguous", "padded", "offset"]


def _grouped(n, nnz, g, device):
    lay = build_layout(random_pattern(n, nnz, g), n)
    return lay.row_ptr.to(device), lay.row_src.to(device)


def _operand(n, m, dtype, layout, g, device):
    """An (n, m) operand with unit column stride laid out as ``layout`` says, or ``transposed`` (column-contiguous,
    which the glue copies)."""
    if layout == "contiguous":
        t = torch.randn(n, m, generator=g)
    elif layout == "padded":
        vec = 16 // torch.empty(0, dtype=dtype).element_size()
        t = torch.randn(n, -(-m // vec) * vec + vec, generator=g)[:, :m]
    elif layout == "offset":
        t = torch.randn(n, m + 3, generator=g)[:, 1 : m + 1]
    else:
        t = torch.randn(m, n, generator=g).t()
    return t.to(device=device, dtype=dtype)


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _gather_case(n, m, nnz, dtype, layout, device):
    g = torch.Generator().manual_seed(torch.randint(0, 2**31, ()).item())
    ptr, src = _grouped(n, nnz, g, device)
    A = _operand(n, m, dtype, layout, g, device)
    diag = (0.5 + torch.rand(n, generator=g)).to(device=device, dtype=_acc(dtype))
    w = torch.randn(src.numel(), generator=g).to(device=device, dtype=_acc(dtype))
    return A, diag, w, ptr, src


def _dot_case(n, m, nnz, dtype, layout, device):
    g = torch.Generator().manual_seed(torch.randint(0, 2**31, ()).item())
    ptr, src = _grouped(n, nnz, g, device)
    # Q's rows lie unlike P's, so that every pairing of aligned and misaligned rows occurs
    other = {"contiguous": "offset", "padded": "contiguous", "offset": "padded", "transposed": "contiguous"}
    return _operand(n, m, dtype, layout, g, device), _operand(n, m, dtype, other[layout], g, device), ptr, src


def _check_gather(out, case, dtype):
    assert out.shape == case[0].shape and out.dtype == dtype
    assert rel_err(out, reference_row_gather_diag(*case)) <= tol(dtype)


def _check_dot(vals, diag, case, dtype):
    P, Q, ptr, src = case
    assert vals.shape == (src.numel(),) and diag.shape == (P.shape[0],) and vals.dtype == diag.dtype == _acc(dtype)
    ref_vals, ref_diag = reference_sampled_dot_diag(*case)
    # Products of exact inputs accumulate in float32 (float64 for float64): its bound holds for every input dtype.
    assert rel_err(vals, ref_vals) <= tol(_acc(dtype))
    assert rel_err(diag, ref_diag) <= tol(_acc(dtype))


# ---------------------------------------------------------------------------------------------------- on a GPU

@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("layout", LAYOUTS + ["transposed"])
@pytest.mark.parametrize("n,m,nnz", SHAPES)
def test_row_gather_diag(n, m, nnz, layout, dtype):
    case = _gather_case(n, m, nnz, dtype, layout, "cuda")
    with fk.use_backend("cuda"):
        assert dispatch.kernels("cuda").row_gather is cuda_backend.row_gather_diag
        out = torch.ops.frod.row_gather_diag(*case)
        again = torch.ops.frod.row_gather_diag(*case)
    assert out.is_contiguous()
    assert torch.equal(out, again), "not deterministic"
    _check_gather(out, case, dtype)


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("layout", LAYOUTS + ["transposed"])
@pytest.mark.parametrize("n,m,nnz", SHAPES)
def test_sampled_dot_diag(n, m, nnz, layout, dtype):
    case = _dot_case(n, m, nnz, dtype, layout, "cuda")
    with fk.use_backend("cuda"):
        assert dispatch.kernels("cuda").sampled_dot is cuda_backend.sampled_dot_diag
        vals, diag = torch.ops.frod.sampled_dot_diag(*case)
        vals2, diag2 = torch.ops.frod.sampled_dot_diag(*case)
    assert torch.equal(vals, vals2) and torch.equal(diag, diag2), "not deterministic"
    _check_dot(vals, diag, case, dtype)


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("path", ["sparse", "factored", "materialized"])
@pytest.mark.parametrize("n_in,n_out,nnz,lead", [(96, 80, 300, (3, 5)), (67, 131, 41, (9,)), (40, 24, 0, (4,)),
                                                 (64, 64, 200, (0,))])
def test_frod_linear_through_cuda(n_in, n_out, nnz, lead, path, dtype):
    x, V, U, lam, s, idx, b = random_problem(n_in, n_out, nnz, lead=lead, dtype=dtype, param_dtype=torch.float32,
                                             device="cuda")
    for t in (x, lam, s, b):
        t.requires_grad_(True)
    go = torch.randn(*lead, n_out, dtype=dtype, device="cuda")
    with fk.use_backend("cuda"):
        y = fk.frod_linear(x, V, U, lam, s, idx, b, path=path)
        y.backward(go)
    ref = reference_grads(x, V, U, lam, s, idx, b, go)
    for name, got, want in zip(("y", "dx", "dlambda", "ds", "dbias"), (y, x.grad, lam.grad, s.grad, b.grad), ref):
        assert rel_err(got, want) <= tol(dtype), f"{name} ({path}, {dtype})"


# ----------------------------------------------------------------------------- on the CPU, through csrc/simt_host.h

_CXX = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
_CUDA_INCLUDE = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "include"
needs_host_build = pytest.mark.skipif(
    _CXX is None or not (_CUDA_INCLUDE / "cuda_runtime.h").exists(),
    reason=f"the CPU run of csrc/ needs a C++ compiler (found {_CXX}) and the CUDA headers (none at {_CUDA_INCLUDE};"
           " set CUDA_HOME)")

# C entry points for ctypes, and the launch plan the kernels get.
_SHIM = """
#include "common.cuh"
using frod_cuda::DType;
extern "C" int row_gather_diag(int dt, const void* A, int64_t lda, const void* diag, const void* w, const int64_t* ptr,
                               const int64_t* src, void* out, int64_t n, int64_t m) {
  return frod_cuda::launch_row_gather_diag(DType(dt), A, lda, diag, w, ptr, src, out, n, m, nullptr);
}
extern "C" int64_t sampled_dot_diag_workspace(int dt, const void* P, int64_t ldp, const void* Q, int64_t ldq,
                                              int64_t n, int64_t nnz, int64_t m) {
  return frod_cuda::sampled_dot_diag_workspace(DType(dt), P, ldp, Q, ldq, n, nnz, m);
}
extern "C" int sampled_dot_diag(int dt, const void* P, int64_t ldp, const void* Q, int64_t ldq, const int64_t* ptr,
                                const int64_t* src, void* vals, void* diag, void* ws, int64_t n, int64_t nnz,
                                int64_t m) {
  return frod_cuda::launch_sampled_dot_diag(DType(dt), P, ldp, Q, ldq, ptr, src, vals, diag, ws, n, nnz, m, nullptr);
}
extern "C" void plan(int elem_size, const void* p, int64_t ld, int64_t m, int64_t* out) {
  const frod_cuda::Plan pl = frod_cuda::make_plan(elem_size, frod_cuda::rows_aligned(elem_size, p, ld), m);
  out[0] = pl.aligned, out[1] = pl.log_l, out[2] = pl.slots, out[3] = pl.n_seg;
}
"""
_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


@pytest.fixture(scope="module")
def host_kernels(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("simt_host")
    (tmp / "shim.cpp").write_text(_SHIM)
    lib = tmp / "libfrod_simt.so"
    cmd = [_CXX, "-std=c++17", "-O1", "-shared", "-fPIC", "-Wno-unknown-pragmas", "-x", "c++", "-include",
           str(CSRC / "simt_host.h"), f"-I{CSRC}", f"-I{_CUDA_INCLUDE}", str(CSRC / "row_gather_diag.cu"),
           str(CSRC / "sampled_dot_diag.cu"), str(tmp / "shim.cpp"), "-o", str(lib)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    so = ctypes.CDLL(str(lib))
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    so.row_gather_diag.argtypes = [ctypes.c_int, p, i64, p, p, p, p, p, i64, i64]
    so.sampled_dot_diag_workspace.argtypes = [ctypes.c_int, p, i64, p, i64, i64, i64, i64]
    so.sampled_dot_diag_workspace.restype = i64
    so.sampled_dot_diag.argtypes = [ctypes.c_int, p, i64, p, i64, p, p, p, p, p, i64, i64, i64]
    so.plan.argtypes = [ctypes.c_int, p, i64, i64, p]
    return so


def _guarded(numel, dtype, lead):
    """A NaN-filled buffer and a view of ``numel`` elements ``lead`` elements into it: writes outside the view show as
    changed guard elements, and an odd ``lead`` moves the view off 16-byte alignment."""
    buf = torch.full((lead + numel + 8,), float("nan"), dtype=dtype)
    return buf, buf[lead : lead + numel]


def _guards_intact(buf, lead, numel):
    return bool(buf[:lead].isnan().all() and buf[lead + numel :].isnan().all())


@needs_host_build
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("n,m,nnz", SHAPES)
def test_row_gather_diag_on_the_cpu(host_kernels, n, m, nnz, layout, dtype):
    A, diag, w, ptr, src = case = _gather_case(n, m, nnz, dtype, layout, "cpu")
    lead = 1 if layout == "offset" else 0  # the output too, aligned or not
    buf, out = _guarded(n * m, dtype, lead)
    rc = host_kernels.row_gather_diag(_DTYPE_CODE[dtype], A.data_ptr(), A.stride(0), diag.data_ptr(), w.data_ptr(),
                                      ptr.data_ptr(), src.data_ptr(), out.data_ptr(), n, m)
    assert rc == 0 and _guards_intact(buf, lead, n * m)
    _check_gather(out.view(n, m), case, dtype)


@needs_host_build
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("n,m,nnz", SHAPES)
def test_sampled_dot_diag_on_the_cpu(host_kernels, n, m, nnz, layout, dtype):
    P, Q, ptr, src = case = _dot_case(n, m, nnz, dtype, layout, "cpu")
    k, acc = src.numel(), _acc(dtype)
    ws = torch.empty(host_kernels.sampled_dot_diag_workspace(_DTYPE_CODE[dtype], P.data_ptr(), P.stride(0),
                                                             Q.data_ptr(), Q.stride(0), n, k, m), dtype=acc)
    vbuf, vals = _guarded(k, acc, 0)
    dbuf, diag = _guarded(n, acc, 0)
    rc = host_kernels.sampled_dot_diag(_DTYPE_CODE[dtype], P.data_ptr(), P.stride(0), Q.data_ptr(), Q.stride(0),
                                       ptr.data_ptr(), src.data_ptr(), vals.data_ptr(), diag.data_ptr(),
                                       ws.data_ptr() if ws.numel() else None, n, k, m)
    assert rc == 0 and _guards_intact(vbuf, 0, k) and _guards_intact(dbuf, 0, n)
    _check_dot(vals, diag, case, dtype)


@needs_host_build
@pytest.mark.parametrize("elem", [2, 4, 8])
def test_plan_keeps_16_byte_loads_for_any_row_length(host_kernels, elem):
    base = torch.empty(64, dtype=torch.float64)  # 16-byte aligned: torch aligns storage far more
    vec = 16 // elem
    for m in [1, vec - 1, vec, vec + 1, 127, 4 * 32 * vec, 4 * 32 * vec + 1, 100_003]:
        for ld, off, aligned in [(m, 0, m % vec == 0), (-(-m // vec) * vec, 0, True), (m + 3, 1, False)]:
            got = torch.empty(4, dtype=torch.int64)
            host_kernels.plan(elem, base.data_ptr() + off * elem, ld, m, got.data_ptr())
            is_aligned, log_l, slots, n_seg = got.tolist()
            # The load width never depends on m: only where rows start decides between one chunk and two.
            assert bool(is_aligned) == aligned, (m, ld, off)
            assert slots == -(-m // vec)
            # Segments x lanes x 4 slots a lane cover every slot once, with lanes to spare only in the last segment.
            lanes = 1 << log_l
            assert lanes <= 32 and n_seg == -(-slots // (4 * lanes))
            assert lanes == 32 or lanes >= -(-slots // 4) > lanes // 2
