"""What the kernel-family tests share: the backends and devices they run on, and the cases every backend meets."""

import os

import pytest
import torch

from frod_kernels import registry

HAS_GPU = torch.cuda.is_available()
# (n, m, nnz, strided): one token, a strided operand with few columns, a column count past one tile and not a
# multiple of it (both layouts), an empty pattern, an empty token dimension, a single row
KERNEL_CASES = [(37, 1, 90, False), (37, 5, 90, True), (37, 129, 200, False), (37, 129, 200, True),
                (37, 5, 0, False), (37, 0, 90, False), (1, 3, 0, True)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def backend_params():
    """Every registered backend on the CPU (Triton under its interpreter) and on a GPU."""
    params = []
    for backend in registry.backends():
        for device in ("cpu", "cuda"):
            if backend == "cuda" and device == "cpu":
                continue  # no CPU implementation: tests/backends/test_cuda_backend.py emulates the kernels there
            marks = []
            if device == "cuda" and not HAS_GPU:
                marks.append(pytest.mark.skipif(True, reason="no CUDA GPU"))
            elif device == "cpu" and backend == "triton" and HAS_GPU and os.environ.get("TRITON_INTERPRET") != "1":
                marks.append(pytest.mark.skipif(True, reason="a CUDA GPU is present, so Triton compiles for it; run "
                                                             "with TRITON_INTERPRET=1 for the interpreter"))
            marks.append(pytest.mark.frod_backend(backend))
            params.append(pytest.param(backend, device, marks=marks, id=f"{backend}-{device}"))
    return params


def skip_unless_runs(backend: str, device: str) -> None:
    reason = registry.unavailable_reason(backend, device)
    if reason is not None:
        pytest.skip(f"backend {backend} cannot run on {device}: {reason}")


def call(backend: str, op: str, *args):
    """``torch.ops.frod.<op>`` on ``backend``."""
    import frod_kernels as fk

    with fk.use_backend(backend):
        return getattr(torch.ops.frod, op)(*args)
