"""Autocast rules of the FRoD custom ops.

torch.autocast follows PyTorch's rule for linear layers: the activations and the frozen V, U (and bias) are cast
to the autocast dtype, as F.linear casts its input, weight and bias. lambda_l and s_values keep their own dtype
(float32 under PEFT's adapter autocast, like an optimizer's master weights): the kernels accumulate in float32
anyway, so keeping them costs nothing and their gradients are never rounded to half precision. (The stock
torch.library.register_autocast cannot express this: it casts every floating input to one fixed dtype.)
Every FRoD op then runs with autocast off, including the backward and the two families when called inside an
autocast region: the kernels choose their own precision, and the torch backend's CSR kernels take no
half-precision operands that autocast's matmul rule would hand them.
"""

from __future__ import annotations

import torch
from torch import Tensor

_lib = torch.library.Library("frod", "FRAGMENT")


def cast(args: tuple, cast_args: tuple[int, ...], device_type: str) -> tuple:
    """``args`` with the floating tensors at ``cast_args`` (on ``device_type``, never float64: autocast's
    eligibility rule) in the autocast dtype."""
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(a.to(dtype) if i in cast_args and isinstance(a, Tensor) and a.is_floating_point()
                 and a.device.type == device_type and a.dtype != torch.float64 else a
                 for i, a in enumerate(args))


def register(name: str, cast_args: tuple[int, ...]) -> None:
    """Run ``frod::name`` with autocast off, its ``cast_args`` cast first, on the CPU and CUDA."""
    op = getattr(torch.ops.frod, name).default
    for device_type in ("cpu", "cuda"):
        key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        keyset = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

        def kernel(_keyset, *args, device_type=device_type, keyset=keyset):
            if cast_args:
                args = cast(args, cast_args, device_type)
            with torch._C._ExcludeDispatchKeyGuard(keyset):
                return op(*args)

        _lib.impl(name, kernel, key, with_keyset=True)
