"""Products with a frozen operand (``V``, ``U`` and their transposes): :func:`mm`, ``a @ w (+ bias)``.

Every dense product of the sparse and factored paths, and two of the materialized path's, multiplies by ``V`` or
``U``, which never change during training. On the CPU, MKL's GEMM repacks its right-hand operand on every call,
which at few tokens costs more than the arithmetic: an 8 x 1024 by 1024 x 1024 product took 0.41 ms with
``torch.mm`` and 0.12 ms with oneDNN on a weight packed once (the project's 2-core AMD EPYC, float32, torch
2.13), and the packed product stayed 1.2-1.8x faster up to 2048 tokens from 512 x 512 on. So on the CPU, in
float32, a frozen operand of at least :data:`MIN_ELEMENTS` elements is packed once per tensor state (cached like
any value derived from a tensor: rebuilt after a write, freed with the tensor) and the product runs on the packed
copy. Below that size oneDNN's fixed cost per call loses (0.6x at 256 x 256 and 8 tokens).

The packed copies cost memory: two per frozen matrix (one per orientation the paths multiply by), so the CPU holds
``V`` and each ``U`` three times. ``FROD_CPU_PACKED=0`` turns packing off (plain ``torch.mm``, the twin that the
tests hold the packed products to).

Not used where autograd would record the product (a gradient of a gradient): oneDNN's packed linear has no
derivative. The engine's products run inside an ``autograd.Function``, where nothing is recorded.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from . import _env
from ._tensor_cache import DERIVED

# Fewest elements of a frozen operand for the packed product (measured on the project's CPU; see above).
MIN_ELEMENTS = 512 * 512
# The token count oneDNN packs for; the packed weight serves any count (1 packs for vectors, 3x slower at 8).
_PACK_TOKENS = 64


def mm(a: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``a @ w + bias`` (``bias`` optional) for a frozen ``w``: on a packed copy of ``w`` where that is faster."""
    if packs(a, w, bias):
        return torch.ops.mkldnn._linear_pointwise(a, packed(w), bias, "none", [], "")
    return plain(a, w, bias)


def plain(a: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``a @ w + bias`` by ``torch.mm`` / ``torch.addmm``, for any ``w``."""
    if bias is None:
        return torch.mm(a, w)
    return torch.addmm(bias if bias.dtype is a.dtype else bias.to(a.dtype), a, w)


def packs(a: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor] = None) -> bool:
    """Whether :func:`mm` runs ``a @ w`` on a packed ``w``."""
    return (a.is_cpu and a.dtype is torch.float32 and w.dtype is torch.float32 and w.numel() >= MIN_ELEMENTS
            and a.shape[0] > 0 and (bias is None or bias.dtype is torch.float32)
            and not (a.requires_grad and torch.is_grad_enabled()) and torch.backends.mkldnn.enabled
            and available())


def packed(w: torch.Tensor) -> torch.Tensor:
    """``w`` packed by oneDNN as the weight of a linear layer computing ``a @ w``, cached per state of ``w``."""
    def build() -> torch.Tensor:
        # a normal tensor even when first built in inference mode: later training calls use it too
        with torch.inference_mode(False):
            return torch.ops.mkldnn._reorder_linear_weight(w.detach().t(), _PACK_TOKENS)

    return DERIVED.get(w, "onednn-linear", build)


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """Whether packed products run here and agree with ``torch.mm``: off by ``FROD_CPU_PACKED=0``, and off where
    this torch has no oneDNN, or its packed linear raises or disagrees, on a small problem tried once per process."""
    if not _env.flag("FROD_CPU_PACKED", True) or not torch.backends.mkldnn.is_available():
        return False
    try:
        g = torch.Generator().manual_seed(0)
        a, w, b = (torch.randn(*shape, generator=g) for shape in ((5, 48), (48, 40), (40,)))
        got = torch.ops.mkldnn._linear_pointwise(
            a, torch.ops.mkldnn._reorder_linear_weight(w.t(), _PACK_TOKENS), b, "none", [], "")
        return bool(torch.allclose(got, torch.addmm(b, a, w), rtol=1e-4, atol=1e-4))
    except (RuntimeError, AttributeError, NotImplementedError):
        return False
