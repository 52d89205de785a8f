"""What is the ``cpu`` backend's own (``frod_kernels/backends/cpu.py``, C kernels built on first use): the layouts
it reads and writes, its errors on bad groupings, determinism and threads, its build's failures, and the rule by
which ``"auto"`` runs it on the CPU (small calls). Both families are also held to float64 on every case and dtype
with the other backends in tests/ops/."""

import re
import threading

import pytest
import torch

import frod_kernels as fk
from frod_kernels import dispatch, registry
from frod_kernels.autotune import kernels as auto_kernels
from frod_kernels.backends import cpu
from frod_kernels.backends import pytorch as torch_backend
from frod_kernels.layout import build_layout
from frod_kernels.reference import TOLERANCE, reference_row_gather_diag, reference_sampled_dot_diag, rel_err
from conftest import random_pattern

REASON = registry.unavailable_reason("cpu", "cpu")
needs_c = pytest.mark.skipif(REASON is not None, reason=f"the C kernels cannot run here: {REASON}")


def groups(n, nnz, g):
    lay = build_layout(random_pattern(n, nnz, g), n)
    return lay.row_ptr, lay.row_src


def generator():
    return torch.Generator().manual_seed(torch.randint(0, 2**31, ()).item())


@needs_c
@pytest.mark.parametrize("m", [1, 7, 8, 9, 17, 64])
@pytest.mark.parametrize("token_major", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_both_families_against_float64_across_tiles_and_layouts(m, token_major, dtype):
    g = generator()
    n = 53
    ptr, src = groups(n, 400, g)

    def operand():
        t = torch.randn(m, n, generator=g, dtype=dtype)
        return t.t() if token_major else t.t().contiguous()

    A, P, Q = operand(), operand(), operand()
    diag, w = torch.randn(n, generator=g, dtype=dtype), torch.randn(src.numel(), generator=g, dtype=dtype)
    out = cpu.row_gather_diag(A, diag, w, ptr, src)
    assert rel_err(out, reference_row_gather_diag(A, diag, w, ptr, src)) <= TOLERANCE[dtype]
    # the layout it was given comes back: token-major in, token-major out (the next GEMM reads it contiguous)
    assert out.t().is_contiguous() if token_major and m > 1 else out.is_contiguous()
    vals, d = cpu.sampled_dot_diag(P, Q, ptr, src)
    ref_vals, ref_diag = reference_sampled_dot_diag(P, Q, ptr, src)
    assert rel_err(vals, ref_vals) <= TOLERANCE[dtype] and rel_err(d, ref_diag) <= TOLERANCE[dtype]


@needs_c
def test_deterministic_and_safe_from_threads():
    g = generator()
    n, m = 300, 24
    ptr, src = groups(n, 3000, g)
    A, Q = torch.randn(m, n, generator=g).t(), torch.randn(m, n, generator=g).t()
    diag, w = torch.randn(n, generator=g), torch.randn(src.numel(), generator=g)
    want = cpu.row_gather_diag(A, diag, w, ptr, src), cpu.sampled_dot_diag(A, Q, ptr, src)
    got = []

    def work():
        for _ in range(20):
            got.append((cpu.row_gather_diag(A, diag, w, ptr, src), cpu.sampled_dot_diag(A, Q, ptr, src)))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 80
    for out, (vals, d) in got:  # bitwise: one fixed order of summation, no shared state between calls
        assert torch.equal(out, want[0]) and torch.equal(vals, want[1][0]) and torch.equal(d, want[1][1])


@needs_c
def test_bad_groupings_are_errors_not_crashes():
    n, m = 6, 3
    A = torch.randn(n, m)
    ptr, src = torch.tensor([0, 1, 1, 2, 2, 3, 3]), torch.tensor([1, 0, 5])
    d, w = torch.ones(n), torch.ones(3)
    cpu.row_gather_diag(A, d, w, ptr, src)  # the grouping itself is fine
    with pytest.raises(ValueError, match="ptr: expected n \\+ 1 non-decreasing offsets"):
        cpu.row_gather_diag(A, d, w, torch.tensor([0, 1, 1, 2, 2, 3, 4]), src)  # ends past nnz
    with pytest.raises(ValueError, match="ptr: expected n \\+ 1 non-decreasing"):
        cpu.sampled_dot_diag(A, A, torch.tensor([0, 2, 1, 2, 2, 3, 3]), src)  # decreasing
    with pytest.raises(ValueError, match="src: expected row indices in \\[0, n\\)"):
        cpu.row_gather_diag(A, d, w, ptr, torch.tensor([1, 0, 6]))
    with pytest.raises(ValueError, match="src: expected row indices"):
        cpu.sampled_dot_diag(A, A, ptr, torch.tensor([-1, 0, 5]))
    with pytest.raises(ValueError, match="ptr: expected shape \\(7,\\)"):
        cpu.row_gather_diag(A, d, w, ptr[:-1], src)
    with pytest.raises(ValueError, match="weights: expected shape \\(3,\\)"):
        cpu.row_gather_diag(A, d, torch.ones(4), ptr, src)
    with pytest.raises(ValueError, match="Q: expected shape \\(6, 3\\)"):
        cpu.sampled_dot_diag(A, A[:, :2], ptr, src)
    with pytest.raises(TypeError, match="A: expected float16, bfloat16, float32 or float64"):
        cpu.row_gather_diag(A.int(), d, w, ptr, src)
    with pytest.raises(TypeError, match="src: expected int64"):
        cpu.row_gather_diag(A, d, w, ptr, src.float())
    with pytest.raises(ValueError, match="diag: expected a tensor on the CPU"):
        cpu.row_gather_diag(A, d.to("meta"), w, ptr, src)


def test_the_build_says_why_it_cannot_run(monkeypatch, tmp_path):
    bad = tmp_path / "cc"
    bad.write_text("#!/bin/sh\necho 'no such compiler here' >&2\nexit 3\n")
    bad.chmod(0o755)
    # a build that computes something else (as a miscompile would): the probe tries the kernels before use
    wrong = tmp_path / "wrong.c"
    source = open(cpu.SOURCE).read()
    assert "acc[j] += wk * row[j]" in source
    wrong.write_text(source.replace("acc[j] += wk * row[j]", "acc[j] -= wk * row[j]"))
    cases = [({"FROD_CPU_KERNELS": "0"}, None, "turned off by FROD_CPU_KERNELS=0"),
             ({"CC": str(tmp_path / "missing-cc")}, None, "did not run"),
             ({"CC": str(bad)}, None, "did not compile .*exit status 3.*no such compiler here"),
             ({}, str(wrong), "disagree with plain torch arithmetic: row_gather_diag in torch.float32")]
    try:
        for env, source_path, why in cases:
            if source_path is not None and REASON is not None:
                continue  # no compiler here to build the wrong source with
            cpu.load.cache_clear()
            with monkeypatch.context() as m:
                for k, v in env.items():
                    m.setenv(k, v)
                if source_path is not None:
                    m.setattr(cpu, "SOURCE", source_path)
                fns, reason = cpu.load()
            assert fns is None and reason is not None
            assert re.search(why, reason), reason
    finally:
        cpu.load.cache_clear()  # the next use builds again with the real compiler


def test_auto_runs_the_c_kernels_on_small_calls_on_the_cpu(monkeypatch):
    calls = []

    def counting(name, fn):
        def run(*args):
            calls.append(name)
            return fn(*args)
        return run

    # small limits, so that the test's sizes cross them: 40 rows, 200 nonzeros
    monkeypatch.setattr(auto_kernels, "CPU_KERNEL_MAX_WORK_TOKEN_MAJOR", 800)
    monkeypatch.setattr(auto_kernels, "CPU_KERNEL_MAX_WORK_FEATURE_MAJOR", 400)
    with registry.scoped():
        registry.register_backend("cpu", lambda device_type: None, preference=-10)
        for op, c_impl, twin in (("row_gather_diag", cpu.row_gather_diag, torch_backend.row_gather_diag),
                                 ("sampled_dot_diag", cpu.sampled_dot_diag, torch_backend.sampled_dot_diag)):
            registry.register_impl(op, "cpu")(counting("cpu", c_impl if REASON is None else twin))
            registry.register_impl(op, "torch")(counting("torch", twin))
        k = dispatch.kernels("cpu")
        g = generator()
        n = 40
        ptr, src = groups(n, 200, g)
        for m, token_major, backend in ((1, False, "cpu"), (2, False, "cpu"), (3, False, "torch"),
                                        (4, True, "cpu"), (5, True, "torch")):
            A = torch.randn(m, n, generator=g).t() if token_major else torch.randn(n, m, generator=g)
            w = torch.randn(src.numel(), generator=g)
            calls.clear()
            out = k.row_gather(A, torch.ones(n), w, ptr, src)
            vals, _ = k.sampled_dot(A, A, ptr, src)
            assert calls == [backend, backend], (m, token_major, calls)
            assert rel_err(out, reference_row_gather_diag(A, torch.ones(n), w, ptr, src)) <= TOLERANCE[torch.float32]
            assert rel_err(vals, reference_sampled_dot_diag(A, A, ptr, src)[0]) <= TOLERANCE[torch.float32]
        # where the C kernels cannot run, "auto" is the twin for any call
        registry.register_backend("cpu", lambda device_type: "no compiler (stand-in)", preference=-10)
        k = dispatch.kernels("cpu")
        calls.clear()
        k.row_gather(torch.randn(n, 1, generator=g), torch.ones(n), torch.randn(src.numel()), ptr, src)
        assert calls == ["torch"]


@needs_c
def test_named_backend_runs_the_c_kernels_on_any_call():
    g = generator()
    n, m = 40, 1 + auto_kernels.CPU_KERNEL_MAX_WORK_FEATURE_MAJOR // 200
    ptr, src = groups(n, 200, g)
    A, w = torch.randn(n, m, generator=g), torch.randn(src.numel(), generator=g)
    with fk.use_backend("cpu"):
        assert dispatch.kernels("cpu").row_gather.__module__ == cpu.__name__
        out = torch.ops.frod.row_gather_diag(A, torch.ones(n), w, ptr, src)
    assert rel_err(out, reference_row_gather_diag(A, torch.ones(n), w, ptr, src)) <= TOLERANCE[torch.float32]
