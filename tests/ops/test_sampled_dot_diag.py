"""``frod::sampled_dot_diag`` (kernel family 2, docs/DESIGN.md section 6) on every backend that runs here, against
its float64 twin and the torch twin. What is one backend's own (Triton's split reductions and autotune keys, the
CUDA kernels' alignments and their CPU emulation) is in tests/backends/; the family's benchmark is
``frod-bench --suite kernels``."""

import pytest
import torch
from conftest import operand, random_pattern
from family_cases import DTYPES, KERNEL_CASES, backend_params, call, skip_unless_runs

from frod_kernels.backends import pytorch as torch_backend
from frod_kernels.layout import build_layout
from frod_kernels.reference import TOLERANCE, reference_sampled_dot_diag, rel_err


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,m,nnz,strided", KERNEL_CASES)
def test_sampled_dot_diag(backend, device, dtype, n, m, nnz, strided):
    skip_unless_runs(backend, device)
    lay = build_layout(random_pattern(n, nnz, torch.Generator().manual_seed(torch.seed() % 2**31)), n)
    ptr, src = lay.row_ptr.to(device), lay.row_src.to(device)
    P = operand(n, m, dtype, device, strided)
    Q = operand(n, m, dtype, device, False)
    vals, diag = call(backend, "sampled_dot_diag", P, Q, ptr, src)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert vals.dtype == diag.dtype == acc and vals.shape == (nnz,) and diag.shape == (n,)

    ref_vals, ref_diag = reference_sampled_dot_diag(P, Q, ptr, src)
    tvals, tdiag = torch_backend.sampled_dot_diag(P, Q, ptr, src)
    for got, ref, twin in ((vals, ref_vals, tvals), (diag, ref_diag, tdiag)):
        # The dots accumulate in float32 whatever the operand dtype: float32 tolerance for every input dtype.
        assert rel_err(got, ref) <= TOLERANCE[acc]
        if backend != "torch":
            assert rel_err(got, twin) <= TOLERANCE[acc]
