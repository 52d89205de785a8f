"""``frod::row_gather_diag`` (kernel family 1, docs/DESIGN.md section 6) on every backend that runs here, against
its float64 twin and the torch twin. What is one backend's own (Triton's determinism and compiles, the CUDA
kernels' alignments and their CPU emulation) is in tests/backends/; the family's benchmark is
``frod-bench --suite kernels``."""

import pytest
import torch
from conftest import operand, random_pattern
from family_cases import DTYPES, KERNEL_CASES, backend_params, call, skip_unless_runs

from frod_kernels.backends import pytorch as torch_backend
from frod_kernels.layout import build_layout
from frod_kernels.reference import TOLERANCE, reference_row_gather_diag, rel_err


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,m,nnz,strided", KERNEL_CASES)
def test_row_gather_diag(backend, device, dtype, n, m, nnz, strided):
    skip_unless_runs(backend, device)
    lay = build_layout(random_pattern(n, nnz, torch.Generator().manual_seed(torch.seed() % 2**31)), n)
    ptr, src = lay.col_ptr.to(device), lay.col_src.to(device)
    A = operand(n, m, dtype, device, strided)
    diag = (0.5 + torch.rand(n)).to(device)
    weights = torch.randn(src.numel(), device=device)  # float32 values with half-precision A, as PEFT keeps them
    got = call(backend, "row_gather_diag", A, diag, weights, ptr, src)
    assert got.dtype == dtype and got.shape == (n, m)

    assert rel_err(got, reference_row_gather_diag(A, diag, weights, ptr, src)) <= TOLERANCE[dtype]
    if backend != "torch":
        assert rel_err(got, torch_backend.row_gather_diag(A, diag, weights, ptr, src)) <= TOLERANCE[dtype]
