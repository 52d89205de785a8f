"""frod-bench: the check suite catches a wrong backend, the CLI writes readable results, and bench/gpu_check.sh
dry-runs on the CPU. Tiny sizes only; speed is measured by frod-bench, never asserted here. The overhead and
kernels suites and the command-line details: tests/benchmarks/test_bench_suites.py."""

import contextlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import frod_kernels as fk
from frod_kernels import engine, registry
from frod_kernels.bench import check
from frod_kernels.bench.__main__ import main
from frod_kernels.bench.common import Quiet, measure_peak_memory
from frod_kernels.bench.sizes import PRESETS
from frod_kernels.reference import TOLERANCE

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = PRESETS["tiny"]
CPU = torch.device("cpu")


def test_check_passes_every_backend_and_path_on_cpu():
    rows = check.run(TINY, CPU, Quiet())
    # Triton joins under TRITON_INTERPRET=1 (tests/backends/test_triton_backend.py sets it for the session).
    assert {f"torch/{p}" for p in engine.KERNEL_PATH_NAMES.values()} | {"dense"} <= {r["candidate"] for r in rows}
    for r in rows:
        assert r["ok"] and set(r["rel_err"]) == set(check.TENSORS)
        assert max(r["rel_err"].values()) <= TOLERANCE[torch.float32]


def _wrong_output(x, V, U, lambda_l, s_values, s_indices, bias):
    return fk.frod_linear(x, V, U, lambda_l, s_values, s_indices, bias) * (1 + 1e-3)


def _wrong_ds(x, V, U, lambda_l, s_values, s_indices, bias):
    # Same forward values; the gradient reaching s_values is halved.
    s_half_grad = s_values.detach() + 0.5 * (s_values - s_values.detach())
    return fk.frod_linear(x, V, U, lambda_l, s_half_grad, s_indices, bias)


@pytest.mark.parametrize("fn, tensor", [(_wrong_output, "y"), (_wrong_ds, "ds_values")])
def test_check_fails_on_a_wrong_candidate(fn, tensor):
    good = ("torch/factored", check.backend_candidates(CPU)[1][1])
    with pytest.raises(check.CheckFailed) as info:
        check.run(TINY, CPU, Quiet(), candidates=[good, ("deliberately-wrong", fn)])
    failing = {(f["candidate"], f["tensor"]) for f in info.value.failures}
    assert ("deliberately-wrong", tensor) in failing
    assert all(name == "deliberately-wrong" for name, _ in failing)
    assert "deliberately-wrong" in str(info.value) and tensor in str(info.value)
    assert all(r["ok"] for r in info.value.rows if r["candidate"] == "torch/factored")


_REAL = {}  # the real torch twins, while a wrong one stands in for them


def _bad_row_gather(A, diag, weights, ptr, src):
    out = _REAL["row_gather_diag"](A, diag, weights, ptr, src)
    return out * 1.01


def _bad_sampled_dot(P, Q, ptr, src):
    vals, diag = _REAL["sampled_dot_diag"](P, Q, ptr, src)
    return vals.flip(0), diag


@pytest.mark.parametrize("op, bad", [("row_gather_diag", _bad_row_gather), ("sampled_dot_diag", _bad_sampled_dot)])
def test_cli_check_exits_nonzero_naming_a_wrong_registered_backend(op, bad, monkeypatch, capsys, tmp_path):
    with registry.scoped():
        monkeypatch.setitem(_REAL, op, registry.impls(op)["torch"])
        registry.register_impl(op, "torch")(bad)
        rc = main(["--suite", "check", "--sizes", "tiny", "--device", "cpu", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 1
    assert "check FAILED" in err and "torch/" in err
    saved = json.loads((tmp_path / "results.json").read_text())
    assert not all(r["ok"] for r in saved["suites"]["check"])


def test_cli_writes_results_plots_and_summary(tmp_path, capsys):
    rc = main(["--suite", "layer,train,init", "--sizes", "tiny", "--device", "cpu", "--repeats", "2",
               "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    res = json.loads((tmp_path / "results.json").read_text())
    env = res["environment"]
    for key in ("date", "command", "device_name", "cpu_model", "cpu_cores"):
        assert env[key]
    assert env["versions"]["torch"] == torch.__version__ and env["versions"]["peft"]
    assert "--sizes tiny" in env["command"]

    layer = res["suites"]["layer"]
    methods = {r["method"] for r in layer}
    assert {"frod_linear [torch]", "PEFT FRoD", "PEFT LoRA r=32", "frozen nn.Linear"} <= methods
    assert len(layer) == len(methods) * len(TINY.layer_tokens)
    for r in layer:
        assert "error" not in r, r
        assert r["repeats"] == len(r["samples_ms"]) == 2 and min(r["samples_ms"]) > 0
        # the statistics are those of the recorded samples (numpy's interpolation, not the suite's code)
        q1, median, q3 = np.percentile(r["samples_ms"], [25, 50, 75])
        assert (r["q1_ms"], r["median_ms"], r["q3_ms"]) == pytest.approx((q1, median, q3))
        assert r["peak_mem_bytes"] > 0
        assert r["tokens_per_s"] == pytest.approx(r["tokens"] / (r["median_ms"] * 1e-3))
    peft = [r for r in layer if r["method"] == "PEFT FRoD"]
    assert all(r["speedup_vs_peft_frod"] == pytest.approx(1.0) for r in peft)

    train = {r["method"]: r for r in res["suites"]["train"]}
    for name in ("PEFT LoRA r=32", "PEFT FRoD"):
        assert train[name]["median_ms"] > 0 and train[name]["peak_mem_bytes"] > train[name]["resident_bytes"] > 0
    assert train["PEFT FRoD"]["v_bytes"] > 0
    accel = train["PEFT FRoD + frod_kernels.peft.accelerate"]
    # peft is a dependency, so frod_kernels.peft imports here: a "skipped" row would be a broken import
    assert accel.get("median_ms", 0) > 0, accel
    init = {r["method"]: r for r in res["suites"]["init"]}
    assert init["PEFT get_peft_model(FrodConfig)"]["median_ms"] > 0
    for name in ("PEFT get_peft_model + frod_kernels.peft.enable()", "frod_kernels build_projections (cpu)"):
        r = init[name]
        # The CPU route reproduces PEFT's projections to rounding (frod_kernels/projections.py).
        assert r.get("median_ms", 0) > 0 and r["same_pattern"], r
        assert max(r[k] for k in ("rel_diff_V", "rel_diff_U", "rel_diff_lambda_l")) <= 1e-6, r
    # The fast route's V is not PEFT's tensor (tests/projections/test_fast_projections.py holds it to a float64
    # reference); its row must still time it, keep the pattern and rebuild the weights.
    fast = init["frod_kernels build_projections (cpu, fast)"]
    assert fast["median_ms"] > 0 and fast["same_pattern"] and fast["reconstruction_max_rel"] <= 1e-5, fast
    # A second setup from the projection cache: bitwise the first (cache-filling) setup's tensors, and PEFT's.
    for name in ("PEFT get_peft_model + frod_kernels.peft.enable(), cached",
                 "frod_kernels build_projections (cpu, cached)"):
        r = init[name]
        assert r.get("median_ms", 0) > 0 and r["bitwise_same_as_first"] is True and r["same_pattern"], r
        assert r["V_bitwise"] and r["U_bitwise"] and r["cache_bytes"] > 0 and r["first_setup_ms"] > 0, r
    assert "bitwise_same_as_first" not in init["frod_kernels build_projections (cpu)"]

    for name in ("layer_96x80_float32.png", "train.png", "init.png"):
        png = (tmp_path / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    # wide enough for the method names and the title (it was 660 px, the title clipped)
    assert int.from_bytes((tmp_path / "init.png").read_bytes()[16:20], "big") >= 1000
    assert "== layer ==" in out and "PEFT FRoD" in out
    # each row is printed as it finishes, before its suite's table
    first_row = out.index("layer 96->80 b=1 float32 frod_linear [torch]: ")
    assert first_row < out.index("speedup vs PEFT FRoD") and "init PEFT get_peft_model(FrodConfig): " in out

    assert main(["--summarize", str(tmp_path / "results.json")]) == 0
    assert "layer 96->80, 33 tokens" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["--suite", "bogus"], ["--shapes", "12"], ["--tokens", "0"], ["--repeats", "0"]])
def test_cli_rejects_bad_arguments(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv + ["--sizes", "tiny"])
    assert info.value.code == 2
    assert argv[0] in capsys.readouterr().err


def test_cpu_peak_memory_counts_a_known_allocation():
    n = 1 << 20  # 4 MiB of float32

    def fn():
        a = torch.ones(n)
        b = a + 1  # both alive: 8 MiB at the peak
        return float(b[0])

    fn()
    peak = measure_peak_memory(fn, CPU)
    assert 8 * 2**20 <= peak < 9 * 2**20


def test_gpu_check_dry_run(tmp_path):
    env = dict(os.environ, GPU_CHECK_DRY_RUN="1", OUT=str(tmp_path), PYTHON=sys.executable)
    proc = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_check.sh")], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    steps = dict(line.split("\t")[:2] for line in (tmp_path / "steps.tsv").read_text().splitlines())
    assert steps == {"install-peft": "skipped (dry run)", "build": "skipped (dry run)", "tests": "0", "host": "0",
                     "init-8b": "0", "bench": "0"}
    init = json.loads((tmp_path / "init-8b-gpu.json").read_text())
    [row] = init["suites"]["init"]
    assert row["key"] == "frod_kernels" and row["median_ms"] > 0 and row["peak_extra_bytes"] > 0
    assert "rel_diff_V" not in row  # one method: nothing to compare with
    host = json.loads((tmp_path / "host" / "results.json").read_text())
    assert set(host["suites"]) == {"overhead", "kernels"}
    res = json.loads((tmp_path / "results.json").read_text())
    assert set(res["suites"]) == {"check", "layer", "train", "init"}
    assert all(r["ok"] for r in res["suites"]["check"])
    # The short tables come last.
    tail = proc.stdout.split("== steps")[-1]
    assert "check: all passed" in tail and "host overhead: forward+backward" in tail


@pytest.mark.parametrize("fast", [False, True])
def test_layer_suite_methods_share_the_peft_frod_weights(fast):
    from torch import nn

    from frod_kernels.bench import peft_models
    from frod_kernels.reference import rel_err

    base = nn.Linear(48, 40, bias=False).requires_grad_(False)
    # fast_projections is what the layer suite uses on a GPU; here it runs on the CPU.
    with peft_models.fast_projections(CPU) if fast else contextlib.nullcontext():
        _, layer = peft_models.peft_frod_linear(base)
    t = peft_models.frod_tensors(layer)
    assert (t["s_values"] != 0).all()
    x = torch.randn(5, 48)
    with torch.no_grad():
        y_peft = layer(x)
        y_fk = fk.frod_linear(x, t["V"], t["U"], t["lambda_l"], t["s_values"], t["s_indices"])
        y_base = base(x)
    assert rel_err(y_fk, y_peft) <= TOLERANCE[torch.float32]
    # U and lambda are consistent with V: with S zeroed the adapted layer is the base layer.
    zero_s = torch.zeros_like(t["s_values"])
    y0 = fk.frod_linear(x, t["V"], t["U"], t["lambda_l"], zero_s, t["s_indices"])
    assert rel_err(y0, y_base) <= 1e-4


def test_targets_read_off_the_results():
    from frod_kernels.bench.report import targets

    def row(method, tokens, ms, speedup=None, vs_lora=None):
        return {"method": method, "n_in": 1024, "n_out": 1024, "dtype": "float32", "tokens": tokens, "median_ms": ms,
                "speedup_vs_peft_frod": speedup, "time_vs_lora": vs_lora}

    results = {"environment": {"device": "cpu"}, "suites": {"layer": [
        row("frod_linear [torch]", 2048, 100.0, 3.0, 2.5),
        row("frod_linear [torch/sparse]", 2048, 900.0, 0.3, 9.0),  # forced paths are not judged
        row("frod_linear [torch]", 8, 5.0, 0.9, 4.0),
    ]}}
    lines = targets(results)
    assert len(lines) == 3
    assert lines[0].startswith("met") and "3.00x" in lines[0]
    assert lines[1].startswith("MISSED") and "2.50x" in lines[1]
    assert lines[2].startswith("MISSED") and "8 tokens" in lines[2] and ">= 5x" in lines[2]
    results["suites"]["layer"][2]["speedup_vs_peft_frod"] = 5.0
    assert targets(results)[2].startswith("met")
    # where a run timed "auto" (the default; the CPU's layer suite does), that row alone is judged
    results["suites"]["layer"].append(row("frod_linear [auto]", 8, 6.0, 4.0, 4.5))
    lines = targets(results)
    assert len(lines) == 3 and "[torch]" in lines[0] and "[torch]" not in lines[2]
    assert lines[2].startswith("MISSED") and "frod_linear [auto]" in lines[2] and "4.00x" in lines[2]

    def train(hidden, layers):
        common = {"hidden_size": hidden, "num_hidden_layers": layers, "dtype": "bfloat16"}
        return [dict(common, method="PEFT LoRA r=32", median_ms=100.0, peak_mem_bytes=1000),
                dict(common, method="PEFT FRoD + frod_kernels.peft.accelerate", median_ms=120.0, time_vs_lora=1.2,
                     speedup_vs_peft_frod=2.0, peak_mem_bytes=1100, v_bytes=50)]

    results["suites"] = {"train": train(64, 2)}
    assert targets(results) == []  # the train aims are for the ~1B model only
    results["suites"] = {"train": train(2048, 16)}
    lines = targets(results)
    assert [line.split()[0] for line in lines] == ["met", "met", "MISSED"]
    assert "1.05x" in lines[2]  # 1100 / (1000 + 50)


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_check_passes_every_backend_and_path_on_gpu(dtype):
    import dataclasses

    rows = check.run(dataclasses.replace(TINY, dtype=dtype), torch.device("cuda"), Quiet())
    assert {f"torch/{p}" for p in engine.KERNEL_PATH_NAMES.values()} | {"dense"} <= {r["candidate"] for r in rows}
    assert all(r["ok"] for r in rows)


@needs_gpu
def test_cli_all_suites_on_gpu(tmp_path, capsys):
    # The CUDA-only code (events, allocator counters, fast projections on the device) before gpu_check.sh's
    # full run depends on it.
    rc = main(["--sizes", "tiny", "--device", "cuda", "--dtype", "bf16", "--all-paths", "--repeats", "2",
               "--out", str(tmp_path)])
    assert rc == 0, capsys.readouterr()
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["environment"]["device_name"] == torch.cuda.get_device_name()
    for r in res["suites"]["layer"]:
        assert r["median_ms"] > 0 and r["peak_mem_bytes"] > 0 and 0 < r["frac_of_peak"] < 1.5
