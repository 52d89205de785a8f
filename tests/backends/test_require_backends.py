"""FROD_REQUIRE_BACKENDS (tests/conftest.py): a skip because a named backend cannot run here fails instead.

Each check runs pytest in a subprocess on a small test file whose conftest is this suite's, with the Triton
interpreter off, so that the triton backend cannot run on this CPU and says why.
"""

import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
import torch

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# This suite's conftest under another module name (this file's own conftest is "conftest"), hooks and all.
CONFTEST = '''
import importlib.util

spec = importlib.util.spec_from_file_location("frod_suite_conftest", {path!r})
suite = importlib.util.module_from_spec(spec)
spec.loader.exec_module(suite)
globals().update({{k: v for k, v in vars(suite).items() if not k.startswith("__")}})
'''

CASES = '''
import pytest
from frod_kernels.registry import unavailable_reason

REASON = unavailable_reason("triton", "cpu")


@pytest.mark.skipif(REASON is not None, reason=f"triton cannot run: {REASON}")
def test_skips_for_triton():
    pass


def test_skips_for_triton_inside():
    if REASON is not None:
        pytest.skip(f"triton cannot run: {REASON}")


@pytest.mark.skip(reason="nothing to do with a backend")
def test_skips_for_another_reason():
    pass


@pytest.mark.frod_backend("triton")
def test_marked_and_skipping():
    pytest.skip("the GPU compiler is missing")


@pytest.mark.xfail(reason=f"expected: {REASON}")
def test_xfail_stays_xfail():
    assert False


def test_passes():
    pass
'''


def _run(tmp_path, required):
    (tmp_path / "conftest.py").write_text(CONFTEST.format(path=os.path.join(TESTS, "conftest.py")))
    (tmp_path / "test_cases.py").write_text(CASES)
    env = {k: v for k, v in os.environ.items() if k != "FROD_REQUIRE_BACKENDS"}
    env.update(TRITON_INTERPRET="0", FROD_REQUIRE_BACKENDS=required)
    junit = tmp_path / "report.xml"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:xdist", "-q",
                           f"--junitxml={junit}", "test_cases.py"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    outcomes = {}
    if junit.exists():
        for case in ET.parse(junit).getroot().iter("testcase"):
            kinds = {child.tag for child in case} & {"failure", "error", "skipped"}
            outcomes[case.get("name")] = "failed" if kinds & {"failure", "error"} else (
                "skipped" if kinds else "passed")
    return proc, outcomes


pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where triton cannot run on the "
                                                                  "CPU without its interpreter: no CUDA GPU")


def test_a_skip_for_a_required_backend_fails_with_the_reason(tmp_path):
    proc, outcomes = _run(tmp_path, "triton")
    assert outcomes == {"test_skips_for_triton": "failed", "test_skips_for_triton_inside": "failed",
                        "test_skips_for_another_reason": "skipped", "test_marked_and_skipping": "failed",
                        "test_xfail_stays_xfail": "skipped", "test_passes": "passed"}, proc.stdout[-4000:]
    assert proc.returncode == 1
    assert "FROD_REQUIRE_BACKENDS requires backend 'triton', which cannot run on cpu: Triton runs on the CPU only" \
        in proc.stdout
    assert "FROD_REQUIRE_BACKENDS: backend 'triton' cannot run on cpu" in proc.stdout


def test_backends_that_run_change_nothing(tmp_path):
    proc, outcomes = _run(tmp_path, "torch")
    assert set(outcomes.values()) == {"passed", "skipped"} and outcomes["test_passes"] == "passed", proc.stdout
    assert proc.returncode == 0, proc.stdout[-4000:]


def test_unknown_backend_names_are_refused(tmp_path):
    proc, _ = _run(tmp_path, "torch,tritno")
    assert proc.returncode == pytest.ExitCode.USAGE_ERROR
    assert "unknown backends ['tritno']" in proc.stderr
