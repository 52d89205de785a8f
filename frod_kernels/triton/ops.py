"""Registration of the Triton kernels as the ``triton`` backend of the kernel-family ops."""

from __future__ import annotations

import os

from .._backends import register_probe

try:
    import triton  # noqa: F401

    _IMPORT_ERROR = None
except ImportError as e:  # triton is optional: the torch backend covers every device
    _IMPORT_ERROR = f"triton is not importable ({e})"


def _probe(device_type: str) -> "str | None":
    if _IMPORT_ERROR:
        return _IMPORT_ERROR
    if device_type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "Triton runs on the CPU only under its interpreter (TRITON_INTERPRET=1)"
    return "the Triton kernels are not implemented yet"


register_probe("triton", _probe)
