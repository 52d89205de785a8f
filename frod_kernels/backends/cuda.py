"""The ``cuda`` backend: hand-written CUDA C++ kernels from ``csrc/``, built by setup.py where a toolkit exists.

The extension ``frod_kernels._C`` defines ``torch.ops.frod_cuda.row_gather_diag`` / ``sampled_dot_diag`` with the
schemas of the ``frod::`` ops and registers their CUDA kernels. It is optional: when it is missing, was built for
another torch, or there is no GPU, the probe says so and ``import frod_kernels`` is unaffected.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import re
from types import ModuleType

import torch

from ..registry import register_backend, register_impl

EXTENSION = "frod_kernels._C"
# csrc/ops.cpp embeds this marker; reading it before loading avoids dlopen-ing a binary built for another torch.
_BUILD_MARKER = re.compile(rb"frod-kernels-cuda-build torch=([A-Za-z0-9._]+);")
_HOW_TO_BUILD = ("pip install --no-build-isolation -e . with a CUDA build of torch and CUDA_HOME set; "
                 "see csrc/README.md")


def build_tag(version: str) -> str:
    """The form of a torch version that setup.py embeds in the binary (see ``cuda_extensions`` there)."""
    return re.sub(r"[^A-Za-z0-9._]", "_", version)


def check_build(path: str) -> "str | None":
    """None if the extension binary at ``path`` was built for the running torch, else why it cannot be used."""
    with open(path, "rb") as f:
        found = _BUILD_MARKER.search(f.read())
    if found is None:
        return f"the CUDA C++ extension {path} carries no build marker (a stale or foreign build): rebuild it"
    built = found.group(1).decode()
    if built != build_tag(torch.__version__):
        return (f"version mismatch: the CUDA C++ extension {path} was built for torch {built}, this is torch "
                f"{torch.__version__}: rebuild it ({_HOW_TO_BUILD})")
    return None


@functools.lru_cache(maxsize=None)
def load_extension() -> "tuple[ModuleType | None, str | None]":
    """``(module, None)`` once the extension is loaded (its ops registered), else ``(None, reason)``."""
    spec = importlib.util.find_spec(EXTENSION)
    if spec is None or spec.origin is None:
        return None, f"the CUDA C++ extension ({EXTENSION}) is not built ({_HOW_TO_BUILD})"
    reason = check_build(spec.origin)
    if reason is not None:
        return None, reason
    try:
        return importlib.import_module(EXTENSION), None
    except (ImportError, OSError) as e:
        return None, f"the CUDA C++ extension {spec.origin} does not load: {e}"


def _probe(device_type: str) -> "str | None":
    if device_type != "cuda":
        return "the CUDA C++ kernels run on CUDA devices only"
    reasons = []
    if not torch.cuda.is_available():
        reasons.append("no CUDA GPU is available")
    _, ext_reason = load_extension()
    if ext_reason is not None:
        reasons.append(ext_reason)
    return "; ".join(reasons) or None


# the hand-written kernels first where nothing is measured: they need no compile at first launch
register_backend("cuda", _probe, preference=20)


@register_impl("row_gather_diag", "cuda")
def row_gather_diag(A, diag, weights, ptr, src):
    return torch.ops.frod_cuda.row_gather_diag(A, diag, weights, ptr, src)


@register_impl("sampled_dot_diag", "cuda")
def sampled_dot_diag(P, Q, ptr, src):
    return torch.ops.frod_cuda.sampled_dot_diag(P, Q, ptr, src)
