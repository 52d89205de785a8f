"""Activation checkpointing gives the gradients of a plain run; torch.autocast follows PyTorch's rules for linear.

Autocast rule (frod_kernels/ops.py): ``x``, ``V``, ``U`` and ``bias`` are cast to the autocast dtype, as
``F.linear`` casts its input, weight and bias; ``lambda_l`` and ``s_values`` keep their dtype (float32, like
master weights), so their gradients come back in that dtype without a round trip through half precision.
"""

import contextlib
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import frod_kernels as fk
from frod_kernels.reference import TOLERANCE, reference_grads, rel_err
from conftest import random_problem
from test_layer import tiny_llama

TOL = TOLERANCE[torch.float32]


class Blocks(nn.Module):
    def __init__(self, width=40, depth=3, use_checkpoint=None):
        super().__init__()
        self.fcs = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.use_checkpoint = use_checkpoint  # None, or the use_reentrant flag of torch.utils.checkpoint

    def block(self, i, x):
        return x + F.silu(self.fcs[i](x))

    def forward(self, x):
        for i in range(len(self.fcs)):
            if self.use_checkpoint is None:
                x = self.block(i, x)
            else:
                x = checkpoint(self.block, i, x, use_reentrant=self.use_checkpoint)
        return x


@contextlib.contextmanager
def count_forwards(model):
    """Yields a list of forward-call counts, one per FrodLinear of ``model``."""
    layers = [m for m in model.modules() if isinstance(m, fk.FrodLinear)]
    calls = [0] * len(layers)

    def hook(i):
        def count(*_):
            calls[i] += 1

        return count

    # a pre-hook: with early stopping, recomputation ends inside the last layer, before a forward hook would run
    handles = [layer.register_forward_pre_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


def trainable_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same_grads(got, ref):
    assert got.keys() == ref.keys() and ref
    for name in ref:
        err = rel_err(got[name], ref[name])
        assert err <= TOL, f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_torch_checkpoint_gives_the_plain_gradients(use_reentrant):
    model = Blocks().requires_grad_(False)
    fk.replace_linears(model, ["fcs.0", "fcs.1", "fcs.2"], sparse_rate=0.1, progressbar=False)
    with torch.no_grad():
        for layer in model.fcs:
            layer.s_values.normal_(std=0.3)
    x = torch.randn(3, 9, 40, requires_grad=True)  # the reentrant variant needs an input that requires grad
    g = torch.randn(3, 9, 40)

    def grads(ckpt):
        model.use_checkpoint = ckpt
        model.zero_grad()
        x.grad = None
        model(x).backward(g)
        return {**trainable_grads(model), "x": x.grad.clone()}

    plain = grads(None)
    with count_forwards(model) as calls:
        checkpointed = grads(use_reentrant)
    assert calls == [2, 2, 2]  # each block's forward ran again in backward: checkpointing was active
    assert_same_grads(checkpointed, plain)


def enable_checkpointing(model, kwargs):
    # transformers 5 renamed gradient_checkpointing_enable (kept as a deprecated alias) to
    # activation_checkpointing_enable; older versions (the GPU machine's 5.17) have only the first
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


@pytest.mark.parametrize("kwargs", [None, {"use_reentrant": True}])
def test_transformers_checkpointing_gives_the_plain_gradients(kwargs):
    model = tiny_llama(hidden=32, layers=2).requires_grad_(False)
    fk.replace_linears(model, ["q_proj", "v_proj", "down_proj"], sparse_rate=0.05, progressbar=False)
    model.train()  # checkpointing is active in training mode only
    ids = torch.randint(0, 97, (2, 12))

    def grads():
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        return trainable_grads(model)

    plain = grads()
    enable_checkpointing(model, kwargs)
    with count_forwards(model) as calls:
        checkpointed = grads()
    assert calls == [2] * 6  # every decoder layer was recomputed in backward
    assert_same_grads(checkpointed, plain)


AUTOCAST_CASES = [("cpu", torch.bfloat16), ("cpu", torch.float16), ("cuda", torch.bfloat16), ("cuda", torch.float16)]


@pytest.mark.parametrize("path", ["sparse", "factored", "materialized"])
@pytest.mark.parametrize("device,dtype", AUTOCAST_CASES)
def test_autocast_dtypes_and_accuracy(device, dtype, path):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    x, V, U, lam, s, si, b = random_problem(48, 40, 150, lead=(3, 7), dtype=torch.float32, device=device)
    leaves = [t.requires_grad_(True) for t in (x, lam, s, b)]
    g = torch.randn(3, 7, 40, device=device)
    with torch.autocast(device, dtype=dtype):
        y = fk.frod_linear(x, V, U, lam, s, si, b, path=path)
        y_linear = F.linear(x, U, b)
    y.backward(g.to(y.dtype))
    assert y.dtype == y_linear.dtype == dtype
    # gradients come back in each leaf's own dtype, the float32 of the parameters included
    assert all(t.grad.dtype == torch.float32 for t in leaves)
    ref = reference_grads(x, V, U, lam, s, si, b, g.to(dtype))
    for name, got, want in zip(("y", "dx", "dlambda", "ds", "dbias"), (y, *(t.grad for t in leaves)), ref):
        err = rel_err(got, want)
        assert err <= TOLERANCE[dtype], f"{name}: relative error {err:.2e} ({dtype})"


def test_backward_inside_autocast_and_float64_untouched():
    # backward called inside the autocast region (autograd then runs with autocast on) still works
    x, V, U, lam, s, si, b = random_problem(32, 24, 60, lead=(5,))
    lam.requires_grad_(True)
    s.requires_grad_(True)
    g = torch.randn(5, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fk.frod_linear(x, V, U, lam, s, si, b, path="sparse")
        y.backward(g.bfloat16())
    ref = reference_grads(x, V, U, lam, s, si, b, g.bfloat16())
    assert rel_err(y, ref[0]) <= TOLERANCE[torch.bfloat16]
    assert rel_err(lam.grad, ref[2]) <= TOLERANCE[torch.bfloat16]
    assert rel_err(s.grad, ref[3]) <= TOLERANCE[torch.bfloat16]
    # autocast leaves float64 alone, as for F.linear
    x, V, U, lam, s, si, b = random_problem(32, 24, 60, lead=(5,), dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fk.frod_linear(x, V, U, lam, s, si, b)
        assert y.dtype == F.linear(x, U, b).dtype == torch.float64
    assert rel_err(y, reference_grads(x, V, U, lam, s, si, b, torch.ones_like(y))[0]) <= TOLERANCE[torch.float64]


def test_frod_linear_module_under_autocast_keeps_float32_parameter_grads():
    model = Blocks(width=32, depth=2).requires_grad_(False)
    fk.replace_linears(model, ["fcs.0", "fcs.1"], sparse_rate=0.1, progressbar=False)
    x = torch.randn(4, 6, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.fcs[0](x)
        ref_dtype = F.linear(x, model.fcs[0].U).dtype
    out.float().sum().backward()
    assert out.dtype == ref_dtype == torch.bfloat16
    layer = model.fcs[0]
    assert layer.lambda_l.dtype == layer.lambda_l.grad.dtype == torch.float32
    assert layer.s_values.dtype == layer.s_values.grad.dtype == torch.float32


def test_trainer_example_runs_with_bf16_and_checkpointing():
    # the example end to end in its own interpreter (the Trainer and PEFT patch global state): tiny settings
    script = Path(__file__).resolve().parents[2] / "python" / "trainer_finetune.py"
    args = ["--hidden", "32", "--layers", "1", "--seq", "16", "--batch", "4", "--steps", "8", "--bf16",
            "--gradient-checkpointing"]
    run = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    before, after = map(float, re.search(r"loss ([0-9.]+) -> ([0-9.]+) after 8 steps", run.stdout).groups())
    assert after < before  # deterministic (seeded data, model and Trainer)
