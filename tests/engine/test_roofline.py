"""The engine on paper (frod_kernels.roofline) against the engine itself: the GEMMs a path's step list names are
the GEMMs the engine runs (counted by torch's FlopCounterMode), the sparse steps are the kernel-family calls it
makes, and their bytes are the rows those calls load, counted by walking each call's real pattern layout; the
floors behave as a roofline must; frod-bench attaches them to GPU rows."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from frod_kernels import cost_model, engine, roofline
from frod_kernels.bench.layer import LINEAR, LORA, PEFT_FROD, add_floors, frod_method
from frod_kernels.layout import pattern_layout
from conftest import random_problem


def _engine_step(path, n_in, n_out, b, monkeypatch):
    """Runs one forward and backward of ``path`` through the engine on the CPU; returns the roofline's steps for it,
    the FLOPs torch counted, and every kernel-family call as (op name, its arguments)."""
    x, V, U, lam, s, si, bias = random_problem(n_in, n_out, 70, lead=(b,), bias=False)
    lay = pattern_layout(si, n_in)
    calls = []
    k = _spy(calls)
    keep = cost_model.KEEP_MATERIALIZED_WEIGHT.get("cpu", False)
    with FlopCounterMode(display=False) as counter:
        y, saved = engine.forward(x, V, U, lam, s, lay, None, path, keep, k)
        engine.backward(torch.randn_like(y), x, saved, V, U, lam, s, lay, path, True, True, True, k)
    steps = roofline.path_steps(path, b, n_in, n_out, si.shape[1], "float32", training=True, keep_weight=keep)
    return steps, counter.get_total_flops(), calls


def _is_family(step):
    return "row_gather" in step.name or "sampled_dot" in step.name


@pytest.mark.parametrize("path", engine.KERNEL_PATHS)
@pytest.mark.parametrize("n_in,n_out,b", [(48, 40, 9), (24, 56, 33)])
def test_gemm_flops_and_kernel_calls_are_the_engines(path, n_in, n_out, b, monkeypatch):
    steps, flops, calls = _engine_step(path, n_in, n_out, b, monkeypatch)
    assert sum(st.flops for st in steps if not _is_family(st)) == flops
    named = [("row_gather_diag" if "row_gather" in st.name else "sampled_dot_diag") for st in steps if _is_family(st)]
    assert named == [op for op, _ in calls]


def _rows_loaded(op, args):
    """What one kernel-family call loads and writes, from its real operands: walks the grouped pattern as the kernels
    do (output row r reads its own row, then one source row per nonzero of group r; a sampled dot keeps P's row and
    reads Q's row r and one Q row per nonzero). Returns (bytes loaded, compulsory bytes)."""
    ptr, src = args[-2].tolist(), args[-1].tolist()
    operand = args[0]
    n, m, e = operand.shape[0], operand.shape[1], operand.element_size()
    a_loads, q_loads, a_rows, q_rows = 0, 0, set(), set()
    for r in range(n):
        group = src[ptr[r]:ptr[r + 1]]
        if op == "row_gather_diag":
            a_loads += 1 + len(group)
            a_rows.update([r, *group])
        else:
            a_loads += 1
            a_rows.add(r)
            q_loads += 1 + len(group)
            q_rows.update([r, *group])
    index = sum(t.numel() * 8 for t in args[-2:])  # ptr and src, int64
    if op == "row_gather_diag":
        index += sum(t.numel() * 4 for t in args[1:3])  # diag and weights, float32 on the device
        written = n * m * e
    else:
        written = (n + len(src)) * 4  # dS and dlambda in float32
    row_bytes = m * e
    return ((a_loads + q_loads) * row_bytes + index,
            (len(a_rows) + len(q_rows)) * row_bytes + index + written)


@pytest.mark.parametrize("path", engine.KERNEL_PATHS)
@pytest.mark.parametrize("n_in,n_out,b", [(48, 40, 9), (24, 56, 33)])
def test_family_bytes_are_the_rows_the_kernels_load(path, n_in, n_out, b, monkeypatch):
    steps, _, calls = _engine_step(path, n_in, n_out, b, monkeypatch)
    family = [st for st in steps if _is_family(st)]
    assert len(family) == len(calls)
    for step, (op, args) in zip(family, calls):
        loaded, compulsory = _rows_loaded(op, args)
        assert (step.l2_bytes, step.bytes) == (loaded, compulsory), step.name


def _spy(calls) -> engine.Kernels:
    """The engine's kernels, recording each kernel-family call (op name, its arguments) and running the real op."""
    def recording(op):
        def call(*args):
            calls.append((op, args))
            return getattr(torch.ops.frod, op)(*args)
        return call

    return engine.Kernels(recording("row_gather_diag"), recording("sampled_dot_diag"))


def test_floors_are_rooflines():
    gpu = roofline.H200
    big = roofline.path_steps(engine.MATERIALIZED, 16384, 4096, 4096, 167772, "bfloat16")
    # a large GEMM is compute-bound; the kernel families re-read their operand's rows from L2, 42 per output row
    # at 1 % of 4096, about 21 times their compulsory bytes, so L2 bounds them, not HBM
    for s in big:
        assert s.bound(gpu, "bfloat16") == ("l2" if _is_family(s) else "compute"), s.name
        assert s.floor_s(gpu, "bfloat16") == max(s.times_s(gpu, "bfloat16").values())
        if _is_family(s):
            assert 20 < s.l2_bytes / s.bytes < 22, s.name
    best, ms = roofline.frod_floor(16384, 4096, 4096, 167772, gpu)
    assert ms == min(roofline.floor_ms(roofline.path_steps(p, 16384, 4096, 4096, 167772), gpu, "bfloat16")
                     for p in engine.KERNEL_PATHS)
    # nothing FRoD does beats the frozen layer's forward and input gradient
    assert ms > roofline.floor_ms(roofline.linear_steps(16384, 4096, 4096), gpu, "bfloat16")
    assert best in engine.KERNEL_PATH_NAMES.values()


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


def test_summary_bolds_the_best_path_of_each_shape(capsys):
    assert roofline.main(["--summary", "--markdown", "--shapes", "4096x4096:16384,1024x1024:64"]) == 0
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith("| 4096 ×")
            or line.startswith("| 1024 ×")]
    assert len(rows) == 2
    for row, (n, b) in zip(rows, [(4096, 16384), (1024, 64)]):
        best, ms = roofline.frod_floor(b, n, n, int(n * n * 0.01), roofline.H200)
        linear = roofline.floor_ms(roofline.linear_steps(b, n, n), roofline.H200, "bfloat16")
        bold = [name for name, cell in zip(engine.KERNEL_PATH_NAMES.values(), row[1:4]) if cell.startswith("**")]
        assert bold == [best] and row[5] == f"{ms / linear:.2f}× |"
