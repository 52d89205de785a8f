"""frod-kernels: fast FRoD fine-tuning (fused kernels for W' = U (diag(lambda) + S) V^T)."""

from ._backends import available_backends, get_backend, set_backend, use_backend
from ._validation import checks, get_checks, set_checks
from .autotune import explain, get_autotune, set_autotune
from .layer import FrodBasis, FrodLinear, replace_linears
from .ops import frod_linear

__version__ = "0.1.0"

__all__ = [
    "FrodBasis",
    "FrodLinear",
    "available_backends",
    "checks",
    "explain",
    "frod_linear",
    "get_autotune",
    "get_backend",
    "get_checks",
    "replace_linears",
    "set_autotune",
    "set_backend",
    "set_checks",
    "use_backend",
]
