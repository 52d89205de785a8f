"""Hardening: bad input fails loudly before any kernel runs, strided inputs, no aliasing, determinism, sizes.

Every bad-input case checks the error type and that the message starts with the argument's name; a patched backend
resolver proves no kernel ran first. Determinism runs each case several times on fresh allocations and compares
bits, for every backend that can run here (torch; Triton under its interpreter on the CPU).
"""

import os
import re

import pytest
import torch
from torch import nn

import frod_kernels as fk
from frod_kernels import _validation, dispatch, engine, registry
from frod_kernels.layout import build_layout, packed_size
from frod_kernels.reference import TOLERANCE, reference_grads, rel_err
from conftest import random_pattern, random_problem

PATHS = [*engine.PATH_NAMES.values(), None]
HAS_GPU = torch.cuda.is_available()


def backends_here():
    """(backend, device) pairs that can run in this process, each a param that skips with the reason otherwise."""
    out = []
    for backend, device in (("torch", "cpu"), ("triton", "cpu"), ("torch", "cuda"), ("triton", "cuda"),
                            ("cuda", "cuda")):
        reason = "no CUDA GPU" if device == "cuda" and not HAS_GPU else registry.unavailable_reason(backend, device)
        out.append(pytest.param(backend, device, id=f"{backend}-{device}",
                                marks=pytest.mark.skipif(reason is not None, reason=str(reason))))
    return out


@pytest.fixture
def interpreter_env(monkeypatch):
    # tests/backends/test_triton_backend.py removes TRITON_INTERPRET when its module ends; the kernels stay
    # interpreted for the process (Triton fixed that at import), so the variable is set again to match.
    if not HAS_GPU and os.environ.get("TRITON_INTERPRET") is None:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture
def no_kernels(monkeypatch):
    def refuse(device_type):
        raise AssertionError("a kernel was resolved before the input was rejected")

    monkeypatch.setattr(dispatch, "kernels", refuse)


def good_args():
    x, V, U, lam, s, si, b = random_problem(8, 5, 6, lead=(4,))
    return dict(x=x, V=V, U=U, lambda_l=lam, s_values=s, s_indices=si, bias=b)


def with_value(name, index, value):
    def edit(args):
        t = args[name].clone()
        t[index] = value
        return t
    return edit


def meta(name):
    return lambda args: args[name].to("meta")


# (argument, replacement: a tensor or a function of the good args, exception type)
BAD_FROD_LINEAR = {
    "x not a tensor": ("x", lambda a: a["x"].tolist(), TypeError),
    "x 0-D": ("x", torch.tensor(1.0), ValueError),
    "x int": ("x", lambda a: a["x"].int(), TypeError),
    "x complex": ("x", lambda a: a["x"].to(torch.complex64), TypeError),
    "x sparse": ("x", lambda a: a["x"].to_sparse(), TypeError),
    "x wrong in": ("x", torch.randn(4, 9), ValueError),
    "V 1-D": ("V", torch.randn(8), ValueError),
    "V not square": ("V", torch.randn(8, 9), ValueError),
    "V float8": ("V", lambda a: a["V"].to(torch.float8_e4m3fn), TypeError),
    "U 3-D": ("U", torch.randn(1, 5, 8), ValueError),
    "U wrong in": ("U", torch.randn(5, 7), ValueError),
    "lambda_l 2-D": ("lambda_l", torch.randn(8, 1), ValueError),
    "lambda_l wrong length": ("lambda_l", torch.randn(7), ValueError),
    "lambda_l int": ("lambda_l", torch.ones(8, dtype=torch.int64), TypeError),
    "s_values wrong length": ("s_values", torch.randn(5), ValueError),
    "s_values 2-D": ("s_values", torch.randn(6, 1), ValueError),
    "s_indices 3 rows": ("s_indices", torch.zeros(3, 6, dtype=torch.long), ValueError),
    "s_indices float": ("s_indices", lambda a: a["s_indices"].float(), TypeError),
    "s_indices bool": ("s_indices", lambda a: a["s_indices"].bool(), TypeError),
    "s_indices negative": ("s_indices", with_value("s_indices", (0, 0), -1), ValueError),
    "s_indices too large": ("s_indices", with_value("s_indices", (1, 3), 8), ValueError),
    "s_indices diagonal": ("s_indices", lambda a: torch.tensor([[0, 1, 2, 3, 4, 5], [1, 2, 3, 4, 5, 5]]), ValueError),
    "s_indices duplicate": ("s_indices", lambda a: torch.tensor([[0, 1, 2, 3, 4, 0], [1, 2, 3, 4, 5, 1]]), ValueError),
    "bias wrong length": ("bias", torch.randn(4), ValueError),
    "bias 2-D": ("bias", torch.randn(1, 5), ValueError),
    "V on meta": ("V", meta("V"), ValueError),
    "U on meta": ("U", meta("U"), ValueError),
    "lambda_l on meta": ("lambda_l", meta("lambda_l"), ValueError),
    "s_values on meta": ("s_values", meta("s_values"), ValueError),
    "s_indices on meta": ("s_indices", meta("s_indices"), ValueError),
    "bias on meta": ("bias", meta("bias"), ValueError),
    "V requires grad": ("V", lambda a: a["V"].requires_grad_(True), ValueError),
    "U requires grad": ("U", lambda a: a["U"].requires_grad_(True), ValueError),
    "V NaN": ("V", with_value("V", (3, 2), float("nan")), ValueError),
    "U inf": ("U", with_value("U", (1, 7), float("inf")), ValueError),
    "lambda_l NaN": ("lambda_l", with_value("lambda_l", 5, float("nan")), ValueError),
    "s_values -inf": ("s_values", with_value("s_values", 0, float("-inf")), ValueError),
    "bias NaN": ("bias", with_value("bias", 2, float("nan")), ValueError),
}


def assert_names(excinfo, name):
    msg = str(excinfo.value)
    assert re.match(rf"{re.escape(name)}\b", msg), f"message does not start with {name!r}: {msg}"


@pytest.mark.parametrize("case", list(BAD_FROD_LINEAR))
def test_frod_linear_rejects_bad_input(case, no_kernels):
    name, bad, exc = BAD_FROD_LINEAR[case]
    args = good_args()
    args[name] = bad(args) if callable(bad) else bad
    with pytest.raises(exc) as e:
        fk.frod_linear(**args)
    assert_names(e, name)


@pytest.mark.parametrize("case", ["wrong size", "wrong dtype", "wrong device"])
def test_frod_linear_rejects_bad_layout(case, no_kernels):
    args = good_args()
    packed = build_layout(args["s_indices"], 8).packed
    layout = {"wrong size": packed[:-1], "wrong dtype": packed.int(), "wrong device": packed.to("meta")}[case]
    with pytest.raises((ValueError, TypeError)) as e:
        fk.frod_linear(**args, layout=layout)
    assert_names(e, "layout")


def test_bad_path_and_backend_names(no_kernels):
    with pytest.raises(ValueError) as e:
        fk.frod_linear(**good_args(), path="fast")
    assert_names(e, "path")
    with pytest.raises(ValueError) as e:
        fk.set_backend("gpu")
    assert_names(e, "backend")


def test_an_optimizer_step_costs_only_the_finite_checks_it_made_stale(monkeypatch):
    args = good_args()
    lam = args["lambda_l"]
    fk.frod_linear(**args)
    full, finite = [], []
    real_full = _validation._check_arguments
    monkeypatch.setattr(_validation, "_check_arguments", lambda *a: full.append(1) or real_full(*a))
    real_finite = _validation.check_finite
    monkeypatch.setattr(_validation, "check_finite", lambda name, t: finite.append(name) or real_finite(name, t))
    fk.frod_linear(**args)
    assert full == [] and finite == []  # nothing changed: nothing re-checked
    with torch.no_grad():
        lam.mul_(1.5)  # what an optimizer step does: same tensor, new version
    fk.frod_linear(**args)
    assert full == [] and set(finite) <= {"lambda_l", "s_values", "bias"} and "lambda_l" in finite
    with torch.no_grad():
        lam[2] = float("nan")  # and a NaN it writes is still caught ("auto" reads trainable tensors on the CPU)
    with pytest.raises(ValueError) as e:
        fk.frod_linear(**args)
    assert_names(e, "lambda_l")
    args["lambda_l"] = torch.ones(7)  # another tensor (here of the wrong shape) is checked in full
    with pytest.raises(ValueError) as e:
        fk.frod_linear(**args)
    assert_names(e, "lambda_l")
    assert full == [1]


def test_finite_checks_switch(monkeypatch):
    args = good_args()
    args["lambda_l"][1] = float("nan")
    with _validation.checks(finite=False):
        y = fk.frod_linear(**args)  # the caller asked for speed: NaN flows through, as in any torch layer
    assert torch.isnan(y).any()
    args = good_args()
    args["x"][0, 0] = float("inf")
    assert not torch.isfinite(fk.frod_linear(**args)).all()  # "auto" never reads the activations
    with _validation.checks(finite=True), pytest.raises(ValueError) as e:
        fk.frod_linear(**args)
    assert_names(e, "x")
    assert _validation.get_checks() == {"finite": "auto"}
    with pytest.raises(ValueError) as e:
        _validation.set_checks(finite=1)
    assert_names(e, "finite")
    for raw, want in (("0", False), ("on", True), ("AUTO", "auto")):
        monkeypatch.setenv("FROD_CHECK_FINITE", raw)
        assert _validation._finite_from_env() == want
    monkeypatch.setenv("FROD_CHECK_FINITE", "maybe")
    with pytest.raises(ValueError, match="^FROD_CHECK_FINITE"):
        _validation._finite_from_env()


def test_frozen_tensors_are_rechecked_after_an_in_place_write():
    args = good_args()
    fk.frod_linear(**args)  # V and U checked once here, then not read again while unchanged
    args["V"][2, 2] = float("nan")
    with pytest.raises(ValueError) as e:
        fk.frod_linear(**args)
    assert_names(e, "V")


# ---- FrodLinear.from_linear and replace_linears -----------------------------------------------------------------

def nan_linear():
    lin = nn.Linear(12, 6)
    with torch.no_grad():
        lin.weight[3, 4] = float("nan")
    return lin


BAD_FROM_LINEAR = {
    "module type": ("linear", dict(linear=nn.Conv2d(3, 3, 1)), TypeError),
    "V not a tensor": ("V", dict(V=[[1.0]]), TypeError),
    "V wrong size": ("V", dict(V=torch.eye(10)), ValueError),
    "V not square": ("V", dict(V=torch.randn(12, 10)), ValueError),
    "V NaN": ("V", dict(V=torch.full((12, 12), float("nan"))), ValueError),
    "sparse_rate negative": ("sparse_rate", dict(sparse_rate=-0.1), ValueError),
    "sparse_rate above 1": ("sparse_rate", dict(sparse_rate=1.5), ValueError),
    "sparse_rate NaN": ("sparse_rate", dict(sparse_rate=float("nan")), ValueError),
    "sparse_rate string": ("sparse_rate", dict(sparse_rate="0.1"), ValueError),
    "seed float": ("seed", dict(seed=1.5), TypeError),
    "dropout 1": ("dropout", dict(dropout=1.0), ValueError),
    "adapter_dtype int": ("adapter_dtype", dict(adapter_dtype=torch.int64), TypeError),
    "regularization_alpha negative": ("regularization_alpha", dict(regularization_alpha=-1.0), ValueError),
    "s_indices float": ("s_indices", dict(s_indices=torch.tensor([[0.0, 1.5], [2.0, 3.0]])), TypeError),
    "s_indices diagonal": ("s_indices", dict(s_indices=torch.tensor([[0, 1], [0, 3]])), ValueError),
    "s_indices out of range": ("s_indices", dict(s_indices=torch.tensor([[0, 12], [1, 3]])), ValueError),
    "weight NaN": ("linear.weight", dict(linear=nan_linear()), ValueError),
}


@pytest.mark.parametrize("case", list(BAD_FROM_LINEAR))
def test_from_linear_rejects_bad_input(case):
    name, kw, exc = BAD_FROM_LINEAR[case]
    kw = {"linear": nn.Linear(12, 6), **kw}
    with pytest.raises(exc) as e:
        fk.FrodLinear.from_linear(**kw)
    assert_names(e, name)


def test_from_linear_unsupported_module_names_the_supported_types():
    with pytest.raises(TypeError) as e:
        fk.FrodLinear.from_linear(nn.Embedding(5, 4))
    assert "Embedding" in str(e.value) and "torch.nn.modules.linear.Linear" in str(e.value)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(10, 10)
        self.v_proj = nn.Linear(10, 8)
        self.emb = nn.Embedding(7, 10)


BAD_REPLACE = {
    "model": ("model", dict(model=[nn.Linear(4, 4)]), TypeError),
    "target_modules type": ("target_modules", dict(target_modules=3), TypeError),
    "target_modules entries": ("target_modules", dict(target_modules=["q_proj", 3]), TypeError),
    "no match": ("target_modules", dict(target_modules=["k_proj"]), ValueError),
    "unsupported module": ("target_modules", dict(target_modules=["q_proj", "emb"]), TypeError),
    "sparse_rate": ("sparse_rate", dict(sparse_rate=2.0), ValueError),
    "seed": ("seed", dict(seed="0"), TypeError),
    "dropout": ("dropout", dict(dropout=-0.5), ValueError),
    "adapter_dtype": ("adapter_dtype", dict(adapter_dtype="float32"), TypeError),
}


@pytest.mark.parametrize("case", list(BAD_REPLACE))
def test_replace_linears_rejects_bad_input(case):
    name, kw, exc = BAD_REPLACE[case]
    kw = {"model": Tiny(), "target_modules": ["q_proj", "v_proj"], "progressbar": False, **kw}
    with pytest.raises(exc) as e:
        fk.replace_linears(**kw)
    assert_names(e, name)
    if case == "unsupported module":
        assert "emb (Embedding)" in str(e.value) and "Linear" in str(e.value)


def test_replace_linears_names_the_module_with_a_non_finite_weight():
    model = Tiny()
    with torch.no_grad():
        model.v_proj.weight[0, 0] = float("inf")
    with pytest.raises(ValueError) as e:
        fk.replace_linears(model, ["q_proj", "v_proj"], progressbar=False)
    assert_names(e, "v_proj.weight")
    assert isinstance(model.q_proj, nn.Linear)  # rejected before any module was replaced


# ---- strided inputs, aliasing ------------------------------------------------------------------------------------

def strided_twins(problem):
    """Each input as a non-contiguous view holding the same values: transposed, sliced, stepped, expanded."""
    x, V, U, lam, s, si, b = problem
    xt = x.transpose(-1, -2).contiguous().transpose(-1, -2)  # column-major within each matrix
    Vt = V.t().contiguous().t()
    Ubig = torch.randn(U.shape[0] + 3, U.shape[1] + 5, dtype=U.dtype)
    Ubig[2:-1, 4:-1] = U
    Us = Ubig[2:-1, 4:-1]
    lam2 = torch.randn(2 * lam.shape[0], dtype=lam.dtype)
    lam2[::2] = lam
    s2 = torch.randn(3 * s.shape[0], dtype=s.dtype)
    s2[1::3] = s
    si_t = si.t().contiguous().t()
    b2 = torch.randn(2 * b.shape[0], dtype=b.dtype)
    b2[1::2] = b
    out = (xt, Vt, Us, lam2[::2], s2[1::3], si_t, b2[1::2])
    for t in out[:6]:
        assert t.numel() <= 1 or not t.is_contiguous()
    return out


def run(x, V, U, lam, s, si, b, grad_out, path):
    leaves = [t.detach().clone().requires_grad_(True) for t in (lam, s, b)]
    xg = x.detach().requires_grad_(True) if x.is_leaf else x
    y = fk.frod_linear(xg, V, U, *leaves[:2], si, leaves[2], path=path)
    y.backward(grad_out)
    return [y, xg.grad] + [t.grad for t in leaves]


@pytest.mark.parametrize("backend,device", backends_here())
@pytest.mark.parametrize("path", PATHS)
def test_strided_inputs_match_contiguous(backend, device, path, interpreter_env):
    dtype = torch.float32
    problem = random_problem(24, 19, 60, lead=(3, 5), dtype=dtype)
    grad_out = torch.randn(3, 5, 19)
    strided = strided_twins(problem)
    with fk.use_backend(backend):
        dense = run(*[t.to(device) for t in problem], grad_out.to(device), path)
        got = run(*[t.to(device) if t.device.type != device else t for t in strided], grad_out.to(device), path)
    ref = reference_grads(*problem, grad_out)
    for name, g, d, r in zip(("y", "dx", "dlambda", "ds", "dbias"), got, dense, ref):
        assert rel_err(g, d) <= TOLERANCE[dtype], name
        assert rel_err(g, r) <= TOLERANCE[dtype], name


@pytest.mark.parametrize("backend,device", backends_here())
@pytest.mark.parametrize("path", PATHS)
def test_expanded_leading_dims(backend, device, path, interpreter_env):
    x, V, U, lam, s, si, b = (None if t is None else t.to(device) for t in random_problem(20, 12, 40, lead=(4,)))
    base = x.detach().clone().requires_grad_(True)
    xe = base.expand(3, 4, 20)  # stride 0 over the first dim
    grad_out = torch.randn(3, 4, 12, device=device)
    with fk.use_backend(backend):
        y = fk.frod_linear(xe, V, U, lam, s, si, b, path=path)
        y.backward(grad_out)
    ref = reference_grads(xe.detach(), V, U, lam, s, si, b, grad_out)
    assert rel_err(y, ref[0]) <= TOLERANCE[torch.float32]
    assert rel_err(base.grad, ref[1].sum(0)) <= TOLERANCE[torch.float32]


def storages(*tensors):
    return {t.untyped_storage().data_ptr() for t in tensors if t is not None and t.numel()}


@pytest.mark.parametrize("backend,device", backends_here())
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("lead,nnz", [((6,), 30), ((), 30), ((0,), 30), ((5,), 0)])
def test_outputs_never_alias_inputs(backend, device, path, lead, nnz, interpreter_env):
    problem = [None if t is None else t.to(device) for t in random_problem(16, 16, nnz, lead=lead)]
    x, V, U, lam, s, si, b = problem
    leaves = [t.requires_grad_(True) for t in (x, lam, s, b)]
    inputs = storages(*problem)
    with fk.use_backend(backend):
        y = fk.frod_linear(x, V, U, lam, s, si, b, path=path)
        grad_out = torch.randn_like(y)
        y.backward(grad_out)
    outputs = [y] + [t.grad for t in leaves]
    assert not storages(*outputs) & (inputs | storages(grad_out))
    assert len(storages(*outputs)) == len([t for t in outputs if t is not None and t.numel()])


def test_frod_linear_layer_output_is_fresh():
    layer = fk.FrodLinear.from_linear(nn.Linear(16, 16), sparse_rate=0.1)
    x = torch.randn(3, 16)
    y = layer(x)
    assert not storages(y) & storages(x, *layer.parameters(), *layer.buffers(), *layer.basis.buffers())


# ---- determinism -------------------------------------------------------------------------------------------------

def run_fresh(problem, grad_out, path, backend):
    # fresh allocations each run: a kernel whose result depends on alignment or thread scheduling shows up here
    clones = [None if t is None else t.clone() for t in problem]
    with fk.use_backend(backend):
        return [t.clone() for t in run(*clones, grad_out.clone(), path)]


@pytest.fixture(params=[False, True], ids=["default", "deterministic_algorithms"])
def deterministic_mode(request):
    prev, prev_warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(request.param)
    yield request.param
    torch.use_deterministic_algorithms(prev, warn_only=prev_warn)


@pytest.mark.parametrize("backend,device", backends_here())
@pytest.mark.parametrize("path", PATHS)
def test_bitwise_deterministic(backend, device, path, deterministic_mode, interpreter_env):
    # big enough for MKL's CSR kernels and GEMMs to split work over both cores on the CPU; small under Triton's
    # interpreter
    n_in, n_out, nnz, lead = (160, 96, 2000, (2, 150)) if backend == "torch" else (40, 24, 200, (33,))
    problem = [None if t is None else t.to(device) for t in random_problem(n_in, n_out, nnz, lead=lead,
                                                                           dtype=torch.bfloat16,
                                                                           param_dtype=torch.float32)]
    grad_out = torch.randn(*lead, n_out, dtype=torch.bfloat16, device=device)
    first = run_fresh(problem, grad_out, path, backend)
    for _ in range(2):
        again = run_fresh(problem, grad_out, path, backend)
        for name, a, b in zip(("y", "dx", "dlambda", "ds", "dbias"), first, again):
            assert torch.equal(a, b), f"{name} differs between runs ({backend}, {path})"
    ref = reference_grads(*problem, grad_out)
    for a, r in zip(first, ref):
        assert rel_err(a, r) <= TOLERANCE[torch.bfloat16]


# ---- sizes past 2^31 elements ------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", PATHS[:3])
def test_past_int32_sizes_on_meta(path):
    # Activations of 2^32 elements, never allocated: the validation, the engine's shapes and the fake (meta)
    # implementations of every op carry int64 sizes through forward and backward. The kernels index with int64
    # (torch: torch's own; Triton: program ids cast to int64 before any offset; CUDA C++: int64_t offsets).
    n, out, b, nnz = 4096, 2048, 2**20, 5000
    si = random_pattern(n, nnz, torch.Generator().manual_seed(0))
    layout = build_layout(si, n).packed.to("meta")
    assert layout.shape == (packed_size(n, nnz),)
    x = torch.empty(b, n, dtype=torch.bfloat16, device="meta", requires_grad=True)
    V = torch.empty(n, n, dtype=torch.bfloat16, device="meta")
    U = torch.empty(out, n, dtype=torch.bfloat16, device="meta")
    lam = torch.empty(n, device="meta", requires_grad=True)
    s = torch.empty(nnz, device="meta", requires_grad=True)
    y = fk.frod_linear(x, V, U, lam, s, si.to("meta"), layout=layout, path=path)
    assert y.shape == (b, out) and y.numel() >= 2**31
    y.backward(torch.empty_like(y))
    assert x.grad.shape == x.shape and lam.grad.shape == lam.shape and s.grad.shape == s.shape
