"""frod-bench's overhead and kernels suites, its timing and counting helpers, the init command line, and the
command-line details (--markdown, --version, the cache listing). Tiny sizes; speed is never asserted here."""

import json
import time

import numpy as np
import pytest
import torch

from frod_kernels import engine, registry
from frod_kernels.bench import init, kernels, overhead
from frod_kernels.bench.__main__ import main
from frod_kernels.bench.common import Quiet, count_ops, measure_interleaved
from frod_kernels.bench.sizes import PRESETS
from frod_kernels.reference import TOLERANCE

CPU = torch.device("cpu")
TINY = PRESETS["tiny"]


def test_interleaved_timer_runs_hooks_untimed_and_reports_its_samples():
    calls = []

    def slow():
        calls.append("slow")
        time.sleep(0.002)

    def fast():
        calls.append("fast")

    res = measure_interleaved({"slow": slow, "fast": fast}, CPU, repeats=5, warmup=1,
                              before={"slow": lambda: calls.append("before slow")})
    # warm-up, then rounds: each method once per round, in a shuffled order, the hook right before every call of
    # its method, warm-up included
    assert calls[:3] == ["before slow", "slow", "fast"]
    rounds = [sorted(calls[i:i + 3]) for i in range(3, len(calls), 3)]
    assert rounds == [["before slow", "fast", "slow"]] * 5
    assert all(calls[i - 1] == "before slow" for i, c in enumerate(calls) if c == "slow")
    for name, r in res.items():
        assert len(r["samples_ms"]) == r["repeats"] == 5
        q1, median, q3 = np.percentile(r["samples_ms"], [25, 50, 75])
        assert (r["q1_ms"], r["median_ms"], r["q3_ms"]) == pytest.approx((q1, median, q3))
    assert min(res["slow"]["samples_ms"]) >= 2.0  # milliseconds, and the sleep is inside the timed call


def test_count_ops_counts_aten_events_and_their_leaves():
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    assert count_ops(lambda: (a + b) * b, CPU) == {"aten_ops": 2, "leaf_aten_ops": 2}
    # aten::t calls aten::transpose, which calls aten::as_strided: three ops, one leaf
    assert count_ops(lambda: a.t(), CPU) == {"aten_ops": 3, "leaf_aten_ops": 1}


def test_overhead_suite_rows(capsys):
    threads = torch.get_num_threads()
    rows = overhead.run(TINY, CPU, Quiet())
    assert torch.get_num_threads() == threads  # one thread for the suite only
    by = {r["method"]: r for r in rows}
    assert list(by) == list(overhead.METHODS) and len(overhead.METHODS) == 5 + len(engine.PATH_NAMES)
    lora, linear = by[overhead.LORA]["median_ms"], by[overhead.LINEAR]["median_ms"]
    for r in rows:
        assert "error" not in r, r
        assert (r["n_in"], r["n_out"], r["tokens"], r["threads"]) == (64, 64, 8, 1)
        assert len(r["samples_ms"]) == TINY.overhead_repeats and r["median_ms"] > 0
        assert r["time_vs_lora"] == pytest.approx(r["median_ms"] / lora)
        assert r["time_vs_linear"] == pytest.approx(r["median_ms"] / linear)
        assert 0 < r["leaf_aten_ops"] <= r["aten_ops"]
    # a frozen linear's forward and backward dispatch far less than any adapter's
    assert by[overhead.LINEAR]["aten_ops"] < by[overhead.LORA]["aten_ops"] < by[overhead.PEFT_FROD]["aten_ops"]
    # accelerate() is off again: PEFT's own forward is back for whatever runs next
    from peft.tuners.frod.layer import Linear

    assert "frod_kernels" not in Linear.forward.__code__.co_filename


def test_kernels_suite_checks_each_op_against_float64():
    rows = kernels.run(TINY, CPU, Quiet())
    timed = [r for r in rows if not r.get("skipped")]
    assert {(r["op"], r["n"], r["m"], r["layout"]) for r in timed} == {
        (op, n, m, layout) for n, m, layout in TINY.kernel_cases for op in kernels.OPS}
    # the C kernels where this machine built them (their probe says why not otherwise)
    c_kernels = {"cpu"} if registry.unavailable_reason("cpu", "cpu") is None else set()
    assert {r["backend"] for r in timed} == {"torch"} | c_kernels
    for r in timed:
        assert r["ok"] and 0 <= r["rel_err"] <= r["tolerance"] == TOLERANCE[torch.float32], r
        assert r["bytes_per_s"] == pytest.approx(r["bytes"] / (r["median_ms"] * 1e-3))
    # on the CPU, Triton is not timed, and says why
    triton = [r for r in rows if r["backend"] == "triton"]
    assert triton and all("interpreter" in r["skipped"] for r in triton)


def test_kernels_compulsory_bytes():
    # in=10, m=6, 7 nonzeros, float32: A read and out written (2*10*6*4), diag (10*4), weights (7*4), ptr (11*8),
    # src (7*8)
    assert kernels.compulsory_bytes(10, 6, 7, torch.float32) == 480 + 40 + 28 + 88 + 56
    # bf16 (the sampled dot: P and Q read, 2*10*6*2; vals and diag written, float32)
    assert kernels.compulsory_bytes(10, 6, 7, torch.bfloat16) == 240 + 28 + 40 + 88 + 56


def test_cli_kernels_marks_a_wrong_result_and_exits_1(monkeypatch, capsys, tmp_path):
    with registry.scoped():
        real = registry.impls("row_gather_diag")["torch"]
        registry.register_impl("row_gather_diag", "torch")(lambda *args: real(*args) * (1 + 1e-3))
        rc = main(["--suite", "kernels", "--sizes", "tiny", "--device", "cpu", "--out", str(tmp_path)])
    out = capsys.readouterr()
    assert rc == 1
    assert "row_gather_diag [torch]" in out.err and "WRONG" in out.err
    rows = json.loads((tmp_path / "results.json").read_text())["suites"]["kernels"]
    assert {r["op"] for r in rows if r.get("ok") is False} == {"row_gather_diag"}


def test_cli_overhead_kernels_summary_renders_markdown(tmp_path, capsys):
    assert main(["--suite", "overhead,kernels", "--sizes", "tiny", "--device", "cpu", "--repeats", "3",
                 "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "overhead PEFT LoRA r=8: " in out and "kernels sampled_dot_diag [torch] in=64 m=8" in out
    assert main(["--summarize", str(tmp_path / "results.json"), "--markdown"]) == 0
    md = capsys.readouterr().out
    assert "| PEFT FRoD + frod_kernels.peft.accelerate |" in md and "| row_gather_diag | 64 | 8 |" in md
    # a markdown table ends at a blank line: the note after the kernels table must not join it
    assert "|\n\nnot timed: " in md and "not timed: triton" in md


def test_cli_markdown_needs_summarize(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--markdown", "--sizes", "tiny"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--markdown" in err and "--summarize" in err


def test_cli_version(capsys):
    import frod_kernels

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and frod_kernels.__version__ in capsys.readouterr().out


def test_init_command_line_runs_each_method_in_its_own_process(tmp_path):
    """A cached setup in a process of its own reads what another process wrote: bitwise the same tensors."""
    rows = init.run_methods([("frod_kernels", "cpu"), ("frod_kernels_cached", "cpu")], 64, 2, isolate=True)
    exact, cached = rows
    for r in rows:
        assert "error" not in r, r
        assert r["median_ms"] > 0 and r["peak_extra_bytes"] > 0 and r["reconstruction_max_rel"] <= 1e-5
    assert cached["bitwise_same_as_first"] is True and cached["first_setup_ms"] > 0 and cached["cache_bytes"] > 0


def test_cache_list_shows_whole_file_names(tmp_path, capsys):
    from frod_kernels.cache import entries
    from frod_kernels.cache.__main__ import main as cache_main
    from frod_kernels.projections import build_projections

    cache = tmp_path / "cache"
    build_projections({f"model.layers.{i}.self_attn.q_proj": torch.randn(16, 16) for i in range(2)},
                      cache=cache, progressbar=False)
    assert cache_main(["--dir", str(cache), "list"]) == 0
    out = capsys.readouterr().out
    names = [r["file"] for r in entries(cache)]
    assert names and all(len(n) > 60 for n in names)
    for name in names:
        assert name in out.split()  # whole, a word of its own: it can be copied


def test_overhead_suite_reports_a_failing_method_and_times_the_others(monkeypatch):
    build = overhead._steps

    def with_a_broken_method(device):
        steps, before, cleanup = build(device)

        def broken():
            raise RuntimeError("deliberately broken")

        steps[overhead.FROD_LINEAR] = broken
        return steps, before, cleanup

    monkeypatch.setattr(overhead, "_steps", with_a_broken_method)
    rows = {r["method"]: r for r in overhead.run(TINY, CPU, Quiet())}
    assert "deliberately broken" in rows[overhead.FROD_LINEAR]["error"]
    assert "median_ms" not in rows[overhead.FROD_LINEAR]
    assert all(r["median_ms"] > 0 for m, r in rows.items() if m != overhead.FROD_LINEAR)
