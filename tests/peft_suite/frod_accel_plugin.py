"""pytest plugin (``-p frod_accel_plugin``): runs a test session with ``frod_kernels.peft.enable()`` in force and
counts the calls into the fused op, so a run that never took the fused path cannot pass for an accelerated one.

Set ``FROD_FUSED_CALLS_FILE`` to a path to get the count written there at the end of the session.

The projection cache is on, in a directory of the session's own (never the user's cache): PEFT's tests that build
the same model twice then read its projections back, so they check the cache too.
"""

import os
import shutil
import tempfile

import frod_kernels.peft as fkp

_calls = 0
_cache_dir = tempfile.mkdtemp(prefix="frod-peft-suite-cache-")


def pytest_configure(config):
    real = fkp.forward.frod_linear

    def counting(*args, **kwargs):
        global _calls
        _calls += 1
        return real(*args, **kwargs)

    fkp.forward.frod_linear = counting
    fkp.enable(cache=_cache_dir)


def pytest_unconfigure(config):
    shutil.rmtree(_cache_dir, ignore_errors=True)
    path = os.environ.get("FROD_FUSED_CALLS_FILE")
    if path:
        with open(path, "w") as f:
            f.write(f"{_calls}\n")


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line(f"frod_kernels.peft: enabled for the whole session; {_calls} fused FRoD calls")
