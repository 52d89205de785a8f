"""The PEFT side of the comparisons: PEFT's FRoD and LoRA on a bare linear layer or on a Llama-style model."""

from __future__ import annotations

import contextlib
import copy
import warnings
from typing import Iterator

import torch
from torch import nn

LORA_RANK = 32
TARGETS = ["q_proj", "v_proj"]


class LinearHolder(nn.Module):
    """One ``nn.Linear`` under a name PEFT can target: PEFT wraps models, not bare layers."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.proj = linear


def _quiet_peft(fn, *args, **kwargs):
    with warnings.catch_warnings():
        # PEFT warns about untied configs and the like on these synthetic models; nothing there concerns timing.
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def frod_config(targets, sparse_rate: float = 0.01, seed: int = 0):
    from peft import FrodConfig

    return FrodConfig(target_modules=list(targets), sparse_rate=sparse_rate, projection_prng_key=seed,
                      progressbar=False)


def lora_config(targets, init_lora_weights=True, rank: int = LORA_RANK):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=list(targets),
                      init_lora_weights=init_lora_weights)


def wrap(model: nn.Module, config) -> nn.Module:
    from peft import get_peft_model

    return _quiet_peft(get_peft_model, model, config)


def peft_frod_linear(base: nn.Linear, sparse_rate: float = 0.01, seed: int = 0):
    """PEFT's FRoD layer on a copy of ``base``, with random (nonzero) ``s_values`` as after some training."""
    model = wrap(LinearHolder(copy.deepcopy(base)), frod_config(["proj"], sparse_rate, seed))
    layer = model.base_model.model.proj
    with torch.no_grad():
        layer.frod_lambda_s_values["default"].normal_(0.0, 0.02)
    return model, layer


def peft_lora_linear(base: nn.Linear, rank: int = LORA_RANK):
    """PEFT's LoRA on a copy of ``base``; both factors random (B is zero at PEFT's init) so no grad is trivial."""
    model = wrap(LinearHolder(copy.deepcopy(base)), lora_config(["proj"], init_lora_weights=False, rank=rank))
    return model, model.base_model.model.proj


def frod_tensors(layer) -> dict:
    """V, U, lambda_l, s_values, s_indices of a PEFT FRoD layer's default adapter."""
    return {"V": layer.frod_V["default"], "U": layer.frod_U["default"], "lambda_l": layer.frod_lambda_l["default"],
            "s_values": layer.frod_lambda_s_values["default"], "s_indices": layer.frod_s_indices["default"]}


@contextlib.contextmanager
def fast_projections(device: torch.device, seed: int = 0) -> Iterator[None]:
    """Build PEFT FRoD layers with a random orthogonal ``V`` and a float32 solve on ``device``.

    PEFT's own setup runs a full SVD or QR and float64 solves on the CPU: over a minute for a 14336-wide layer. The
    layer suite times forward+backward, which does not depend on V's values, so it builds its layers this way; the
    init suite times PEFT's real setup.
    """
    from peft.tuners.frod import layer as frod_layer
    from peft.tuners.frod import model as frod_model

    gen = torch.Generator(device=device).manual_seed(seed)

    def projection(matrices, regularization_alpha):
        n = matrices[0].shape[1]
        return torch.linalg.qr(torch.randn(n, n, device=device, generator=gen))[0].cpu()

    def u_and_lambda(self, V, W):
        b = torch.linalg.solve(V.to(device, torch.float32), W.to(device, torch.float32).T).T
        lam = torch.linalg.norm(b, dim=0)
        u = torch.where(lam > 1e-12, b / lam, torch.zeros_like(b))
        return u.cpu(), lam.cpu()

    old_proj = frod_model._projection_from_weights
    old_u = frod_layer.FrodLayer._calculate_frod_u_and_lambda
    frod_model._projection_from_weights = projection
    frod_layer.FrodLayer._calculate_frod_u_and_lambda = u_and_lambda
    try:
        yield
    finally:
        frod_model._projection_from_weights = old_proj
        frod_layer.FrodLayer._calculate_frod_u_and_lambda = old_u


def llama(train: dict, dtype: torch.dtype, device: torch.device, seed: int = 0) -> nn.Module:
    """A randomly initialized Llama-style causal LM from a transformers config (nothing is downloaded)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    keys = ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads", "num_key_value_heads",
            "vocab_size")
    config = LlamaConfig(**{k: train[k] for k in keys}, max_position_embeddings=max(2048, train["seq"]),
                         use_cache=False)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    return model
