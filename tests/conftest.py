import atexit
import os
import shutil
import tempfile

import torch

# The projection cache is off in the tests, and points at a throwaway directory should a test turn it on without
# naming one: nothing is written into the user's cache. The cache's own tests pass their directories.
os.environ["FROD_CACHE"] = "0"
os.environ["FROD_CACHE_DIR"] = tempfile.mkdtemp(prefix="frod-cache-tests-")
atexit.register(shutil.rmtree, os.environ["FROD_CACHE_DIR"], True)

# Triton fixes at its own import whether its jit functions run interpreted, and importing peft or transformers
# imports triton: switch the interpreter on before anything can, so the Triton kernels run on the CPU. "auto" never
# picks Triton on the CPU, so the rest of the suite still runs on the torch backend.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from frod_kernels.reference import TOLERANCE  # noqa: E402


def random_pattern(n: int, nnz: int, generator: torch.Generator) -> torch.Tensor:
    """A random off-diagonal pattern of an n x n matrix with nnz distinct entries, unsorted like PEFT's."""
    nnz = min(nnz, n * (n - 1))
    off = torch.randperm(n * (n - 1), generator=generator)[:nnz]
    rows = off // (n - 1)
    cols = off % (n - 1)
    cols = cols + (cols >= rows).long()  # skip the diagonal
    return torch.stack([rows, cols])


def random_problem(n_in, n_out, nnz, lead=(7,), dtype=torch.float32, param_dtype=None, bias=True, seed=None,
                   device="cpu"):
    """Fresh random FRoD inputs (never zeros): x, V, U, lambda_l, s_values, s_indices, bias.

    V is orthogonal-ish and U has unit-norm columns, as FRoD's projections are, so outputs are O(1).
    """
    g = torch.Generator().manual_seed(seed if seed is not None else torch.randint(0, 2**31, ()).item())
    param_dtype = param_dtype or dtype
    V = torch.linalg.qr(torch.randn(n_in, n_in, generator=g, dtype=torch.float64))[0]
    U = torch.randn(n_out, n_in, generator=g, dtype=torch.float64)
    U = U / U.norm(dim=0, keepdim=True)
    x = torch.randn(*lead, n_in, generator=g, dtype=torch.float64)
    lam = 0.5 + torch.rand(n_in, generator=g, dtype=torch.float64)
    s_indices = random_pattern(n_in, nnz, g)
    s = 0.3 * torch.randn(s_indices.shape[1], generator=g, dtype=torch.float64)
    b = torch.randn(n_out, generator=g, dtype=torch.float64) if bias else None

    def cast(t, dt):
        return None if t is None else t.to(device=device, dtype=dt)

    return (cast(x, dtype), cast(V, dtype), cast(U, dtype), cast(lam, param_dtype), cast(s, param_dtype),
            s_indices.to(device), cast(b, dtype))


def tol(dtype):
    return TOLERANCE[dtype]


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # Fresh data every run, but a failing run prints the seed that reproduces it.
    seed = int(os.environ.get("FROD_TEST_SEED", torch.seed() % 2**31))
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for key, value in item.user_properties:
            if key == "seed":
                report.sections.append(("seed", f"FROD_TEST_SEED={value} reproduces this test's random data"))
