"""``"auto"`` by measurement (frod_kernels.autotune), driven on the CPU with an injected timer.

The CPU is made a measured device for these tests, and a stand-in ``cuda`` backend (the torch twin behind a
counter, or a broken or wrong kernel) joins the real torch backend and the real Triton kernels (interpreted on the
CPU): the fastest candidate that computes the right result must win, failing and wrong ones must be left out with
a warning, choices must be cached in the process and, opt-in, on disk, and the deterministic mode must use the
fixed order without timing anything. Results are held to the float64 reference whatever was chosen.
"""

import json
import os
import warnings

import pytest
import torch

import frod_kernels as fk
from frod_kernels import autotune, engine, registry
from frod_kernels.backends import pytorch as torch_backend
from frod_kernels.layout import build_layout
from frod_kernels.reference import (TOLERANCE, reference_grads, reference_row_gather_diag,
                                    reference_sampled_dot_diag, rel_err)
from conftest import random_pattern, random_problem, run

HAS_TRITON = registry.unavailable_reason("triton", "cpu") is None
OP = "row_gather_diag"


class Harness:
    """Timings by candidate name; counts of timer and kernel calls."""

    def __init__(self, monkeypatch):
        self.times: dict[str, float] = {}
        self.timed: list[str] = []
        self.calls: dict[str, int] = {}
        self.monkeypatch = monkeypatch
        monkeypatch.setattr(autotune.state, "MEASURED_DEVICE_TYPES", {"cpu"})
        # a stand-in cuda backend that runs on the CPU, in the real one's place in the order
        registry.register_backend("cuda", lambda device_type: None, preference=20)
        # the C kernels run on the CPU only, so on a measured device (a GPU) they are never a candidate
        registry.register_backend("cpu", lambda device_type: "not a candidate where devices are measured",
                                  preference=-10)
        for op, twin in (("row_gather_diag", torch_backend.row_gather_diag),
                         ("sampled_dot_diag", torch_backend.sampled_dot_diag)):
            self.kernel("cuda", twin, op)
        autotune.clear()
        autotune.set_timer(self.timer)

    def timer(self, name, fn, device):
        self.timed.append(name)
        return self.times[name]

    def kernel(self, backend, fn, op=OP):
        """Install ``fn`` as ``backend``'s implementation of ``op``, counting its calls."""
        def counted(*args):
            self.calls[backend] = self.calls.get(backend, 0) + 1
            return fn(*args)

        registry.register_impl(op, backend)(counted)


@pytest.fixture
def harness(monkeypatch):
    with registry.scoped():
        h = Harness(monkeypatch)
        yield h
    autotune.set_timer(None)
    autotune.set_autotune(True, cache=False)
    autotune.clear()


def gather_args(n=40, m=24, nnz=90, dtype=torch.float32):
    g = torch.Generator().manual_seed(torch.randint(0, 2**31, ()).item())
    lay = build_layout(random_pattern(n, nnz, g), n)
    A = torch.randn(n, m, generator=g).to(dtype)
    diag = 0.5 + torch.rand(n, generator=g)
    w = torch.randn(lay.nnz, generator=g)
    return A, diag, w, lay.row_ptr, lay.row_src


def gather(args):
    return torch.ops.frod.row_gather_diag(*args)


def assert_right(out, args):
    assert rel_err(out, reference_row_gather_diag(*args)) <= TOLERANCE[args[0].dtype]


def test_fastest_correct_candidate_wins_and_is_cached(harness):
    harness.times = {"cuda": 0.5, "triton": 2.0, "torch": 1.5}
    args = gather_args()
    assert_right(gather(args), args)
    assert sorted(harness.timed) == sorted(harness.times)
    harness.timed.clear()
    calls = harness.calls["cuda"]
    for _ in range(3):
        assert_right(gather(args), args)
    assert harness.timed == [], "the second call of a shape class measured again"
    assert harness.calls["cuda"] == calls + 3
    # another shape of the same class reuses the choice; another class is measured
    other = gather_args(n=37, m=20, nnz=80)
    assert_right(gather(other), other)
    assert harness.timed == []
    gather(gather_args(n=300, m=24, nnz=900))
    assert sorted(harness.timed) == sorted(harness.times)


def test_torch_wins_when_it_is_fastest(harness):
    harness.times = {"cuda": 2.0, "triton": 3.0, "torch": 1.0}
    args = gather_args()
    gather(args)
    harness.calls.clear()
    assert_right(gather(args), args)
    assert harness.calls == {}, "a slower kernel ran instead of the torch twin"
    assert "'torch'" in fk.explain() and "fastest measured" in fk.explain()


def test_failing_candidate_is_left_out_with_a_warning(harness):
    def broken(*args):
        raise RuntimeError("ptxas: too many resources requested")

    harness.kernel("cuda", broken)
    harness.times = {"cuda": 0.1, "triton": 2.0, "torch": 1.0}
    args = gather_args()
    with pytest.warns(RuntimeWarning, match="'cuda' left out.*too many resources"):
        out = gather(args)
    assert_right(out, args)
    assert "cuda" not in harness.timed
    assert "left out cuda" in fk.explain()


def test_wrong_candidate_is_never_chosen(harness):
    harness.kernel("cuda", lambda *a: torch_backend.row_gather_diag(*a) * 1.01)
    harness.times = {"cuda": 0.1, "triton": 2.0, "torch": 1.0}
    args = gather_args()
    with pytest.warns(RuntimeWarning, match="'cuda' left out.*wrong result"):
        out = gather(args)
    assert_right(out, args)
    harness.calls.clear()
    gather(args)
    assert harness.calls.get("cuda", 0) == 0


def test_a_kernel_failing_after_it_was_chosen_falls_back_to_torch(harness):
    harness.times = {"cuda": 0.1, "triton": 2.0, "torch": 1.0}
    gather(gather_args())
    fail = {"now": False}

    def sometimes(*args):
        if fail["now"]:
            raise RuntimeError("illegal instruction")
        return torch_backend.row_gather_diag(*args)

    harness.kernel("cuda", sometimes)
    fail["now"] = True
    args = gather_args(n=35, m=22, nnz=80)  # same class: the cached choice runs, and fails
    with pytest.warns(RuntimeWarning, match="cuda kernel of row_gather_diag failed"):
        out = gather(args)
    assert_right(out, args)
    harness.calls.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_right(gather(args), args)
    assert harness.calls.get("cuda", 0) == 0, "a kernel that failed was tried again"
    assert "dropped after a failure: cuda for row_gather_diag" in fk.explain()


@pytest.mark.parametrize("how", ["deterministic", "off"])
def test_deterministic_or_off_is_the_fixed_order(harness, how):
    harness.times = {"cuda": 3.0, "triton": 2.0, "torch": 1.0}
    prev = torch.are_deterministic_algorithms_enabled()
    if how == "deterministic":
        torch.use_deterministic_algorithms(True)
    else:
        fk.set_autotune(False)
    try:
        args = gather_args()
        assert_right(gather(args), args)
        assert harness.timed == []
        assert harness.calls.get("cuda") == 1, "not the fixed order's first (cuda)"
        assert "fixed order" in fk.explain()
    finally:
        torch.use_deterministic_algorithms(prev)


def test_sampled_dot_choices_give_the_reference(harness):
    harness.times = {"cuda": 2.0, "triton": 0.5, "torch": 1.0} if HAS_TRITON else {"cuda": 0.5, "torch": 1.0}
    g = torch.Generator().manual_seed(torch.randint(0, 2**31, ()).item())
    n, m = 33, 19
    lay = build_layout(random_pattern(n, 70, g), n)
    P, Q = torch.randn(n, m, generator=g), torch.randn(n, m, generator=g)
    vals, diag = torch.ops.frod.sampled_dot_diag(P.t().contiguous().t(), Q, lay.row_ptr, lay.row_src)
    ref_vals, ref_diag = reference_sampled_dot_diag(P, Q, lay.row_ptr, lay.row_src)
    assert rel_err(vals, ref_vals) <= TOLERANCE[torch.float32] and rel_err(diag, ref_diag) <= TOLERANCE[torch.float32]
    assert min(harness.times, key=harness.times.get) in fk.explain()


@pytest.mark.parametrize("fastest", ["sparse", "factored", "materialized"])
def test_paths_are_measured_and_results_unchanged(harness, monkeypatch, fastest):
    harness.times = {"cuda": 1.0, "triton": 2.0, "torch": 3.0,
                     "sparse": 9.0, "factored": 9.0, "materialized": 9.0, fastest: 1.0}
    ran = []
    real_forward = engine.forward
    monkeypatch.setattr(engine, "forward", lambda *a: ran.append(a[7]) or real_forward(*a))
    problem = random_problem(48, 40, 120, lead=(2, 9), dtype=torch.float32)
    x, V, U, lam, s, si, b = problem
    grad_out = torch.randn(2, 9, 40)
    got = run(x, V, U, lam, s, si, b, grad_out)
    assert ran[-1] == {v: k for k, v in engine.PATH_NAMES.items()}[fastest]
    assert {"sparse", "factored", "materialized"} <= set(harness.timed)
    for g, r in zip(got, reference_grads(x, V, U, lam, s, si, b, grad_out)):
        assert rel_err(g, r) <= TOLERANCE[torch.float32]
    harness.timed.clear()
    run(x, V, U, lam, s, si, b, grad_out)
    assert harness.timed == [] and ran[-1] == ran[-2]
    assert f"path {fastest!r}" in fk.explain()


def test_measuring_paths_draws_nothing_from_the_callers_rng(harness):
    harness.times = {"cuda": 1.0, "triton": 2.0, "torch": 3.0, "sparse": 1.0, "factored": 2.0, "materialized": 3.0}
    x, V, U, lam, s, si, b = random_problem(40, 24, 60, lead=(5,))
    lam.requires_grad_(True)
    state = torch.get_rng_state()
    fk.frod_linear(x, V, U, lam, s, si, b)
    assert {"sparse", "factored", "materialized"} <= set(harness.timed)
    assert torch.equal(torch.get_rng_state(), state)


def test_choices_persist_in_a_cache_file(harness, tmp_path):
    path = tmp_path / "autotune.json"
    fk.set_autotune(cache=path)
    harness.times = {"cuda": 2.0, "triton": 3.0, "torch": 0.5}
    args = gather_args()
    gather(args)
    saved = json.loads(path.read_text())
    assert saved["format"] == autotune.FORMAT and len(saved["entries"]) == 1
    assert next(iter(saved["entries"].values()))["chosen"] == "torch"
    assert not [f for f in os.listdir(tmp_path) if f != "autotune.json"], "a temporary file was left behind"

    autotune.clear()  # a new process, as far as choices go
    harness.timed.clear()
    harness.calls.clear()
    gather(args)
    assert harness.timed == [] and harness.calls == {}, "the cache file's choice was not used"
    assert str(path) in fk.explain()


@pytest.mark.parametrize("content", ["{not json", json.dumps({"format": 99, "entries": {}}), json.dumps([1, 2])])
def test_a_corrupt_cache_file_is_ignored_and_rewritten(harness, tmp_path, content):
    path = tmp_path / "autotune.json"
    path.write_text(content)
    fk.set_autotune(cache=path)
    harness.times = {"cuda": 0.5, "triton": 3.0, "torch": 1.0}
    args = gather_args()
    with pytest.warns(RuntimeWarning, match="ignoring the cache file"):
        assert_right(gather(args), args)
    assert harness.timed, "nothing was measured"
    assert json.loads(path.read_text())["format"] == autotune.FORMAT


def test_the_cpu_is_not_measured_by_default(monkeypatch):
    autotune.set_timer(lambda *a: pytest.fail("measured on the CPU"))
    try:
        problem = random_problem(16, 12, 20, lead=(3,))
        x, V, U, lam, s, si, b = problem
        run(x, V, U, lam, s, si, b, torch.randn(3, 12))
        assert "cpu: choices on cpu are not measured" in fk.explain()
    finally:
        autotune.set_timer(None)


def test_settings_are_checked():
    with pytest.raises(TypeError, match="enabled"):
        fk.set_autotune("yes")
    with pytest.raises(TypeError, match="cache"):
        fk.set_autotune(cache=3)
    assert fk.get_autotune()["enabled"] is True


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU: the real timer measures on a GPU only")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_on_a_gpu_choices_are_measured_and_right(dtype):
    autotune.clear()
    x, V, U, lam, s, si, b = random_problem(256, 192, 600, lead=(4, 64), dtype=dtype, param_dtype=torch.float32,
                                            device="cuda")
    grad_out = torch.randn(4, 64, 192, device="cuda", dtype=dtype)
    got = run(x, V, U, lam, s, si, b, grad_out)
    report = fk.explain()
    assert "fastest measured" in report and "path" in report, report
    ref = reference_grads(x, V, U, lam, s, si, b, grad_out)
    for g, r in zip(got, ref):
        if r is not None:
            assert rel_err(g, r) <= TOLERANCE[dtype]


@pytest.fixture(params=["deterministic", "off"])
def fixed_order(request, harness):
    """The fixed order (nothing measured), by either switch."""
    prev = torch.are_deterministic_algorithms_enabled()
    if request.param == "deterministic":
        torch.use_deterministic_algorithms(True)
    else:
        fk.set_autotune(False)
    yield harness
    torch.use_deterministic_algorithms(prev)


def test_fixed_order_runs_a_kernel_only_once_it_matched_the_twin(fixed_order):
    twin_calls = []
    fixed_order.kernel("torch", lambda *a: twin_calls.append(1) or torch_backend.row_gather_diag(*a))
    args = gather_args()
    assert_right(gather(args), args)
    assert fixed_order.calls.get("cuda") == 1 and len(twin_calls) == 1, "the first call of a class verifies"
    assert "matched the torch twin" in fk.explain()
    for _ in range(3):
        assert_right(gather(args), args)
    assert fixed_order.calls["cuda"] == 4 and len(twin_calls) == 1, "a verified class was verified again"
    other = gather_args(n=300, m=24, nnz=900)  # another class: verified on its first call
    gather(other)
    assert len(twin_calls) == 2
    assert fixed_order.timed == []


@pytest.mark.parametrize("fault", ["wrong", "raises"])
def test_fixed_order_remembers_a_kernel_that_failed_its_check(fixed_order, fault):
    def bad(*args):
        if fault == "raises":
            raise RuntimeError("misaligned address")
        return torch_backend.row_gather_diag(*args) * 1.01

    fixed_order.kernel("cuda", bad)
    args = gather_args()
    with pytest.warns(RuntimeWarning, match="cuda kernel of row_gather_diag did not match the torch twin"):
        out = gather(args)
    assert_right(out, args)  # the next backend in the order (Triton, verified too) or the twin
    fixed_order.calls.clear()
    other = gather_args(n=300, m=24, nnz=900)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_right(gather(args), args)
        assert_right(gather(other), other)
    assert fixed_order.calls.get("cuda", 0) == 0, "a kernel that failed its check ran again"
    report = fk.explain()
    assert "dropped after a failure: cuda for row_gather_diag" in report
    assert ("wrong" in report) if fault == "wrong" else ("misaligned address" in report)


def test_a_wrong_kernel_found_while_measuring_is_remembered(harness):
    harness.kernel("cuda", lambda *a: torch_backend.row_gather_diag(*a) * 1.01)
    harness.times = {"cuda": 0.1, "triton": 2.0, "torch": 1.0}
    with pytest.warns(RuntimeWarning, match="'cuda' left out.*wrong result"):
        gather(gather_args())
    harness.calls.clear()
    gather(gather_args(n=300, m=24, nnz=900))  # another class: cuda is not even a candidate now
    assert harness.calls.get("cuda", 0) == 0 and "cuda" not in harness.timed[-3:]
    assert "dropped after a failure: cuda for row_gather_diag" in fk.explain()


def test_verifications_persist_in_the_cache_file(fixed_order, tmp_path):
    path = tmp_path / "autotune.json"
    fk.set_autotune(enabled=autotune.get_autotune()["enabled"], cache=path)
    args = gather_args()
    gather(args)
    entries = json.loads(path.read_text())["entries"]
    assert any(e.get("ok") and "matched the torch twin" in e["why"] for e in entries.values())
    autotune.clear()  # a new process, as far as verifications go
    twin_calls = []
    fixed_order.kernel("torch", lambda *a: twin_calls.append(1) or torch_backend.row_gather_diag(*a))
    fixed_order.calls.clear()
    assert_right(gather(args), args)
    assert twin_calls == [] and fixed_order.calls.get("cuda") == 1, "the cache file's verification was not used"
