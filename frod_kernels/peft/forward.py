"""The fused forward of an accelerated PEFT FRoD layer (``peft.tuners.frod.layer.Linear.forward``'s replacement).

The fused path runs when exactly one adapter of the layer is active, the adapter is not merged and adapters are
not disabled; any dropout. It computes what PEFT's forward computes:

* dropout inactive (``nn.Identity`` or eval): ``y = FRoD(x) + bias``, the base layer skipped (its weight offloaded
  to the CPU under ``runtime_offload_base_weight``, as PEFT does);
* dropout active in training: ``y = base_layer(x) + FRoD_nobias(h) - h W^T`` with ``h = dropout(x)``, the base
  layer called before dropout draws its mask, as PEFT does, so the same seed gives the same mask.

Everything else (several active adapters, merged, disabled adapters, an invalid pattern) runs PEFT's forward.
PEFT keeps ``frod_V`` and ``frod_s_indices`` on the CPU and copies them to the activations' device on every call;
here the device/dtype copies and the packed pattern layout are cached per shared tensor (one V per category on
the device, not one per layer) and rebuilt only when the source tensor is replaced or written in place.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import torch
import torch.nn.functional as F
from peft.utils.other import transpose
from torch import nn

from .._numerics import FLOAT_DTYPE_SET
from .._tensor_cache import DERIVED
from ..layout import build_layout, check_pattern
from ..ops import frod_linear
from .state import PEFT_FORWARD, is_on


@functools.wraps(PEFT_FORWARD)
def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    if not is_on(self):
        return PEFT_FORWARD(self, x, *args, **kwargs)
    # PEFT's per-adapter ModuleDict / ParameterDict / BufferDict entries are read from the dicts underneath: an
    # attribute or item read through nn.Module.__getattr__ costs 0.5-1.5 µs, and this forward makes eight
    modules = self._modules
    trained = modules["frod_lambda_s_values"]
    adapter = _fusable_adapter(self, trained, x)
    if adapter is None:
        return PEFT_FORWARD(self, x, *args, **kwargs)
    device, dtype = x.device, x.dtype
    layout = _device_layout(self.frod_s_indices[adapter], device, self.in_features)
    if layout is None:
        return PEFT_FORWARD(self, x, *args, **kwargs)
    s_indices, packed = layout
    V = _device_copy(self.frod_V[adapter], device, dtype)
    U = _device_copy(_column_major_u(modules["frod_U"], adapter), device, dtype)
    # PEFT moves the trainable tensors with a differentiable .to(); skipped (an op call less) where they already
    # live on x's device
    lambda_l = _on_device(_parameter(modules["frod_lambda_l"], adapter), device)
    s_values = _on_device(_parameter(trained, adapter), device)
    base_layer = _base_layer(self)
    dropout = modules["frod_dropout"]._modules[adapter]

    if isinstance(dropout, nn.Identity) or not dropout.training:
        if self.runtime_offload_base_weight.get(adapter, False):
            self._offload_base_weight_to_cpu()
        params = base_layer._parameters
        bias = params["bias"] if "bias" in params else base_layer.bias
        if bias is not None:
            bias = _on_device(bias, device)
        result = frod_linear(x, V, U, lambda_l, s_values, s_indices, bias, layout=packed)
    else:
        # PEFT's terms in PEFT's order: the base layer runs before dropout draws its mask
        self._move_base_weight_to_device(x.device)
        result = self.base_layer(x, *args, **kwargs)
        h = dropout(x)
        out_add = frod_linear(h, V, U, lambda_l, s_values, s_indices, layout=packed)
        base_weight = transpose(base_layer.weight, self.fan_in_fan_out).to(device=x.device, dtype=x.dtype)
        result = result + out_add - F.linear(h, base_weight)
    return result if result.dtype == dtype else result.to(dtype)


def _base_layer(layer: nn.Module) -> nn.Module:
    """``layer.get_base_layer()`` without its ``hasattr``, which on the innermost layer costs a raised and caught
    AttributeError per call: PEFT registers every ``base_layer`` as a submodule."""
    while "base_layer" in layer._modules:
        layer = layer._modules["base_layer"]
    return layer


def _parameter(params: nn.ParameterDict, key: str) -> torch.Tensor:
    """``params[key]``: read from the dict's ``_parameters`` where it is one (``ParameterDict.__getitem__`` goes
    through ``getattr`` and costs about 3 µs a call, a tenth of this whole forward's own time)."""
    p = params._parameters.get(key)
    return p if p is not None else params[key]


def _on_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    return t if t.device == device else t.to(device=device)


def _fusable_adapter(layer, trained: nn.ParameterDict, x) -> Optional[str]:
    """The one active adapter (of those ``trained``) when the fused path computes what PEFT's forward does, else
    None."""
    if layer.disable_adapters or layer.merged or layer.frod_V is None or layer.frod_s_indices is None:
        return None
    active = layer.active_adapter  # PEFT's active_adapters property, without the list for one adapter
    if isinstance(active, str):
        if active not in trained:
            return None
    else:
        active = [a for a in active if a in trained]
        if len(active) != 1:
            return None
        active = active[0]
    if not isinstance(x, torch.Tensor) or x.dtype not in FLOAT_DTYPE_SET or x.dim() < 1 or (
            x.shape[-1] != layer.in_features):
        return None
    return active


def _column_major_u(buffers, adapter: str) -> torch.Tensor:
    """The layer's U (from its ``frod_U``), stored column-major from its first fused call on: the same values in the
    same memory (the row-major one is freed), so that every row the sparse steps gather from U^T is contiguous.
    frod_U is a non-persistent buffer: no checkpoint sees it, and PEFT's own forward reads either layout."""
    U = buffers._buffers[adapter]
    # Not in inference mode: a tensor made there could never again be saved for backward, and PEFT's merge and
    # later training steps do save U. Such a call reads the row-major U (one copy per call) until a normal one.
    if (U.stride(0) != 1 and U.dim() == 2 and not torch.compiler.is_compiling()
            and not torch.is_inference_mode_enabled()):
        U = U.t().contiguous().t()
        buffers[adapter] = U
    return U


# Under torch.compile the cached copies and layout are graph constants: dynamo cannot trace the id/weakref/_version
# cache lookups (nor the pattern check's .item()). A layer whose frod_V or frod_s_indices is replaced after
# compiling keeps the old constants until the graph recompiles.
@torch._dynamo.assume_constant_result
def _device_copy(src: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    if src.device == device and src.dtype == dtype:
        return src
    return DERIVED.get(src, ("to", device, dtype), lambda: src.detach().to(device=device, dtype=dtype))


@torch._dynamo.assume_constant_result
def _device_layout(s_indices: torch.Tensor, device: torch.device, n: int):
    """(s_indices on ``device`` as int64, its packed layout), or None for a pattern the kernels do not take
    (duplicates, diagonal entries: PEFT's coalesce sums duplicates, so such a layer keeps PEFT's forward)."""
    def build():
        idx = s_indices.detach().to(device=device, dtype=torch.long)
        try:
            check_pattern(idx, n)
        except ValueError:
            return None
        return idx, build_layout(idx, n, validate=False).packed

    return DERIVED.get(s_indices, ("peft-layout", device, n), build)
