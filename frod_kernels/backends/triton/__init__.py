"""Triton kernels for the two kernel families (docs/DESIGN.md section 6), registered as the ``triton`` backend:
:mod:`.row_gather` and :mod:`.sampled_dot` hold one kernel family each, :mod:`.compile_report` compiles them for
GPUs without one.

Neither ``triton`` nor the kernel modules are imported here: the probe imports ``triton`` (once, when the backend
is first asked about), and the kernel modules are imported on the first launch, because ``@triton.jit`` decides
when a kernel module is imported whether its kernels compile or run under the interpreter. Deferring that lets a
process (a test session) enable ``TRITON_INTERPRET`` after ``frod_kernels`` has been imported.
"""

from __future__ import annotations

import os

import torch

from ...registry import register_backend, register_impl


def _probe(device_type: str) -> "str | None":
    try:
        import triton  # noqa: F401
    except ImportError as e:  # triton is optional: the torch backend covers every device
        return f"triton is not importable ({e})"
    if device_type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            return "Triton runs on the CPU only under its interpreter (TRITON_INTERPRET=1)"
        return None
    if device_type == "cuda":
        return None if torch.cuda.is_available() else "no CUDA GPU is available"
    return f"Triton kernels run on CUDA devices (or the CPU under TRITON_INTERPRET=1), not on {device_type}"


register_backend("triton", _probe, preference=10)


@register_impl("row_gather_diag", "triton")
def row_gather_diag(A, diag, weights, ptr, src):
    from .row_gather import row_gather_diag as kernel

    return kernel(A, diag, weights, ptr, src)


@register_impl("sampled_dot_diag", "triton")
def sampled_dot_diag(P, Q, ptr, src):
    from .sampled_dot import sampled_dot_diag as kernel

    return kernel(P, Q, ptr, src)
