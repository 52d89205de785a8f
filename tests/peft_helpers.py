"""Tiny PEFT FRoD models and the accelerated-vs-PEFT comparison the test_peft_*.py files share."""

from __future__ import annotations

import torch
from torch import nn

from peft import FrodConfig, get_peft_model

import frod_kernels.peft as fkp
from frod_kernels.reference import rel_err


class Block(nn.Module):
    def __init__(self, hidden: int, bias: bool):
        super().__init__()
        self.q_proj = nn.Linear(hidden, hidden, bias=bias)
        self.v_proj = nn.Linear(hidden, 2 * hidden, bias=bias)  # in != out
        self.o_proj = nn.Linear(2 * hidden, hidden, bias=bias)

    def forward(self, x):
        return x + self.o_proj(torch.tanh(self.v_proj(x)) * self.q_proj(x).repeat(1, 1, 2))


class TinyNet(nn.Module):
    """Two blocks with Llama-style module names (``layers.N.q_proj``), a head PEFT can keep in modules_to_save."""

    def __init__(self, hidden: int = 32, n_layers: int = 2, bias: bool = True):
        super().__init__()
        self.layers = nn.ModuleList([Block(hidden, bias) for _ in range(n_layers)])
        self.head = nn.Linear(hidden, 8)

    def forward(self, x):
        for block in self.layers:
            x = block(x)
        return self.head(x)


def tiny_peft(dtype=torch.float32, *, bias=True, autocast_adapter_dtype=True, **config):
    config = {"target_modules": ["q_proj", "v_proj"], "sparse_rate": 0.1, "init_weights": False,
              "progressbar": False, **config}
    net = TinyNet(bias=bias).to(dtype)
    return get_peft_model(net, FrodConfig(**config), autocast_adapter_dtype=autocast_adapter_dtype)


def trainables(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def run(model, x, accelerated: bool, seed: int = 0, call=None):
    """Output, input gradient and trainable parameters' gradients of one forward/backward of ``model``, with
    ``model`` accelerated or not (the RNG reseeded so dropout masks are the same)."""
    fkp.accelerate(model, enabled=accelerated)
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)
    y = (call or model)(x)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float32).to(y.dtype)
    y.backward(g)
    # an empty s_values (sparse_rate=0) gets no gradient from PEFT and an empty one from the fused op
    grads = {n: p.grad.detach().clone() for n, p in trainables(model).items() if p.grad is not None and p.numel()}
    fkp.accelerate(model, enabled=False)
    return y.detach(), x.grad.detach(), grads


def assert_same(model, x, tol: float = 1e-5, seed: int = 0, call=None):
    """The accelerated model gives PEFT's output and gradients (x, every trainable parameter) within ``tol``."""
    y0, dx0, g0 = run(model, x, False, seed, call)
    y1, dx1, g1 = run(model, x, True, seed, call)
    assert y0.dtype == y1.dtype
    assert rel_err(y1, y0) <= tol, f"output: {rel_err(y1, y0):.2e}"
    assert rel_err(dx1, dx0) <= tol, f"input grad: {rel_err(dx1, dx0):.2e}"
    assert g0.keys() == g1.keys() and g0, "no trainable parameter got a gradient"
    for n in g0:
        assert rel_err(g1[n], g0[n]) <= tol, f"{n}: {rel_err(g1[n], g0[n]):.2e}"
    return y1


class CountFused:
    """Counts calls into frod_kernels' fused op from the PEFT wrapper."""

    def __init__(self, monkeypatch):
        self.calls = 0
        real = fkp.forward.frod_linear

        def counting(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(fkp.forward, "frod_linear", counting)
