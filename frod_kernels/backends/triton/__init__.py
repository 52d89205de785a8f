"""Registration of the Triton kernels as the ``triton`` backend of the kernel-family ops.

The kernel modules (:mod:`.row_gather`, :mod:`.sampled_dot`) are imported on the first launch, not here: importing
``triton`` is what the probe needs, while ``@triton.jit`` decides when a kernel module is imported whether its
kernels compile or run under the interpreter. Deferring that to the first launch lets a process (a test session)
enable ``TRITON_INTERPRET`` after ``frod_kernels`` has loaded its backends.
"""

from __future__ import annotations

import os

import torch

from .._backends import register_impl, register_probe

try:
    import triton  # noqa: F401

    _IMPORT_ERROR = None
except ImportError as e:  # triton is optional: the torch backend covers every device
    _IMPORT_ERROR = f"triton is not importable ({e})"


def _probe(device_type: str) -> "str | None":
    if _IMPORT_ERROR:
        return _IMPORT_ERROR
    if device_type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            return "Triton runs on the CPU only under its interpreter (TRITON_INTERPRET=1)"
        return None
    if device_type == "cuda":
        return None if torch.cuda.is_available() else "no CUDA GPU is available"
    return f"Triton kernels run on CUDA devices (or the CPU under TRITON_INTERPRET=1), not on {device_type}"


register_probe("triton", _probe)


@register_impl("row_gather_diag", "triton")
def row_gather_diag(A, diag, weights, ptr, src):
    from .row_gather import row_gather_diag as kernel

    return kernel(A, diag, weights, ptr, src)


@register_impl("sampled_dot_diag", "triton")
def sampled_dot_diag(P, Q, ptr, src):
    from .sampled_dot import sampled_dot_diag as kernel

    return kernel(P, Q, ptr, src)
