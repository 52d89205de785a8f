"""frod-kernels: fast FRoD fine-tuning (fused kernels for W' = U (diag(lambda) + S) V^T)."""

from . import backends  # noqa: F401  (each backend registers itself)
from ._env import VERSION
from ._validation import checks, get_checks, set_checks
from .autotune import explain, get_autotune, set_autotune
from .nn import FrodBasis, FrodLinear, replace_linears
from .ops import frod_linear
from .registry import available_backends, get_backend, set_backend, use_backend

__version__ = VERSION

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
