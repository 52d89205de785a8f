"""The Triton backend: what is Triton's own (split reductions, determinism, the row-major copy of a strided operand,
autotune keys, the probe, 64-bit offsets), and the whole frod_linear (forward and backward, every engine path)
through it against the float64 reference. Each kernel family's test over every backend, Triton included, is in
tests/ops/.

Without a CUDA GPU the kernels run under Triton's interpreter on the CPU. Triton decides at its own import whether
its jit functions (its standard library's included) are interpreted, so TRITON_INTERPRET is set here, at
collection, before anything imports triton (frod_kernels imports it lazily, when a backend is first resolved), and
removed again when this module's tests are done. With a GPU the same checks run compiled on it.
"""

import os
import subprocess
import sys

import torch

HAS_GPU = torch.cuda.is_available()
USER_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
TRITON_PREIMPORTED = "triton" in sys.modules
if not HAS_GPU and not USER_INTERPRET:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

import frod_kernels as fk  # noqa: E402
from frod_kernels.backends import triton as triton_backend  # noqa: E402
from frod_kernels.layout import build_layout  # noqa: E402
from frod_kernels.reference import (  # noqa: E402
    TOLERANCE, reference_grads, reference_sampled_dot_diag, rel_err)
from conftest import operand, random_pattern, random_problem, run  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed")

DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(
        HAS_GPU and not USER_INTERPRET,
        reason="a CUDA GPU is present, so the kernels compile for it; run with TRITON_INTERPRET=1 for the "
               "interpreter")),
    pytest.param("cuda", marks=pytest.mark.skipif(not HAS_GPU, reason="no CUDA GPU")),
]
PATHS = ["sparse", "factored", "materialized"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(scope="module", autouse=True)
def _interpreter_without_gpu():
    if HAS_GPU or USER_INTERPRET:
        yield
        return
    if TRITON_PREIMPORTED:
        pytest.fail("triton was imported (in compiled mode) before tests/backends/test_triton_backend.py could "
                    "enable its interpreter: set TRITON_INTERPRET=1 before the run, or in tests/conftest.py")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        # The rest of the suite sees Triton as unavailable on the CPU again (the probe reads the variable).
        del os.environ["TRITON_INTERPRET"]


def _triton(op, *args):
    with fk.use_backend("triton"):
        return getattr(torch.ops.frod, op)(*args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("strided", [False, True])
def test_split_reduction_is_exact_and_deterministic(device, strided, monkeypatch):
    from frod_kernels.backends.triton import sampled_dot

    monkeypatch.setattr(sampled_dot, "SPLIT_CHUNK", 32)  # many tokens, in miniature: 129 columns in 5 chunks
    assert sampled_dot.n_splits(129) == 5
    n, m = 37, 129
    lay = build_layout(random_pattern(n, 150, torch.Generator().manual_seed(torch.seed() % 2**31)), n)
    ptr, src = lay.row_ptr.to(device), lay.row_src.to(device)
    P, Q = operand(n, m, torch.bfloat16, device, strided), operand(n, m, torch.bfloat16, device, False)
    vals, diag = _triton("sampled_dot_diag", P, Q, ptr, src)
    ref_vals, ref_diag = reference_sampled_dot_diag(P, Q, ptr, src)
    assert rel_err(vals, ref_vals) <= TOLERANCE[torch.float32]
    assert rel_err(diag, ref_diag) <= TOLERANCE[torch.float32]
    again = _triton("sampled_dot_diag", P, Q, ptr, src)
    assert torch.equal(vals, again[0]) and torch.equal(diag, again[1])


@pytest.mark.parametrize("device", DEVICES)
def test_row_gather_is_deterministic(device):
    n = 37
    lay = build_layout(random_pattern(n, 300, torch.Generator().manual_seed(torch.seed() % 2**31)), n)
    args = (operand(n, 40, torch.float32, device, True), torch.rand(n, device=device),
            torch.randn(300, device=device), lay.col_ptr.to(device), lay.col_src.to(device))
    assert torch.equal(_triton("row_gather_diag", *args), _triton("row_gather_diag", *args))


def test_gather_reads_a_row_contiguous_a():
    from frod_kernels.backends.triton import row_gather

    n, m = 37, 129
    lay = build_layout(random_pattern(n, 90, torch.Generator().manual_seed(torch.seed() % 2**31)), n)
    A = operand(n, m, torch.float32, "cpu", strided=True)
    out = torch.empty(n, m)
    _, args, _ = row_gather.kernel_launch(A, torch.rand(n), torch.randn(90), lay.col_ptr, lay.col_src, out)
    assert args[0].stride(1) == 1 and torch.equal(args[0], A)
    one_col = operand(n, 1, torch.float32, "cpu", strided=True)  # any stride serves a single column
    _, args, _ = row_gather.kernel_launch(one_col, torch.rand(n), torch.randn(90), lay.col_ptr, lay.col_src, out)
    assert args[0] is one_col


def test_sampled_dot_tunes_per_operand_layout():
    from frod_kernels.backends.triton import sampled_dot

    assert "layout_key" in sampled_dot._KERNEL.keys
    n, m = 37, 129
    lay = build_layout(random_pattern(n, 90, torch.Generator().manual_seed(torch.seed() % 2**31)), n)
    vals, diag = torch.empty(1, 90), torch.empty(1, n)
    classes = set()
    for p_strided in (False, True):
        for q_strided in (False, True):
            P, Q = (operand(n, m, torch.float32, "cpu", st) for st in (p_strided, q_strided))
            _, args, _ = sampled_dot.kernel_launch(P, Q, lay.row_ptr, lay.row_src, vals, diag)
            classes.add(args[sampled_dot._KERNEL.fn.arg_names.index("layout_key")])
    assert len(classes) == 4


def _check_layer(problem, dtype, path):
    # test_op's check, on any device, plus the torch backend as a second twin
    x, V, U, lam, s, si, b = problem
    grad_out = torch.randn(*x.shape[:-1], U.shape[0], dtype=x.dtype, device=x.device)
    with fk.use_backend("triton"):
        got = run(x, V, U, lam, s, si, b, grad_out, path=path)
    with fk.use_backend("torch"):
        twin = run(x, V, U, lam, s, si, b, grad_out, path=path)
    ref = reference_grads(x, V, U, lam, s, si, b, grad_out)
    for name, g, t, r in zip(["y", "dx", "dlambda", "ds", "dbias"], got, twin, ref):
        assert g.shape == r.shape and g.dtype == t.dtype, name
        if r.numel():
            assert rel_err(g, r) <= TOLERANCE[dtype], f"{name} vs float64: {rel_err(g, r):.2e} ({dtype})"
            assert rel_err(g, t) <= TOLERANCE[dtype], f"{name} vs torch: {rel_err(g, t):.2e} ({dtype})"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("param_dtype", ["float32", "same"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("path", PATHS)
def test_frod_linear_matches_reference(device, path, dtype, param_dtype):
    pd = torch.float32 if param_dtype == "float32" else dtype
    problem = random_problem(37, 29, 90, lead=(2, 3), dtype=dtype, param_dtype=pd, device=device)
    _check_layer(problem, dtype, path)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("n_in,n_out,nnz,lead", [
    (37, 53, 90, (1,)),     # one token, in < out
    (29, 29, 0, (4, 3)),    # empty pattern
    (41, 23, 60, (0,)),     # zero tokens
    (24, 17, 100, (129,)),  # a token count past one tile
])
def test_frod_linear_odd_shapes(device, path, n_in, n_out, nnz, lead):
    _check_layer(random_problem(n_in, n_out, nnz, lead=lead, dtype=torch.float32, device=device),
                 torch.float32, path)


def test_probe_reasons(monkeypatch):
    # the probe itself: the registry asks it once per process
    probe = triton_backend._probe
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "TRITON_INTERPRET" in probe("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert probe("cpu") is None
    assert (probe("cuda") is None) == HAS_GPU


def test_import_without_triton():
    # A fresh interpreter where `import triton` fails: frod_kernels imports, reports why, and runs on torch.
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, frod_kernels as fk\n"
        "reasons = fk.available_backends()['triton']\n"
        "assert all('triton is not importable' in r for r in reasons.values()), reasons\n"
        "x, V, U = torch.randn(3, 8), torch.eye(8), torch.randn(5, 8)\n"
        "y = fk.frod_linear(x, V, U, torch.ones(8), torch.zeros(2), torch.tensor([[0, 1], [2, 3]]))\n"
        "assert torch.allclose(y, x @ U.t(), atol=1e-6)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr


@pytest.mark.skipif(not HAS_GPU, reason="no CUDA GPU")
def test_offsets_past_2_31_elements():
    # 40000 x 60000 bf16 (2.4e9 elements, 4.8 GB): the last rows lie beyond int32 element offsets.
    n, m = 40000, 60000
    A = torch.randn(n, m, dtype=torch.bfloat16, device="cuda")
    rows = torch.tensor([n - 1, n - 2, 5])
    ptr = torch.zeros(n + 1, dtype=torch.long, device="cuda")
    ptr[n] = 2  # only row n - 1 has a group: it gathers rows 5 and n - 2
    src = torch.tensor([5, n - 2], device="cuda")
    w = torch.tensor([0.5, -1.5], device="cuda")
    diag = torch.rand(n, device="cuda")
    out = _triton("row_gather_diag", A, diag, w, ptr, src)
    a64 = A[rows.cuda()].double().cpu()
    ref = diag[n - 1].item() * a64[0] + 0.5 * a64[2] - 1.5 * a64[1]
    assert rel_err(out[n - 1], ref) <= TOLERANCE[torch.bfloat16]
    assert rel_err(out[n - 2], diag[n - 2].item() * a64[1]) <= TOLERANCE[torch.bfloat16]
    vals, d = _triton("sampled_dot_diag", A, A, ptr, src)
    assert rel_err(vals, torch.stack([a64[0] @ a64[2], a64[0] @ a64[1]])) <= TOLERANCE[torch.float32]
    assert rel_err(d[n - 1], a64[0] @ a64[0]) <= TOLERANCE[torch.float32]
