"""torch.compile over FRoD: one opaque custom op per layer, no graph breaks, no recompiles, compiled == eager.

Most checks use the ``aot_eager`` backend (dynamo + AOTAutograd, the graphs inductor would get, without the C++
compile that takes tens of seconds on 2 cores); one check runs inductor end to end.
"""

import copy

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch import nn
from torch._dynamo.backends.common import aot_autograd
from functorch.compile import make_boxed_func
from torch._dynamo.testing import CompileCounterWithBackend

import frod_kernels as fk
from frod_kernels import layout as layout_mod
from frod_kernels.reference import TOLERANCE, reference_grads, rel_err
from conftest import random_problem

TOL = TOLERANCE[torch.float32]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def frod_mlp(width=48, hidden=64):
    mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width)).requires_grad_(False)
    fk.replace_linears(mlp, ["0", "2"], sparse_rate=0.05, progressbar=False)
    with torch.no_grad():  # a trained state, not the init (S = 0 would hide errors in the sparse part)
        for layer in (mlp[0], mlp[2]):
            layer.s_values.normal_(std=0.3)
            layer.lambda_l.mul_(1 + 0.2 * torch.randn_like(layer.lambda_l))
    return mlp


class GraphRecorder:
    """An aot_autograd backend that keeps the forward and backward graphs it is given and runs them eagerly."""

    def __init__(self):
        self.graphs = {"forward": [], "backward": []}
        self.backend = aot_autograd(fw_compiler=self._keep("forward"), bw_compiler=self._keep("backward"))

    def _keep(self, kind):
        def compiler(gm, example_inputs):
            self.graphs[kind].append(gm)
            return make_boxed_func(gm.forward)

        return compiler

    def targets(self, kind):
        return [str(n.target) for gm in self.graphs[kind] for n in gm.graph.nodes if n.op == "call_function"]


def train_steps(model, x, target, steps):
    """Returns per-step outputs and gradients of the trainable parameters (AdamW updates between steps)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    outs, grads = [], []
    for _ in range(steps):
        y = model(x)
        F.mse_loss(y, target).backward()
        outs.append(y.detach().clone())
        grads.append([p.grad.clone() for p in params])
        opt.step()
        opt.zero_grad()
    return outs, grads


def assert_close(got, ref, what):
    for k, (a, b) in enumerate(zip(got, ref)):
        for i, (ta, tb) in enumerate(zip(a if isinstance(a, list) else [a], b if isinstance(b, list) else [b])):
            err = rel_err(ta, tb)
            assert err <= TOL, f"{what} step {k} tensor {i}: relative error {err:.2e}"


def test_each_frod_layer_is_one_opaque_op_forward_and_backward():
    mlp = frod_mlp()
    rec = GraphRecorder()
    counter = CompileCounterWithBackend(rec.backend)
    compiled = torch.compile(mlp, backend=counter, fullgraph=True)  # fullgraph: a graph break raises
    compiled(torch.randn(4, 6, 48)).square().sum().backward()
    assert counter.frame_count == 1
    fwd, bwd = rec.targets("forward"), rec.targets("backward")
    assert fwd.count("frod.frod_linear_fwd.default") == 2
    assert bwd.count("frod.frod_linear_bwd.default") == 2
    # the layers' insides (the two kernel families, the layout) stay inside the op, not spread into the graph
    assert not any("row_gather_diag" in t or "sampled_dot_diag" in t for t in fwd + bwd)
    explain = torch._dynamo.explain(mlp)(torch.randn(4, 6, 48))
    assert explain.graph_break_count == 0 and explain.graph_count == 1


def test_compiled_training_equals_eager_without_recompiles():
    eager = frod_mlp()
    compiled_model = copy.deepcopy(eager)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(compiled_model, backend=counter, fullgraph=True)
    x, target = torch.randn(3, 10, 48), torch.randn(3, 10, 48)
    ref_out, ref_grads = train_steps(eager, x, target, steps=3)
    with torch._dynamo.config.patch(error_on_recompile=True):
        got_out, got_grads = train_steps(compiled, x, target, steps=3)
    assert counter.frame_count == 1
    compiled.eval()
    with torch.no_grad():  # grad mode is part of the guards: one more graph, for inference
        y_eval = compiled(x)
    assert_close(got_out, ref_out, "output")
    assert_close(got_grads, ref_grads, "gradient")
    with torch.no_grad():
        assert rel_err(y_eval, eager.eval()(x)) <= TOL


@pytest.mark.parametrize("path", ["sparse", "factored", "materialized"])
def test_functional_op_builds_its_layout_at_run_time_once(path, monkeypatch):
    # Under compile, frod_linear passes layout=None (the layout cache cannot run on fake tensors); the op then
    # takes the layout from the cache at run time: built on the first call, reused by every later step.
    builds = []
    real_build = layout_mod.build_layout
    monkeypatch.setattr(layout_mod, "build_layout", lambda *a, **k: builds.append(1) or real_build(*a, **k))
    x, V, U, lam, s, si, b = random_problem(40, 24, 120, lead=(3, 5))
    lam.requires_grad_(True)
    s.requires_grad_(True)
    x.requires_grad_(True)
    counter = CompileCounterWithBackend("aot_eager")
    fn = torch.compile(lambda x, lam, s: fk.frod_linear(x, V, U, lam, s, si, b, path=path), backend=counter,
                       fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(3):
            for t in (x, lam, s):
                t.grad = None
            g = torch.randn(3, 5, 24)
            y = fn(x, lam, s)
            y.backward(g)
    assert counter.frame_count == 1
    assert len(builds) == 1
    ref = reference_grads(x, V, U, lam, s, si, b, g)
    for name, got, want in zip(("y", "dx", "dlambda", "ds"), (y, x.grad, lam.grad, s.grad), ref):
        assert rel_err(got, want) <= TOL, name


def test_inductor_equals_eager():
    eager = frod_mlp(width=32, hidden=40)
    compiled = torch.compile(copy.deepcopy(eager), backend="inductor", fullgraph=True)
    x, target = torch.randn(2, 7, 32), torch.randn(2, 7, 32)
    ref_out, ref_grads = train_steps(eager, x, target, steps=2)
    with torch._dynamo.config.patch(error_on_recompile=True):
        got_out, got_grads = train_steps(compiled, x, target, steps=2)
    assert_close(got_out, ref_out, "output")
    assert_close(got_grads, ref_grads, "gradient")


def test_compiled_autocast_equals_eager_autocast():
    mlp = frod_mlp()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(mlp, backend=counter, fullgraph=True)
    x = torch.randn(4, 6, 48)

    def run(model):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(x)
        y.float().square().sum().backward()
        grads = [p.grad.clone() for p in mlp.parameters() if p.requires_grad]
        mlp.zero_grad()
        return y, grads

    y_ref, g_ref = run(mlp)
    y, g = run(compiled)
    assert y.dtype == y_ref.dtype == torch.bfloat16
    assert counter.frame_count == 1
    # the same operations in the same order (the compiled op runs the eager engine): the bf16 output equal, and the
    # float32 gradients within float32 rounding (autograd may sum a parameter's gradient in another order)
    assert rel_err(y, y_ref) <= TOLERANCE[torch.float32]
    assert all(a.dtype == torch.float32 and rel_err(a, b) <= TOLERANCE[torch.float32] for a, b in zip(g, g_ref))


def test_accelerated_peft_model_compiles_to_one_graph_and_equals_eager():
    import peft

    import frod_kernels.peft as fkp
    from test_layer import tiny_llama

    model = peft.get_peft_model(tiny_llama(hidden=32, layers=2),
                                peft.FrodConfig(target_modules=["q_proj", "v_proj"], sparse_rate=0.05,
                                                progressbar=False))
    fkp.accelerate(model)
    try:
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        with torch.no_grad():
            for p in params:
                p.add_(0.1 * torch.randn_like(p))  # move S off zero

        def loss_and_grads(fn, ids):
            model.zero_grad()
            loss = fn(input_ids=ids, labels=ids).loss
            loss.backward()
            return [loss.detach()] + [p.grad.clone() for p in params]

        rec = GraphRecorder()
        counter = CompileCounterWithBackend(rec.backend)
        compiled = torch.compile(model, backend=counter, fullgraph=True)
        for step in range(2):
            ids = torch.randint(0, 97, (2, 10))
            ref = loss_and_grads(model, ids)
            with torch._dynamo.config.patch(error_on_recompile=True):
                got = loss_and_grads(compiled, ids)
            for i, (a, b) in enumerate(zip(got, ref)):
                assert rel_err(a, b) <= TOL, f"step {step} tensor {i}: {rel_err(a, b):.2e}"
        assert counter.frame_count == 1
        assert rec.targets("forward").count("frod.frod_linear_fwd.default") == 4  # 2 layers x (q_proj, v_proj)
    finally:
        fkp.accelerate(model, enabled=False)
