"""The fast projection route (projections.fast_basis, build_projections(method="fast"), projection_method="fast")
against an independent float64 reference of PEFT's construction, on fresh random weights.

The fast V is not PEFT's tensor (eigh's column signs and its basis inside near-equal eigenvalues are free), so it is
held to what PEFT's own float32 V achieves on the same weights, in measures that do not depend on those choices
(reference.eigenbasis_error), and its U and lambda_l to reproducing every weight."""

import pytest
import torch
from torch import nn

from frod_kernels import projections as P
from frod_kernels.nn import FrodLinear, replace_linears
from frod_kernels.reference import eigenbasis_error, reference_frod_eigenproblem, rel_err


def _weights(kind, n, rows, layers, seed):
    """Per-layer (rows, n) weights. "random": i.i.d. (well conditioned). "spectrum": layers that share an input
    basis with singular values over two decades and a few outlier features, as real models' do (the stacked matrix
    has a condition number of about 1e3: PEFT's float32 V is accurate only to its own rounding there)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        return [0.02 * torch.randn(rows, n, generator=g) for _ in range(layers)]
    basis, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    scale = torch.logspace(0, -2, n)
    scale[torch.randperm(n, generator=g)[:3]] *= 20
    return [0.02 * (torch.randn(rows, n, generator=g) * scale) @ basis.T for _ in range(layers)]


def _seed():
    return int(torch.randint(0, 2**31, ()))


@pytest.mark.parametrize("kind", ["random", "spectrum"])
@pytest.mark.parametrize("n,rows,layers", [(96, 96, 5), (128, 32, 6), (80, 200, 3)])
def test_fast_basis_is_peft_eigenbasis_to_peft_accuracy(kind, n, rows, layers):
    # rows == n: direct inverses; rows <= n/2: Woodbury's; rows > 2n in all: the sketched preconditioner
    weights = _weights(kind, n, rows, layers, _seed())
    R, T = reference_frod_eigenproblem(weights, 1e-3)
    exact = eigenbasis_error(P.basis_from_weights(weights, 1e-3), R, T)
    fast = eigenbasis_error(P.fast_basis(weights, 1e-3), R, T)
    for measure, peft_value in exact.items():
        # PEFT's own float32 error sets the scale; 1e-6 absorbs measures that are rounding-level for both
        assert fast[measure] <= 4 * peft_value + 1e-6, (measure, fast, exact)


def test_fast_basis_mixed_layer_shapes():
    # one category can mix layers that take the direct inverse and layers that take Woodbury's
    g = torch.Generator().manual_seed(_seed())
    weights = [torch.randn(rows, 64, generator=g) for rows in (64, 16, 100, 8)]
    R, T = reference_frod_eigenproblem(weights, 2e-3)
    exact = eigenbasis_error(P.basis_from_weights(weights, 2e-3), R, T)
    fast = eigenbasis_error(P.fast_basis(weights, 2e-3), R, T)
    assert all(fast[m] <= 4 * exact[m] + 1e-6 for m in exact), (fast, exact)


def test_fast_basis_falls_back_to_peft_ops():
    g = torch.Generator().manual_seed(_seed())
    # fewer stacked rows than columns: PEFT's SVD route, taken as is
    short = [torch.randn(10, 48, generator=g) for _ in range(3)]
    assert torch.equal(P.fast_basis(short), P.basis_from_weights(short))
    # a column that is zero in every layer: no Cholesky factor exists, so PEFT's own ops decide
    deficient = [torch.randn(40, 24, generator=g) for _ in range(3)]
    for w in deficient:
        w[:, 7] = 0
    assert torch.equal(P.fast_basis(deficient), P.basis_from_weights(deficient))
    # no regularization: PEFT's inverses are of singular matrices for layers with fewer rows than columns
    assert torch.equal(P.fast_basis(deficient, 0.0), P.basis_from_weights(deficient, 0.0))


@pytest.mark.parametrize("kind", ["random", "spectrum"])
def test_fast_build_projections_reproduce_weights(kind):
    seed = _seed()
    q = _weights(kind, 64, 64, 4, seed)
    v = _weights(kind, 64, 16, 4, seed + 1)
    weights = {}
    for i in range(4):
        weights[f"model.layers.{i}.self_attn.q_proj"] = q[i]
        weights[f"model.layers.{i}.self_attn.v_proj"] = v[i]
    cfg = dict(sparse_rate=0.05, projection_prng_key=seed % 1000, progressbar=False)
    fast = P.build_projections(weights, method="fast", **cfg)
    exact = P.build_projections(weights, **cfg)
    for name, proj in fast.items():
        assert torch.equal(proj.s_indices, exact[name].s_indices)
        assert proj.V.dtype == torch.float32 and proj.keys == exact[name].keys
        for key in proj.keys:
            U, lam = proj.U[key], proj.lambda_l[key]
            assert U.dtype == lam.dtype == torch.float32
            assert rel_err(U.norm(dim=0), torch.ones(U.shape[1])) <= 1e-5, key
            assert rel_err((U.double() * lam.double()) @ proj.V.double().T, weights[key]) <= 1e-5, key


def test_fast_build_projections_bfloat16_weights():
    # V is stored in the weights' dtype, so U is solved against the rounded V, as PEFT does
    g = torch.Generator().manual_seed(_seed())
    weights = {f"layers.{i}.proj": torch.randn(48, 48, generator=g).bfloat16() for i in range(3)}
    proj = P.build_projections(weights, method="fast", progressbar=False)["proj"]
    V = proj.V.bfloat16().double()
    for key, w in weights.items():
        rebuilt = (proj.U[key].bfloat16().double() * proj.lambda_l[key].double()) @ V.T
        assert rel_err(rebuilt, w) <= 2e-2, key


def test_replace_linears_fast_reproduces_and_reloads():
    torch.manual_seed(_seed())
    model = nn.Sequential(*[nn.Sequential(nn.Linear(40, 40), nn.Linear(40, 10)) for _ in range(3)])
    x = torch.randn(5, 40)
    outs = [block[1](block[0](x)) for block in model]
    replace_linears(model, r"\d+\.\d+", progressbar=False, projection_method="fast")
    assert all(isinstance(m, FrodLinear) for block in model for m in block)
    for block, ref in zip(model, outs):
        assert rel_err(block[1](block[0](x)), ref) <= 1e-5
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, FrodLinear):
                m.s_values.normal_()
    trained = [block[1](block[0](x)) for block in model]
    # V and U are parameters: a state dict carries the fast basis, nothing is regenerated on load
    copy = nn.Sequential(*[nn.Sequential(nn.Linear(40, 40), nn.Linear(40, 10)) for _ in range(3)])
    replace_linears(copy, r"\d+\.\d+", progressbar=False)
    copy.load_state_dict(model.state_dict())
    for block, ref in zip(copy, trained):
        assert torch.equal(block[1](block[0](x)), ref)


def test_fast_from_linear():
    torch.manual_seed(_seed())
    lin = nn.Linear(32, 24)
    x = torch.randn(6, 32)
    layer = FrodLinear.from_linear(lin, projection_method="fast")
    assert rel_err(layer(x), lin(x)) <= 1e-5


def test_method_names_the_argument():
    w = {"layers.0.q": torch.randn(8, 8)}
    with pytest.raises(ValueError, match="method"):
        P.build_projections(w, method="quick", progressbar=False)
    with pytest.raises(ValueError, match="projection_method"):
        replace_linears(nn.Sequential(nn.Linear(8, 8)), ["0"], projection_method="quick")
    with pytest.raises(ValueError, match="projection_method"):
        FrodLinear.from_linear(nn.Linear(8, 8), projection_method=None)
