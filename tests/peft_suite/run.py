"""PEFT's own FRoD tests, run twice: as PEFT ships them, and with ``frod_kernels.peft.enable()`` in force.

    pip install -e ".[test,peft-tests]"
    python tests/peft_suite/run.py                 # both runs, then the comparison; exit 0 when they agree

The tests are PEFT's, not ours: the strongest evidence that acceleration changes nothing but speed. The source
distribution of the installed PEFT version is downloaded once (``pip download``) into ``--work`` (default
``build/peft-suite``). Selected are ``tests/test_frod.py`` and the FRoD cases of ``tests/test_initialization.py``,
``tests/test_custom_models.py``, ``tests/test_config.py`` and ``tests/test_low_level_api.py``: by config type, not by
name (:mod:`frod_select_plugin`, this folder, loaded in both runs). The accelerated run also loads
:mod:`frod_accel_plugin` (this folder), which enables acceleration for the whole session and counts the fused calls.

Fails (exit 1) when any test's outcome differs between the two runs, when the accelerated run has a failure or
error, or when it never reached the fused op. Prints both runs' counts and times.
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET

HERE = os.path.dirname(os.path.abspath(__file__))
FILES = ["tests/test_frod.py", "tests/test_initialization.py", "tests/test_custom_models.py", "tests/test_config.py",
         "tests/test_low_level_api.py"]
# What PEFT's FRoD tests import beyond PEFT itself (the extra "peft-tests" of setup.py installs them).
NEEDS = ["diffusers", "datasets", "parameterized", "attr", "scipy"]


def peft_sources(version: str, work: str) -> str:
    """The unpacked PEFT sdist of ``version`` under ``work`` (downloaded once)."""
    root = os.path.join(work, f"peft-{version}")
    if not os.path.isdir(os.path.join(root, "tests")):
        os.makedirs(work, exist_ok=True)
        archive = os.path.join(work, f"peft-{version}.tar.gz")
        if not os.path.isfile(archive):
            subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-binary", ":all:", "--no-deps",
                            f"peft=={version}", "-d", work], check=True)
        with tarfile.open(archive) as tar:
            tar.extractall(work, filter="data")
    # The sdist leaves out tests/__init__.py, and the test modules import each other relatively.
    init = os.path.join(root, "tests", "__init__.py")
    if not os.path.exists(init):
        open(init, "w").close()
    return root


def run_pytest(root: str, junit: str, accelerated: bool, calls_file: str) -> float:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""))
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "frod_select_plugin", "-o",
            "addopts=",
            # transformers 5.x deprecation warnings turn into errors in one Llama test, with or without acceleration
            "-W", "ignore::FutureWarning", f"--junitxml={junit}", *FILES]
    if accelerated:
        args[3:3] = ["-p", "frod_accel_plugin"]
        env["FROD_FUSED_CALLS_FILE"] = calls_file
    print(f"== PEFT's FRoD tests, {'accelerated' if accelerated else 'plain PEFT'}", flush=True)
    t0 = time.perf_counter()
    subprocess.run(args, cwd=root, env=env)  # failures are read from the report, not the exit status
    return time.perf_counter() - t0


def outcomes(junit: str) -> dict[str, str]:
    """test id -> passed / failed / error / skipped, from a JUnit XML report."""
    found = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        kinds = {child.tag for child in case} & {"failure", "error", "skipped"}
        outcome = "failed" if "failure" in kinds else "error" if "error" in kinds else (
            "skipped" if "skipped" in kinds else "passed")
        found[f"{case.get('classname')}::{case.get('name')}"] = outcome
    return found


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="build/peft-suite", help="download and report folder")
    args = p.parse_args(argv)

    import peft

    missing = [m for m in NEEDS if not _importable(m)]
    if missing:
        print(f"PEFT's tests need {', '.join(missing)}: pip install -e '.[peft-tests]'", file=sys.stderr)
        return 2
    work = os.path.abspath(args.work)
    root = peft_sources(peft.__version__, work)
    calls_file = os.path.join(work, "fused_calls.txt")
    if os.path.exists(calls_file):
        os.remove(calls_file)
    runs, seconds = {}, {}
    for accelerated in (False, True):
        name = "accelerated" if accelerated else "plain"
        junit = os.path.join(work, f"{name}.xml")
        if os.path.exists(junit):
            os.remove(junit)
        seconds[name] = run_pytest(root, junit, accelerated, calls_file)
        if not os.path.exists(junit):
            print(f"FAIL: the {name} run wrote no report (pytest stopped before running tests; see above)")
            return 1
        runs[name] = outcomes(junit)

    plain, fast = runs["plain"], runs["accelerated"]
    print(f"\nPEFT {peft.__version__}, the FRoD cases of {' '.join(FILES)}")
    for name, found in runs.items():
        counts = collections.Counter(found.values())
        print(f"  {name:<12} {len(found)} tests: " + ", ".join(f"{counts[k]} {k}" for k in
              ("passed", "skipped", "failed", "error")) + f"  ({seconds[name]:.0f} s)")
    per_file = collections.Counter(t.split(".")[1] for t in fast)
    print("  FRoD cases per file: " + ", ".join(f"{f} {n}" for f, n in sorted(per_file.items())))
    problems = [f"{t}: {plain.get(t, 'absent')} without acceleration, {fast.get(t, 'absent')} with it"
                for t in sorted(plain.keys() | fast.keys()) if plain.get(t) != fast.get(t)]
    problems += [f"{t}: {o} with acceleration" for t, o in sorted(fast.items()) if o in ("failed", "error")
                 and plain.get(t) == o]
    calls = 0
    if os.path.exists(calls_file):
        with open(calls_file) as f:
            calls = int(f.read())
    print(f"  fused FRoD calls in the accelerated run: {calls}")
    if not fast:
        problems.append("the accelerated run reported no tests")
    if calls == 0:
        problems.append("the accelerated run never called the fused op: acceleration was not in force")
    if problems:
        print("\nFAIL:\n  " + "\n  ".join(problems))
        return 1
    print("OK: every test has the same outcome with and without acceleration")
    return 0


def _importable(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
