"""Every operand a sparse step gathers rows from is row-contiguous, on every path of ``frod_linear``, in
``FrodLinear`` and in accelerated PEFT layers, and U reaches the gather as the very memory the layer stores (no
per-call copy), with memory and checkpoints unchanged (docs/DESIGN.md section 6, "Layouts"). The one exception is
the CPU's own choice for few tokens: activations produced token-major, which the torch twin reads as they are.

A recording stand-in replaces the torch twins for the duration of a test: it notes each kernel-family call's
operands, then runs the real twin, so results are still held to the float64 reference.
"""

import io

import pytest
import torch
from peft import FrodConfig, get_peft_model
from torch import nn

import frod_kernels as fk
import frod_kernels.peft as fkp
from frod_kernels import engine, registry
from frod_kernels.reference import TOLERANCE, reference_grads, rel_err
from conftest import random_problem

PATHS = ("sparse", "factored", "materialized")
FEW = engine.FEATURE_MAJOR_MIN_TOKENS["cpu"]


class Recorder:
    def __init__(self):
        self.calls = []  # (op, operand name, tensor)

    def install(self):
        twins = {op: registry.impls(op)["torch"] for op in ("row_gather_diag", "sampled_dot_diag")}

        def row_gather(A, diag, weights, ptr, src):
            self.calls.append(("row_gather_diag", "A", A))
            return twins["row_gather_diag"](A, diag, weights, ptr, src)

        def sampled_dot(P, Q, ptr, src):
            self.calls += [("sampled_dot_diag", "P", P), ("sampled_dot_diag", "Q", Q)]
            return twins["sampled_dot_diag"](P, Q, ptr, src)

        registry.register_impl("row_gather_diag", "torch")(row_gather)
        registry.register_impl("sampled_dot_diag", "torch")(sampled_dot)

    def assert_rows_contiguous(self, never_transposed=()):
        """Rows contiguous, or (activations of few tokens on the CPU) the transpose of a contiguous product;
        never that for the memory of ``never_transposed``."""
        assert self.calls, "no kernel-family call was made"
        for op, name, t in self.calls:
            if t.shape[1] > 1 and t.stride(1) != 1:
                transposed_product = t.shape[1] < FEW and t.stride() == (1, t.shape[0])
                assert transposed_product and all(t.data_ptr() != u.data_ptr() for u in never_transposed), \
                    f"{op} read {name} with strides {t.stride()}"
                continue
            assert t.stride(0) >= t.shape[1], f"{op} read {name} with overlapping rows, strides {t.stride()}"

    def gathered_from(self, storage: torch.Tensor) -> int:
        """How many operands were the memory of ``storage`` itself (not a copy)."""
        return sum(t.data_ptr() == storage.data_ptr() for _, _, t in self.calls)


@pytest.fixture
def recorder():
    # the torch backend by name: "auto" takes the dense path, which gathers nothing, for layers this small
    with registry.scoped(), fk.use_backend("torch"):
        rec = Recorder()
        rec.install()
        yield rec


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("tokens", [3, 70])  # both sides of the CPU's token-major / feature-major crossover
def test_frod_linear_gathers_contiguous_rows_on_every_path(recorder, path, tokens):
    x, V, U, lam, s, si, b = random_problem(40, 24, 90, lead=(tokens,))
    U = U.t().contiguous().t()  # as FrodLinear and the PEFT integration store it
    x.requires_grad_(True), lam.requires_grad_(True), s.requires_grad_(True), b.requires_grad_(True)
    y = fk.frod_linear(x, V, U, lam, s, si, b, path=path)
    g = torch.randn_like(y)
    y.backward(g)
    recorder.assert_rows_contiguous(never_transposed=(U,))
    if path != "sparse":  # the full-rank update gathers rows of U^T: U's own memory
        assert recorder.gathered_from(U) >= 1
    ref = reference_grads(x, V, U, lam, s, si, b, g)
    for got, want in zip((y, x.grad, lam.grad, s.grad, b.grad), ref):
        assert rel_err(got, want) <= TOLERANCE[torch.float32]


@pytest.mark.parametrize("path", PATHS)
def test_a_row_major_u_is_read_right_too(path):
    x, V, U, lam, s, si, b = random_problem(40, 24, 90, lead=(9,))
    ref = reference_grads(x, V, U, lam, s, si, b, torch.zeros(9, 24))[0]
    assert rel_err(fk.frod_linear(x, V, U.contiguous(), lam, s, si, b, path=path), ref) <= TOLERANCE[torch.float32]


def test_frod_linear_layer_reads_its_own_u(recorder):
    lin = nn.Linear(48, 32)
    layer = fk.FrodLinear.from_linear(lin, sparse_rate=0.05, cache=False)
    x = torch.randn(200, 48, requires_grad=True)  # many tokens: a path that gathers U^T
    layer(x).square().sum().backward()
    recorder.assert_rows_contiguous()
    assert recorder.gathered_from(layer.U_t) >= 1
    assert layer.U_t.is_contiguous() and layer.U.shape == (32, 48)


def test_frod_linear_state_dict_holds_u_as_before():
    lin = nn.Linear(20, 12)
    layer = fk.FrodLinear.from_linear(lin, sparse_rate=0.1, cache=False)
    state = layer.state_dict()
    assert "U" in state and "U_t" not in state and state["U"].shape == (12, 20)
    assert torch.equal(state["U"], layer.U)
    # what a checkpoint written before U was stored transposed holds: a contiguous (out, in) U
    old = {k: (v.contiguous() if k == "U" else v) for k, v in state.items()}
    fresh = fk.FrodLinear.from_linear(nn.Linear(20, 12), sparse_rate=0.1, cache=False)
    fresh.load_state_dict(old)
    assert torch.equal(fresh.U, layer.U) and fresh.U_t.is_contiguous()
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    again = fk.FrodLinear.from_linear(nn.Linear(20, 12), sparse_rate=0.1, cache=False)
    again.load_state_dict(torch.load(buffer))
    x = torch.randn(5, 20)
    assert torch.equal(again(x), layer(x))


def _peft_model():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 24))
    return get_peft_model(base, FrodConfig(target_modules=["0", "2"], sparse_rate=0.05, init_weights=False))


def test_accelerated_peft_layers_gather_contiguous_rows_of_their_own_u(recorder):
    model = _peft_model()
    layers = [m for m in model.modules() if isinstance(m, fkp.state.Linear)]
    before = {id(m): (m.frod_U["default"].clone(), m.frod_U["default"].numel()) for m in layers}
    x = torch.randn(300, 40)
    with torch.no_grad():
        plain = model(x)
    fkp.accelerate(model)
    try:
        y = model(x)
        y.square().sum().backward()
        recorder.assert_rows_contiguous()
        for m in layers:
            U = m.frod_U["default"]
            value, numel = before[id(m)]
            assert torch.equal(U, value) and U.numel() == numel and U.stride(0) == 1, "U changed"
            assert recorder.gathered_from(U) >= 1, "U^T was copied before the gather"
        assert rel_err(y, plain) <= TOLERANCE[torch.float32]
        assert not any(k.endswith("frod_U.default") for k in model.state_dict()), "U entered a checkpoint"
    finally:
        fkp.disable()


def test_a_first_fused_call_in_inference_mode_leaves_peft_able_to_train_and_merge():
    model = _peft_model()
    fkp.accelerate(model)
    try:
        x = torch.randn(5, 40)
        with torch.inference_mode():
            model(x)
        layers = [m for m in model.modules() if isinstance(m, fkp.state.Linear)]
        assert not any(m.frod_U["default"].is_inference() for m in layers)
        model(x).square().sum().backward()  # the first call outside inference mode lays U out
        assert all(m.frod_U["default"].stride(0) == 1 for m in layers)
        model.merge_adapter()
    finally:
        fkp.disable()
