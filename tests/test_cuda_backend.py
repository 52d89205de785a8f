"""The CUDA C++ backend (csrc/): how it reports why it cannot run, its schemas, and on a GPU its parity with the
torch twin and the float64 reference (DESIGN.md section 5), kernel by kernel and through every path."""

import pytest
import torch

import frod_kernels as fk
from frod_kernels import dispatch, registry
from frod_kernels.backends import cuda as cuda_backend
from frod_kernels.backends import pytorch as torch_backend
from frod_kernels.layout import build_layout
from frod_kernels.reference import reference_grads, reference_row_gather_diag, reference_sampled_dot_diag, rel_err

from conftest import random_pattern, random_problem, tol

_REASON = fk.available_backends()["cuda"]["cuda"]
needs_cuda = pytest.mark.skipif(_REASON is not None, reason=f"cuda backend cannot run: {_REASON}")
_EXT, _EXT_REASON = cuda_backend.load_extension()
needs_extension = pytest.mark.skipif(_EXT is None, reason=f"extension not loadable: {_EXT_REASON}")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


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


# ---------------------------------------------------------------------------------------------------- GPU parity

def _grouped(n, nnz, g):
    lay = build_layout(random_pattern(n, nnz, g), n)
    return lay.row_ptr.cuda(), lay.row_src.cuda()


def _operand(n, m, dtype, kind, g):
    """An (n, m) operand laid out as the engine passes it: contiguous rows, transposed, or rows at an odd offset."""
    if kind == "contiguous":
        t = torch.randn(n, m, generator=g)
    elif kind == "transposed":
        t = torch.randn(m, n, generator=g).t()
    else:  # row stride m + 3, starting one element in: defeats 16-byte vector loads
        t = torch.randn(n, m + 3, generator=g)[:, 1 : m + 1]
    return t.to(device="cuda", dtype=dtype)


SHAPES = [(37, 1, 60), (37, 5, 0), (64, 8, 300), (129, 13, 900), (257, 300, 2000), (33, 1031, 200),
          (48, 5000, 400), (20, 0, 40)]


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("kind", ["contiguous", "transposed", "offset"])
@pytest.mark.parametrize("n,m,nnz", SHAPES)
def test_row_gather_diag(n, m, nnz, kind, dtype):
    g = torch.Generator().manual_seed(torch.randint(0, 2**31, ()).item())
    ptr, src = _grouped(n, nnz, g)
    A = _operand(n, m, dtype, kind, g)
    diag = (0.5 + torch.rand(n, generator=g)).cuda()
    w = torch.randn(src.numel(), generator=g).cuda()
    with fk.use_backend("cuda"):
        assert dispatch.kernels("cuda").row_gather is cuda_backend.row_gather_diag
        out = torch.ops.frod.row_gather_diag(A, diag, w, ptr, src)
        again = torch.ops.frod.row_gather_diag(A, diag, w, ptr, src)
    assert out.shape == (n, m) and out.dtype == dtype and out.is_contiguous()
    assert torch.equal(out, again), "not deterministic"
    assert rel_err(out, reference_row_gather_diag(A, diag, w, ptr, src)) <= tol(dtype)
    twin = torch_backend.row_gather_diag(A, diag, w, ptr, src)
    assert rel_err(out, twin.double()) <= 2 * tol(dtype)


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("kind", ["contiguous", "transposed", "offset"])
@pytest.mark.parametrize("n,m,nnz", SHAPES)
def test_sampled_dot_diag(n, m, nnz, kind, dtype):
    g = torch.Generator().manual_seed(torch.randint(0, 2**31, ()).item())
    ptr, src = _grouped(n, nnz, g)
    P = _operand(n, m, dtype, kind, g)
    Q = _operand(n, m, dtype, "contiguous", g)
    with fk.use_backend("cuda"):
        assert dispatch.kernels("cuda").sampled_dot is cuda_backend.sampled_dot_diag
        vals, diag = torch.ops.frod.sampled_dot_diag(P, Q, ptr, src)
        vals2, diag2 = torch.ops.frod.sampled_dot_diag(P, Q, ptr, src)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert vals.shape == (src.numel(),) and diag.shape == (n,) and vals.dtype == diag.dtype == acc
    assert torch.equal(vals, vals2) and torch.equal(diag, diag2), "not deterministic"
    ref_vals, ref_diag = reference_sampled_dot_diag(P, Q, ptr, src)
    # Inputs are exact in float64 and products accumulate in float32: the float32 bound holds for every dtype.
    bound = tol(torch.float64) if dtype == torch.float64 else 2 * tol(torch.float32) * max(1.0, m / 1000)
    assert rel_err(vals, ref_vals) <= bound
    assert rel_err(diag, ref_diag) <= bound
    t_vals, t_diag = torch_backend.sampled_dot_diag(P, Q, ptr, src)
    assert rel_err(vals, t_vals.double()) <= 2 * bound and rel_err(diag, t_diag.double()) <= 2 * bound


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
