"""The implementations of the kernel-family ops. Importing this package registers every backend with
:mod:`frod_kernels.registry`; each module registers itself, so adding a backend is adding a module here and its
import below. Triton and the compiled CUDA extension are optional: a backend that cannot run says why through its
probe, and importing it never fails for that."""

from . import cpu, cuda, pytorch, triton  # noqa: F401  (registration)
