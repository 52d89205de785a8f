"""Every Triton kernel compiled for real GPUs (sm_80, sm_90) by Triton's own compiler, no GPU needed: each launch
layout x shape class x dtype x GPU autotune config, failing on compile errors, spills, local memory, shared memory
over the per-block limit and registers that leave no room for a config's warps (frod_kernels/backends/triton/
compile_report.py). A summary per kernel, layout and arch goes to the terminal.

The compiles run in a subprocess without TRITON_INTERPRET, which this suite sets on a CPU machine
(tests/conftest.py): Triton fixes at import whether jit functions, its own standard library's included, are
interpreted. The compile results are cached (compile_report.default_cache_dir()), so a second run takes seconds.
"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton", reason="triton is not installed")

import triton  # noqa: E402

from frod_kernels.backends.triton import compile_report  # noqa: E402

_REASON = compile_report.unavailable()
# frod_backend: under FROD_REQUIRE_BACKENDS=triton, a Triton that cannot compile for the GPUs fails these tests.
pytestmark = [pytest.mark.skipif(_REASON is not None, reason=str(_REASON)), pytest.mark.frod_backend("triton")]

KERNELS = sorted({kernel for kernel, _ in compile_report.LAUNCHES})


def _compiling_env():
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


@pytest.mark.parametrize("kernel", KERNELS)
def test_every_config_compiles_for_sm80_and_sm90_within_limits(kernel, tmp_path, capsys):
    out = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "frod_kernels.backends.triton.compile_report", "--kernel", kernel,
                           "--json", str(out)], env=_compiling_env(), capture_output=True, text=True)
    assert out.exists(), f"compile_report wrote no results (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
    results = [compile_report.Result(**r) for r in json.loads(out.read_text())["results"]]
    with capsys.disabled():  # into the log even when the test passes
        print(f"\n{compile_report.summary(results)}")

    # Every GPU config of every autotuner this kernel launches with, read here where the autotuners themselves
    # hold the one interpreter config.
    for (k, layout) in compile_report.LAUNCHES:
        if k != kernel:
            continue
        want = {compile_report.config_name(c) for c in compile_report.configs(k, layout)}
        got = [r for r in results if r.layout == layout]
        assert {r.config for r in got} == want
        assert len(got) == (len(want) * len(compile_report.SHAPES) * len(compile_report.DTYPES)
                            * len(compile_report.TARGETS))
    failed = [r for r in results if r.failures]
    assert not failed, (f"{len(failed)} of {len(results)} compiles fail a check:\n" + compile_report.table(failed))
    assert proc.returncode == 0, proc.stderr[-4000:]


def _result(**kw):
    base = dict(kernel="k", layout="rows", shapes="x16", dtype="float32", config="c", arch=90, num_warps=4, regs=64,
                spill_stores=0, spill_loads=0, local=0, stack=0, shared=0)
    return compile_report.check(compile_report.Result(**{**base, **kw}))


def test_check_passes_a_config_within_limits_and_reports_occupancy():
    r = _result(regs=64, num_warps=4, shared=1024)
    assert r.failures == []
    assert r.warps_by_regs == 32  # 64 x 32 = 2048 registers a warp: 32 warps in 65536
    assert r.warps_by_smem == 64  # 2 KiB a block (1 KiB reserved by the runtime): more blocks than the warp cap


@pytest.mark.parametrize("kw, reason", [
    (dict(error="CompilationError: at 3:4"), "compile error"),
    (dict(spill_stores=8, spill_loads=8), "spills"),
    (dict(stack=16), "local memory"),
    (dict(local=4), "local memory"),
    (dict(arch=80, shared=166913), "shared memory"),
    (dict(arch=90, shared=232449), "shared memory"),
    # 129 registers round up to 136: 4352 a warp, 15 warps an SM, fewer than the 16 a block asks for
    (dict(regs=129, num_warps=16), "registers"),
])
def test_check_fails_on_each_limit(kw, reason):
    failures = _result(**kw).failures
    assert len(failures) == 1 and reason in failures[0], failures


def test_check_accepts_the_largest_block_that_fits():
    assert _result(arch=80, shared=166912).failures == []
    assert _result(regs=128, num_warps=16).failures == []


def test_a_register_hungry_config_is_caught_from_a_real_compile():
    # A config that no register allocator can fit, whatever the compiler: its float32 accumulator alone (live across
    # the gather loop) is twice the registers it may use, so the spills the report must catch are certain.
    tile, warps, budget = (32, 128), 1, 64
    assert tile[0] * tile[1] // (32 * warps) == 2 * budget
    code = ("import json, torch, triton; from frod_kernels.backends.triton import compile_report as cr; "
            f"cfg = triton.Config({{'BLOCK_R': {tile[0]}, 'BLOCK_M': {tile[1]}}}, num_warps={warps}, "
            f"maxnreg={budget}); "
            "r = cr.measure('row_gather', 'rows', 'x16', torch.float32, cfg, 90, None); "
            "print(json.dumps([r.regs, r.failures]))")
    proc = subprocess.run([sys.executable, "-c", code], env=_compiling_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    regs, failures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert regs <= budget, regs
    assert any("spills" in f for f in failures) and any("local memory" in f for f in failures), failures


def test_configs_are_the_gpu_lists_even_under_the_interpreter():
    from frod_kernels.backends.triton import row_gather

    assert compile_report.configs("row_gather", "rows") is row_gather._KERNEL.gpu_configs
    assert len(compile_report.configs("row_gather", "rows")) > 1
    assert all(isinstance(c, triton.Config) for c in compile_report.configs("sampled_dot", "rows"))


def test_the_gather_compiles_for_one_layout_of_a():
    # A strided A (U.t()) is copied row-major before its launch (tests/backends/test_triton_backend.py checks the copy).
    assert [layout for kernel, layout in compile_report.LAUNCHES if kernel == "row_gather"] == ["rows"]
