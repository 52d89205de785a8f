"""Property-based fuzzing of frod_linear against the float64 reference, for every backend that can run here.

Hypothesis draws shapes (1, odd, in != out), dtypes (float32/float16/bfloat16, and float32 lambda/s_values with
half activations as PEFT's adapter autocast makes them), pattern densities from empty to every off-diagonal
position, leading dims (zero tokens included), bias or not, and the path (or the cost model's choice). Examples
are fresh every run (not derandomized); a failure prints the drawn example, whose seed reproduces the data.
Triton runs under its interpreter on the CPU, so its examples stay small (dims <= 64) and fewer.
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import frod_kernels as fk
from frod_kernels import registry
from frod_kernels.reference import TOLERANCE, reference_grads, rel_err
from conftest import random_problem

HAS_GPU = torch.cuda.is_available()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (backend, device, largest dim, examples): about 15 s for torch and 30 s for the interpreter on 2 busy cores
TARGETS = [("torch", "cpu", 96, 60), ("triton", "cpu", 64, 16), ("torch", "cuda", 256, 100),
           ("triton", "cuda", 256, 100), ("cuda", "cuda", 256, 100)]


@st.composite
def problems(draw, max_dim):
    n_in = draw(st.integers(1, max_dim))
    n_out = draw(st.integers(1, max_dim))
    n_off = n_in * (n_in - 1)
    nnz = draw(st.one_of(st.just(0), st.just(n_off), st.integers(0, n_off)))
    lead = tuple(draw(st.lists(st.integers(0, 9), min_size=0, max_size=3)))
    dtype = draw(st.sampled_from(DTYPES))
    param_dtype = draw(st.sampled_from([dtype, torch.float32]))
    bias = draw(st.booleans())
    path = draw(st.sampled_from(["sparse", "factored", "materialized", None]))
    seed = draw(st.integers(0, 2**31 - 1))
    return n_in, n_out, nnz, lead, dtype, param_dtype, bias, path, seed


def check_example(example, backend, device):
    n_in, n_out, nnz, lead, dtype, param_dtype, bias, path, seed = example
    x, V, U, lam, s, si, b = random_problem(n_in, n_out, nnz, lead=lead, dtype=dtype, param_dtype=param_dtype,
                                            bias=bias, seed=seed, device=device)
    g = torch.Generator().manual_seed(seed + 1)
    grad_out = torch.randn(*lead, n_out, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    leaves = [None if t is None else t.detach().clone().requires_grad_(True) for t in (x, lam, s, b)]
    with fk.use_backend(backend):
        y = fk.frod_linear(leaves[0], V, U, leaves[1], leaves[2], si, leaves[3], path=path)
        y.backward(grad_out)
    got = [y] + [None if t is None else t.grad for t in leaves]
    ref = reference_grads(x, V, U, lam, s, si, b, grad_out)
    # Every quantity is a sum of products; with everything replaced by its absolute value the reference gives the
    # size of the terms before they cancel. A random draw can cancel a one-element output (out = 1, one token) far
    # below its terms, where docs/DESIGN.md's relative tolerance (about 10 units of roundoff of the half dtypes) no
    # longer covers the roundoff of the terms themselves: the denominator is at least a tenth of that size.
    mags = reference_grads(*(None if t is None else t.abs() for t in (x, V, U, lam, s)), si,
                           None if b is None else b.abs(), grad_out.abs())
    for name, a, r, m, want_dtype in zip(("y", "dx", "dlambda", "ds", "dbias"), got, ref, mags,
                                         (dtype, dtype, param_dtype, param_dtype, dtype)):
        if r is None:
            continue
        assert a.shape == r.shape and a.dtype == want_dtype and a.device.type == device, name
        err = rel_err(a, r)
        floor = float(torch.linalg.vector_norm(m)) / 10
        if torch.isfinite(torch.tensor(err)) and floor > float(torch.linalg.vector_norm(r)):
            err = float(torch.linalg.vector_norm(a.detach().double().cpu() - r)) / floor
        # the tolerance of the coarser of the two dtypes the quantity passes through
        limit = max(TOLERANCE[dtype], TOLERANCE[want_dtype])
        assert err <= limit, f"{name}: relative error {err:.2e} > {limit:.0e}"


def target_params():
    out = []
    for backend, device, max_dim, examples in TARGETS:
        reason = "no CUDA GPU" if device == "cuda" and not HAS_GPU else registry.unavailable_reason(backend, device)
        out.append(pytest.param(backend, device, max_dim, examples, id=f"{backend}-{device}",
                                marks=pytest.mark.skipif(reason is not None, reason=str(reason))))
    return out


@pytest.mark.parametrize("backend,device,max_dim,examples", target_params())
def test_fuzz_against_reference(backend, device, max_dim, examples, monkeypatch):
    if backend == "triton" and device == "cpu" and os.environ.get("TRITON_INTERPRET") is None:
        # tests/backends/test_triton_backend.py unsets it when its module ends
        monkeypatch.setenv("TRITON_INTERPRET", "1")

    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(problems(max_dim))
    def fuzz(example):
        check_example(example, backend, device)

    fuzz()
