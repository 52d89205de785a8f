"""frod_linear (torch backend) against the independent float64 reference: outputs and all gradients."""

import pytest
import torch

import frod_kernels as fk
from frod_kernels import cost_model, engine
from frod_kernels.reference import TOLERANCE, reference_grads, rel_err
from conftest import random_pattern, random_problem, run

PATHS = list(engine.PATH_NAMES.values())
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def check_against_reference(problem, dtype, **kw):
    x, V, U, lam, s, si, b = problem
    grad_out = torch.randn(*x.shape[:-1], U.shape[0], dtype=x.dtype)
    got = run(x, V, U, lam, s, si, b, grad_out, **kw)
    ref = reference_grads(x, V, U, lam, s, si, b, grad_out)
    for name, g, r in zip(["y", "dx", "dlambda", "ds", "dbias"], got, ref):
        if r is None:
            continue
        assert g.dtype == (x.dtype if name in ("y", "dx", "dbias") else lam.dtype), name
        if r.numel() == 0:
            assert g.shape == r.shape, name
            continue
        err = rel_err(g, r)
        assert err <= TOLERANCE[dtype], f"{name}: relative error {err:.2e} > {TOLERANCE[dtype]:.0e} ({dtype})"


@pytest.mark.parametrize("path", PATHS + [None])
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference(path, dtype):
    # float32 lambda/s_values with half-precision activations and weights is what PEFT's adapter autocast makes.
    problem = random_problem(96, 80, 400, lead=(3, 11), dtype=dtype, param_dtype=torch.float32)
    check_against_reference(problem, dtype, path=path)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("n_in,n_out,nnz,lead", [
    (37, 53, 90, (5,)),      # odd sizes, in < out
    (64, 17, 300, (1,)),     # one token, in > out
    (29, 29, 0, (4, 3)),     # empty pattern
    (41, 23, 60, (0,)),      # zero tokens
    (33, 31, 20, (2, 0, 5)),  # zero tokens among several leading dims
    (3, 2, 6, (4,)),         # every off-diagonal position
])
def test_odd_shapes(path, n_in, n_out, nnz, lead):
    problem = random_problem(n_in, n_out, nnz, lead=lead, dtype=torch.float32)
    check_against_reference(problem, torch.float32, path=path)


@pytest.mark.parametrize("path", PATHS)
def test_gradcheck_float64(path):
    x, V, U, lam, s, si, b = random_problem(23, 19, 70, lead=(2, 3), dtype=torch.float64)
    inputs = [t.requires_grad_(True) for t in (x, lam, s, b)]
    assert torch.autograd.gradcheck(lambda x, l, s_, b_: fk.frod_linear(x, V, U, l, s_, si, b_, path=path), inputs)


def test_no_bias_and_partial_grads():
    x, V, U, lam, s, si, _ = random_problem(40, 24, 100, lead=(9,), dtype=torch.float64)
    s.requires_grad_(True)  # only s_values trains; x and lambda_l stay frozen
    y = fk.frod_linear(x, V, U, lam, s, si)
    y.sum().backward()
    ref = reference_grads(x, V, U, lam, s, si, None, torch.ones_like(y))
    assert rel_err(s.grad, ref[3]) < 1e-10
    assert x.grad is None and lam.grad is None


def test_int32_indices_and_noncontiguous_x():
    x, V, U, lam, s, si, b = random_problem(48, 32, 150, lead=(6, 10), dtype=torch.float32)
    xt = x.transpose(0, 1).contiguous().transpose(0, 1)  # same values, strided
    assert not xt.is_contiguous()
    y = fk.frod_linear(xt, V, U, lam, s, si.int(), b)
    ref = reference_grads(x, V, U, lam, s, si, b, torch.ones(6, 10, 32))[0]
    assert rel_err(y, ref) <= TOLERANCE[torch.float32]


def test_cost_model_picks_by_shape():
    # few tokens: the sparse apply; many tokens (several times in): materialize W'; a tiny layer: the dense core,
    # whose extra arithmetic costs less than the host time it saves, unless a backend was named
    assert cost_model.choose_path(8, 1024, 1024, 10485, "cpu", True) == engine.SPARSE
    assert cost_model.choose_path(16384, 1024, 1024, 10485, "cpu", True) == engine.MATERIALIZED
    assert cost_model.choose_path(8, 64, 64, 40, "cpu", True) == engine.DENSE
    assert cost_model.choose_path(8, 64, 64, 40, "cpu", True, kernels_only=True) != engine.DENSE
    costs = cost_model.path_costs(2048, 1024, 1024, 10485, "cpu", True)
    assert set(costs) == set(engine.PATH_NAMES)
    # where the host's time was not measured, the model leaves the dense path out
    assert set(cost_model.path_costs(8, 64, 64, 40, "cuda", True)) == set(engine.KERNEL_PATHS)


def test_rewritten_pattern_is_not_served_from_cache():
    x, V, U, lam, s, si, b = random_problem(30, 20, 50, dtype=torch.float64)
    fk.frod_linear(x, V, U, lam, s, si, b)  # caches the layout of si
    si.copy_(random_pattern(30, 50, torch.Generator().manual_seed(1)))  # same tensor object, new contents
    ref = reference_grads(x, V, U, lam, s, si, b, torch.ones(7, 20, dtype=torch.float64))[0]
    assert rel_err(fk.frod_linear(x, V, U, lam, s, si, b), ref) < 1e-10


@pytest.mark.parametrize("bad,match", [
    (dict(V=torch.randn(8, 9)), "V"),
    (dict(U=torch.randn(5, 7)), "U"),
    (dict(lambda_l=torch.randn(7)), "lambda_l"),
    (dict(s_values=torch.randn(3)), "s_values"),
    (dict(x=torch.randn(4, 7)), "x"),
    (dict(bias=torch.randn(4)), "bias"),
    (dict(s_indices=torch.tensor([[0, 1], [0, 2]])), "s_indices"),   # diagonal entry
    (dict(s_indices=torch.tensor([[0, 0], [2, 2]])), "s_indices"),   # duplicate
    (dict(s_indices=torch.tensor([[0, 9], [2, 1]])), "s_indices"),   # out of range
])
def test_bad_input_names_the_argument(bad, match):
    args = dict(x=torch.randn(4, 8), V=torch.randn(8, 8), U=torch.randn(5, 8), lambda_l=torch.randn(8),
                s_values=torch.randn(2), s_indices=torch.tensor([[0, 1], [2, 3]]), bias=torch.randn(5))
    args.update(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        fk.frod_linear(**args)


def test_bad_dtypes_and_backend_names():
    x, V, U, lam, s, si, b = random_problem(8, 5, 4)
    with pytest.raises(TypeError, match="s_indices"):
        fk.frod_linear(x, V, U, lam, s, si.float(), b)
    with pytest.raises(TypeError, match="x"):
        fk.frod_linear(x.int(), V, U, lam, s, si, b)
    with pytest.raises(ValueError, match="backend"):
        fk.set_backend("tpu")
    with pytest.raises(ValueError, match="path"):
        fk.frod_linear(x, V, U, lam, s, si, b, path="densest")
    with pytest.raises(ValueError, match="V"):
        fk.frod_linear(x, V.requires_grad_(True), U, lam, s, si, b)


def test_backend_selection_and_reasons():
    avail = fk.available_backends()
    assert avail["torch"]["cpu"] is None
    for name in ("triton", "cuda"):
        for dev, reason in avail[name].items():
            assert reason is None or isinstance(reason, str) and reason
    with fk.use_backend("torch"):
        assert fk.get_backend() == "torch"
    if avail["cuda"]["cpu"] is not None:
        x, V, U, lam, s, si, b = random_problem(8, 5, 4)
        with fk.use_backend("cuda"), pytest.raises(RuntimeError, match="cuda"):
            fk.frod_linear(x, V, U, lam, s, si, b)


def test_ops_pass_opcheck():
    # schema, fake (meta) implementation and autograd registration agree with the real kernels
    from frod_kernels.layout import build_layout

    x, V, U, lam, s, si, b = random_problem(16, 12, 30, lead=(5,), dtype=torch.float64)
    lay = build_layout(si, 16)
    w = s[lay.col_perm]
    torch.library.opcheck(torch.ops.frod.row_gather_diag.default, (U.t(), lam, w, lay.col_ptr, lay.col_src))
    torch.library.opcheck(torch.ops.frod.sampled_dot_diag.default,
                          (torch.randn(16, 5, dtype=torch.float64), torch.randn(16, 5, dtype=torch.float64),
                           lay.row_ptr, lay.row_src))
    for path in (engine.SPARSE, engine.FACTORED, engine.MATERIALIZED):
        args = (x, V, U, lam.requires_grad_(True), s.requires_grad_(True), si, lay.packed, b, path, False)
        torch.library.opcheck(torch.ops.frod.frod_linear_fwd.default, args,
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_dense_path_traces_whole_under_torch_compile():
    # the dense path is plain ops under torch.compile (no custom op): fullgraph, and the same gradients
    x, V, U, lam, s, si, b = random_problem(24, 16, 40, lead=(5,), dtype=torch.float32)
    grad_out = torch.randn(5, 16)
    fn = torch.compile(lambda *a: fk.frod_linear(*a, path="dense"), backend="aot_eager", fullgraph=True)
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, lam, s, b)]
    y = fn(leaves[0], V, U, leaves[1], leaves[2], si, leaves[3])
    y.backward(grad_out)
    ref = reference_grads(x, V, U, lam, s, si, b, grad_out)
    for got, want in zip([y] + [t.grad for t in leaves], ref):
        assert rel_err(got, want) <= TOLERANCE[torch.float32]


def test_dense_path_under_autocast_and_deterministic_algorithms():
    x, V, U, lam, s, si, b = random_problem(24, 16, 40, lead=(5,), dtype=torch.float32)
    grad_out = torch.randn(5, 16)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = run(x, V, U, lam, s, si, b, grad_out.bfloat16(), path="dense")
    finally:
        torch.use_deterministic_algorithms(prev)
    assert got[0].dtype == torch.bfloat16 and got[2].dtype == lam.dtype  # lambda's gradient is never rounded
    ref = reference_grads(x, V, U, lam, s, si, b, grad_out.bfloat16().float())
    for g, r in zip(got, ref):
        assert rel_err(g.float(), r) <= TOLERANCE[torch.bfloat16]


# ---- a layer's later calls: what its first call checked and resolved is kept while the arguments hold -----------

def leaf(t):
    return None if t is None else t.detach().clone().requires_grad_(True)


def check_call(x, V, U, lam, s, si, b, dtype, **kw):
    """One forward and backward with these (kept) leaves, against the float64 reference of their values now."""
    grad_out = torch.randn(*x.shape[:-1], U.shape[0], dtype=x.dtype)
    y = fk.frod_linear(x, V, U, lam, s, si, b, **kw)
    trained = {name: t for name, t in zip(["dx", "dlambda", "ds", "dbias"], (x, lam, s, b))
               if t is not None and t.requires_grad}
    got = dict(y=y, **dict(zip(trained, torch.autograd.grad(y, list(trained.values()), grad_out))))
    ref = dict(zip(["y", "dx", "dlambda", "ds", "dbias"], reference_grads(x, V, U, lam, s, si, b, grad_out)))
    for name, g in got.items():
        assert rel_err(g, ref[name]) <= TOLERANCE[dtype], name


def _write(t, value):
    with torch.no_grad():
        t.copy_(value)


CHANGES = {
    # an optimizer step: the trainable tensors written in place
    "lambda and s written": lambda a: (_write(a["lam"], a["lam"] * 1.5), _write(a["s"], -a["s"])),
    # what Module.to() does to a parameter: the same object, another storage
    "s_values .data swapped": lambda a: setattr(a["s"], "data", a["s"].detach() * 2),
    "V written": lambda a: _write(a["V"], a["V"].flip(0)),
    "U replaced": lambda a: a.update(U=a["U"] * 0.5),
    "bias dropped": lambda a: a.update(b=None),
    "pattern rewritten": lambda a: _write(a["si"], random_pattern(16, 20, torch.Generator().manual_seed(3))),
    "x in float32": lambda a: a.update(x=leaf(a["x"].float())),
    "x with other leading dims": lambda a: a.update(x=leaf(a["x"].reshape(2, 4, 16))),
    "other tokens": lambda a: a.update(x=leaf(torch.randn(300, 16, dtype=torch.float64))),
    "no grad for lambda": lambda a: a["lam"].requires_grad_(False),
}


@pytest.mark.parametrize("path", [None, "sparse"])
@pytest.mark.parametrize("change", list(CHANGES))
def test_a_later_call_follows_every_change_of_its_arguments(change, path, monkeypatch):
    # None: the cost model's pick, the dense path at this size on the CPU; "sparse": a kernel path
    from frod_kernels import _validation

    checked = []
    real = _validation._check_arguments
    monkeypatch.setattr(_validation, "_check_arguments", lambda *a: checked.append(1) or real(*a))
    x, V, U, lam, s, si, b = random_problem(16, 12, 20, lead=(8,), dtype=torch.float64)
    a = dict(x=leaf(x), V=V, U=U, lam=leaf(lam), s=leaf(s), si=si, b=leaf(b))
    names = ["x", "V", "U", "lam", "s", "si", "b"]
    check_call(*(a[n] for n in names), torch.float64, path=path)
    check_call(*(a[n] for n in names), torch.float64, path=path)
    assert checked == [1]  # the second call was the kept one: nothing re-checked
    CHANGES[change](a)
    dtype = a["x"].dtype
    check_call(*(a[n] for n in names), dtype, path=path)


def test_a_kept_call_holds_no_tensor_alive():
    import gc
    import weakref

    from frod_kernels.ops import api

    x, V, U, lam, s, si, b = random_problem(16, 12, 20, lead=(8,))
    fk.frod_linear(x, V, U, lam, s, si, b)
    key = id(lam)
    assert key in api._CALLS
    refs = [weakref.ref(t) for t in (V, U, lam, s, si, b)]
    del x, V, U, lam, s, si, b
    gc.collect()
    assert all(r() is None for r in refs)
    assert key not in api._CALLS


def test_a_named_backend_after_auto_runs_its_kernels(monkeypatch):
    # the kept call's path choice is "auto"'s; naming a backend must not reuse it (the dense path runs no kernel)
    dense = []
    real = engine.dense_forward
    monkeypatch.setattr(engine, "dense_forward", lambda *a: dense.append(1) or real(*a))
    x, V, U, lam, s, si, b = random_problem(16, 12, 20, lead=(8,), dtype=torch.float64)
    lam, s = leaf(lam), leaf(s)
    check_call(x, V, U, lam, s, si, b, torch.float64)
    assert dense == [1]
    with fk.use_backend("torch"):
        check_call(x, V, U, lam, s, si, b, torch.float64)
    assert dense == [1]
    check_call(x, V, U, lam, s, si, b, torch.float64)
    assert dense == [1, 1]


def test_a_kept_call_asks_again_whether_its_path_is_measured(monkeypatch):
    # whether "auto" measures a call can change between calls with the same tensors (deterministic mode, a CUDA
    # graph being captured): a kept call must not reuse the cost model's pick of a call that was not measured
    from frod_kernels.ops import api

    answers, measured = [False, True], []
    monkeypatch.setattr(api, "MEASURED_DEVICE_TYPES", {"cpu"})
    monkeypatch.setattr(api.autotune, "measures", lambda device: answers.pop(0))
    monkeypatch.setattr(api, "_measured_path", lambda p, *a: measured.append(p) or p)
    x, V, U, lam, s, si, b = random_problem(16, 12, 20, lead=(8,), dtype=torch.float64)
    lam, s = leaf(lam), leaf(s)
    check_call(x, V, U, lam, s, si, b, torch.float64)
    assert measured == []
    check_call(x, V, U, lam, s, si, b, torch.float64)
    assert len(measured) == 1 and answers == []
