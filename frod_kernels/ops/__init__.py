"""The FRoD ops, declared once as torch custom ops (``torch.ops.frod.*``), and :func:`frod_linear`, the public op.

* ``frod::row_gather_diag`` (:mod:`.row_gather_diag`) and ``frod::sampled_dot_diag`` (:mod:`.sampled_dot_diag`):
  the two kernel families of docs/DESIGN.md section 6. Torch, Triton and CUDA C++ implement these same schemas
  (:mod:`frod_kernels.backends`); the op runs the selected backend's (:mod:`frod_kernels.dispatch`).
* ``frod::frod_linear_fwd`` / ``frod::frod_linear_bwd`` (:mod:`.frod_linear`): the whole layer, composed of the
  two families and dense matmuls (:mod:`frod_kernels.engine`), what ``torch.compile`` sees.
* :func:`frod_linear` (:mod:`.api`): checks, path choice, and the call.
"""

from . import row_gather_diag, sampled_dot_diag  # noqa: F401  (declares the ops)
from .api import frod_linear

__all__ = ["frod_linear"]
