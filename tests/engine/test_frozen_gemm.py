"""frozen_gemm: the products with V and U on a packed copy (oneDNN, CPU float32) against float64, and their cache."""

import pytest
import torch

import frod_kernels as fk
from frod_kernels import _env, frozen_gemm
from frod_kernels.reference import TOLERANCE, reference_grads, rel_err
from conftest import random_problem

N = 520  # above frozen_gemm.MIN_ELEMENTS for an N x N operand


def _onednn_ops() -> bool:
    try:
        torch.ops.mkldnn._reorder_linear_weight, torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        return False
    return torch.backends.mkldnn.is_available()


# Skipped only where this torch build has no oneDNN packed linear (or packing was switched off): where it has one,
# test_packing_runs_where_onednn_is fails if the probe turned it down.
needs_packing = pytest.mark.skipif(not _env.flag("FROD_CPU_PACKED", True) or not _onednn_ops(),
                                   reason="FROD_CPU_PACKED=0, or no oneDNN packed linear in this torch build")


@needs_packing
def test_packing_runs_where_onednn_is():
    # the probe falls back to torch.mm where the packed linear disagrees with it; on a build that has it, that is a
    # defect to see, not a skip
    assert frozen_gemm.available()


@needs_packing
@pytest.mark.parametrize("tokens", [1, 8, 77])
@pytest.mark.parametrize("w_layout", ["contiguous", "transposed view"])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_product_matches_float64(tokens, w_layout, bias):
    w = torch.randn(N, N - 8) if w_layout == "contiguous" else torch.randn(N - 8, N).t()
    a = torch.randn(tokens, N)
    b = torch.randn(N - 8) if bias else None
    assert frozen_gemm.packs(a, w, b)
    want = a.double() @ w.double() + (b.double() if bias else 0)
    assert rel_err(frozen_gemm.mm(a, w, b), want) <= TOLERANCE[torch.float32]
    # a transposed activation (the engine passes views) gives the same
    assert rel_err(frozen_gemm.mm(a.t().contiguous().t(), w, b), want) <= TOLERANCE[torch.float32]


def test_what_is_not_packed():
    w = torch.randn(N, N)
    small = torch.randn(64, 64)
    assert not frozen_gemm.packs(torch.randn(8, 64), small)  # below MIN_ELEMENTS: oneDNN's fixed cost loses
    assert not frozen_gemm.packs(torch.randn(8, N, dtype=torch.float64), w.double())
    assert not frozen_gemm.packs(torch.randn(0, N), w)
    with torch.enable_grad():  # a product autograd would record: the packed linear has no derivative
        assert not frozen_gemm.packs(torch.randn(8, N, requires_grad=True), w)
    with torch.backends.mkldnn.flags(enabled=False):
        assert not frozen_gemm.packs(torch.randn(8, N), w)
        assert rel_err(frozen_gemm.mm(torch.ones(2, N), w), torch.ones(2, N).double() @ w.double()) <= 1e-6


@needs_packing
def test_a_written_operand_is_packed_again():
    w = torch.randn(N, N)
    a = torch.randn(8, N)
    frozen_gemm.mm(a, w)
    with torch.no_grad():
        w.mul_(-2.0)  # a frozen tensor written in place (load_state_dict copies into it so)
    assert rel_err(frozen_gemm.mm(a, w), a.double() @ w.double()) <= TOLERANCE[torch.float32]


@needs_packing
@pytest.mark.parametrize("path", ["sparse", "factored", "materialized"])
@pytest.mark.parametrize("tokens", [8, 200])
def test_layer_with_packed_products_matches_float64(path, tokens, monkeypatch):
    runs = []
    real = frozen_gemm.packed
    monkeypatch.setattr(frozen_gemm, "packed", lambda w: runs.append(1) or real(w))
    x, V, U, lam, s, si, b = random_problem(N, N + 16, 2000, lead=(tokens,))
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, lam, s, b)]
    y = fk.frod_linear(leaves[0], V, U, leaves[1], leaves[2], si, leaves[3], path=path)
    grad_out = torch.randn_like(y)
    got = [y, *torch.autograd.grad(y, leaves, grad_out)]
    assert runs, "no product ran packed"
    for name, g, r in zip(["y", "dx", "dlambda", "ds", "dbias"], got, reference_grads(x, V, U, lam, s, si, b,
                                                                                         grad_out)):
        assert rel_err(g, r) <= TOLERANCE[torch.float32], name
