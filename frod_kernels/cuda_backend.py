"""The ``cuda`` backend: hand-written CUDA C++ kernels from ``csrc/``, built by setup.py where a toolkit exists."""

from __future__ import annotations

import torch

from ._backends import register_probe


def _probe(device_type: str) -> "str | None":
    if device_type != "cuda":
        return "the CUDA C++ kernels run on CUDA devices only"
    if not torch.cuda.is_available():
        return "no CUDA GPU is available"
    return "the CUDA C++ extension (frod_kernels._C) is not built"


register_probe("cuda", _probe)
