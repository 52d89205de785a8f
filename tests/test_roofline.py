"""The engine on paper (frod_kernels.roofline) against the engine itself: the GEMMs a path's step list names are
the GEMMs the engine runs (counted by torch's FlopCounterMode), and the sparse steps are the kernel-family calls
it makes; the floors behave as a roofline must; frod-bench attaches them to GPU rows."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from frod_kernels import cost_model, engine, roofline
from frod_kernels.bench.layer import LINEAR, LORA, PEFT_FROD, add_floors, frod_method
from frod_kernels.layout import pattern_layout
from conftest import random_problem


@pytest.mark.parametrize("path", list(engine.PATH_NAMES))
@pytest.mark.parametrize("n_in,n_out,b", [(48, 40, 9), (24, 56, 33)])
def test_gemm_flops_and_kernel_calls_are_the_engines(path, n_in, n_out, b, monkeypatch):
    x, V, U, lam, s, si, bias = random_problem(n_in, n_out, 70, lead=(b,), bias=False)
    lay = pattern_layout(si, n_in)
    calls = []
    k = _spy(calls)
    keep = cost_model.KEEP_MATERIALIZED_WEIGHT.get("cpu", False)
    with FlopCounterMode(display=False) as counter:
        y, saved = engine.forward(x, V, U, lam, s, lay, None, path, keep, k)
        engine.backward(torch.randn_like(y), x, saved, V, U, lam, s, lay, path, True, True, True, k)
    steps = roofline.path_steps(path, b, n_in, n_out, si.shape[1], "float32", training=True, keep_weight=keep)
    gemms = [st for st in steps if "row_gather" not in st.name and "sampled_dot" not in st.name]
    assert sum(st.flops for st in gemms) == counter.get_total_flops()
    named = [("row_gather_diag" if "row_gather" in st.name else "sampled_dot_diag") for st in steps
             if st not in gemms]
    assert sorted(named) == sorted(calls)


def _spy(calls) -> engine.Kernels:
    """The engine's kernels, recording each kernel-family call before running the real op."""
    def recording(op):
        def call(*args):
            calls.append(op)
            return getattr(torch.ops.frod, op)(*args)
        return call

    return engine.Kernels(recording("row_gather_diag"), recording("sampled_dot_diag"))


def test_floors_are_rooflines():
    gpu = roofline.H200
    big = roofline.path_steps(engine.MATERIALIZED, 16384, 4096, 4096, 167772, "bfloat16")
    # a large GEMM is compute-bound, the kernel families memory-bound
    for s in big:
        compute = s.flops / gpu.peak_flops["bfloat16"] > s.bytes / gpu.bandwidth
        assert compute == ("row_gather" not in s.name and "sampled_dot" not in s.name), s.name
    best, ms = roofline.frod_floor(16384, 4096, 4096, 167772, gpu)
    assert ms == min(roofline.floor_ms(roofline.path_steps(p, 16384, 4096, 4096, 167772), gpu, "bfloat16")
                     for p in engine.PATH_NAMES)
    # nothing FRoD does beats the frozen layer's forward and input gradient
    assert ms > roofline.floor_ms(roofline.linear_steps(16384, 4096, 4096), gpu, "bfloat16")
    assert best in engine.PATH_NAMES.values()


def test_bench_rows_get_their_floor():
    rows = [dict(method=m, n_in=64, n_out=32, tokens=128, dtype="bfloat16", median_ms=2.0, path=p)
            for m, p in ((frod_method("cuda"), "sparse"), (PEFT_FROD, None), (LORA, None), (LINEAR, None))]
    add_floors(rows, roofline.H200, nnz=40)
    for r in rows:
        assert 0 < r["frac_of_floor"] < 1 and r["floor_ms"] == pytest.approx(2.0 * r["frac_of_floor"])
    ours, peft, lora, linear = rows
    assert ours["floor_ms"] == peft["floor_ms"] and ours["path_floor_ms"] >= ours["floor_ms"]
    assert linear["floor_ms"] < lora["floor_ms"] and "path_floor_ms" not in peft


def test_gpu_table_shows_the_floors_and_the_bandwidth_is_measured():
    from frod_kernels.bench.common import copy_bandwidth
    from frod_kernels.bench.report import layer_table

    rows = [dict(method=frod_method("cuda"), n_in=64, n_out=32, tokens=128, dtype="bfloat16", median_ms=2.0,
                 path="sparse")]
    add_floors(rows, roofline.H200, nnz=40)
    table = layer_table(rows, gpu=True)
    assert "% of floor" in table and "% of path floor" in table
    assert f"{100 * rows[0]['frac_of_floor']:.1f}%" in table
    assert copy_bandwidth(torch.device("cpu"))["bytes_per_s"] > 0
