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


def operand(n, m, dtype, device, strided):
    """A random (n, m) kernel-family operand; ``strided``: a view of an (m, n) matrix, as ``U.t()`` of a row-major
    U is."""
    t = torch.randn(m, n).t() if strided else torch.randn(n, m)
    t = t.to(device=device, dtype=dtype)
    assert strided == (not t.is_contiguous()) or min(n, m) <= 1
    return t


def run(x, V, U, lam, s, si, b, grad_out, **kw):
    """``frod_linear`` forward and backward on fresh leaves: (y, dx, dlambda, ds, dbias)."""
    import frod_kernels as fk

    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (x, lam, s, b)]
    xg, lg, sg, bg = leaves
    y = fk.frod_linear(xg, V, U, lg, sg, si, bg, **kw)
    y.backward(grad_out)
    return y, xg.grad, lg.grad, sg.grad, (bg.grad if bg is not None else None)


def tol(dtype):
    return TOLERANCE[dtype]


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # Fresh data every run, but a failing run prints the seed that reproduces it.
    seed = int(os.environ.get("FROD_TEST_SEED", torch.seed() % 2**31))
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield


# FROD_REQUIRE_BACKENDS=triton,cuda: backends that must run on this machine's device (the GPU where there is one,
# else the CPU). On a GPU machine a backend that did not build or load would otherwise turn hundreds of tests into
# skips and leave the run green; with the variable set, each such skip fails with its reason, and the session fails
# even where no test would have skipped.
REQUIRE_VAR = "FROD_REQUIRE_BACKENDS"
REQUIRED = [b.strip() for b in os.environ.get(REQUIRE_VAR, "").split(",") if b.strip()]


def _device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def missing_required_backends() -> dict[str, str]:
    """Each backend that FROD_REQUIRE_BACKENDS names and that cannot run on this machine's device, with the reason."""
    from frod_kernels.registry import unavailable_reason

    device = _device_type()
    return {b: r for b in REQUIRED if (r := unavailable_reason(b, device)) is not None}


def pytest_configure(config):
    config.addinivalue_line("markers", "frod_backend(name): a skip of this test means backend `name` was not "
                                       f"exercised; it fails where {REQUIRE_VAR} names that backend")
    import frod_kernels  # noqa: F401  (registers the backends)
    from frod_kernels.registry import backends

    unknown = sorted(set(REQUIRED) - set(backends()))
    if unknown:
        raise pytest.UsageError(f"{REQUIRE_VAR} names unknown backends {unknown}; known: {backends()}")


def pytest_report_header(config):
    if REQUIRED:
        missing = missing_required_backends()
        return [f"{REQUIRE_VAR}: {', '.join(REQUIRED)} required on {_device_type()}; "
                + ("; ".join(f"{b} cannot run: {r}" for b, r in missing.items()) if missing else "all can run")]


def _required_skip(item, report) -> "str | None":
    """Why this skipped test must fail instead (FROD_REQUIRE_BACKENDS), or None."""
    message = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    for backend, reason in missing_required_backends().items():
        if reason in message:
            return f"{REQUIRE_VAR} requires backend {backend!r}, which cannot run on {_device_type()}: {reason}"
    for mark in item.iter_markers("frod_backend"):
        for backend in set(mark.args) & set(REQUIRED):
            return f"{REQUIRE_VAR} requires backend {backend!r}, and this test skipped: {message}"
    return None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and REQUIRED and not hasattr(report, "wasxfail"):
        why = _required_skip(item, report)
        if why is not None:
            report.outcome = "failed"
            report.longrepr = why
    if report.failed:
        for key, value in item.user_properties:
            if key == "seed":
                report.sections.append(("seed", f"FROD_TEST_SEED={value} reproduces this test's random data"))


def pytest_sessionfinish(session, exitstatus):
    if REQUIRED and missing_required_backends():
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
    if REQUIRED:
        for backend, reason in missing_required_backends().items():
            terminalreporter.write_line(f"{REQUIRE_VAR}: backend {backend!r} cannot run on {_device_type()}: "
                                        f"{reason}", red=True, bold=True)
