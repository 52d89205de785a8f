"""Kernels suite: each kernel-family op (docs/DESIGN.md section 6) on every backend that can run here, side by side,
at the engine's shapes, each result checked against its float64 twin (:mod:`frod_kernels.reference`).

* ``frod::row_gather_diag``: ``out[r] = diag[r] A[r] + sum_k weights[k] A[src[k]]``, A (in x m): the few-token
  forward and backward (m = tokens) and the full-rank update (m = out, A = U^T).
* ``frod::sampled_dot_diag``: ``<P[a_k], Q[src[k]]>`` per nonzero and ``<P[j], Q[j]>`` per row: dS and dlambda
  (m = tokens, or m = out with P = U^T on the materialized path).

The pattern is PEFT's kind (random, off-diagonal, unsorted) at 1% density, grouped by
:func:`frod_kernels.layout.build_layout`. A case's operand layout is rows contiguous, or a U^T view
(:data:`.sizes.U_T`). Backends are timed in interleaved rounds; on a GPU each call is timed with CUDA events behind
a spin kernel, so the events see the kernel and not the host's launch. Effective bandwidth counts compulsory bytes:
every operand read once and every result written once (:func:`compulsory_bytes`); on a GPU it is also given as a
fraction of the device's measured copy bandwidth. A result outside the docs/DESIGN.md section 5 tolerance marks its row
WRONG and makes frod-bench exit 1.
"""

from __future__ import annotations

import os

import torch

import frod_kernels as fk
from frod_kernels.layout import build_layout
from frod_kernels.reference import (
    reference_row_gather_diag,
    reference_sampled_dot_diag,
    rel_err,
)

from .._numerics import dtype_name
from .check import random_pattern, tolerance
from .common import busy_gpu, measure_interleaved
from .layer import backend_plan
from .sizes import U_T, Sizes

OPS = ("row_gather_diag", "sampled_dot_diag")
DENSITY = 0.01
# A spin of about 0.5 ms at 2 GHz ahead of each timed call: longer than the host takes to launch one op.
SPIN_CYCLES = 1_000_000
# Float64 twin's working set: it gathers nnz x m operands, so it runs over column blocks of at most this many
# elements (256 MiB) each; both ops are sums over columns, exact in float64 whatever the blocking.
REFERENCE_BLOCK = 1 << 25


def n_steps(sizes: Sizes, device: torch.device) -> int:
    return len(sizes.kernel_cases) * len(OPS)


def _problem(n: int, m: int, layout: str, dtype: torch.dtype, device: torch.device, seed: int) -> dict:
    """Random operands of one case, never zeros: the layout, a dense operand per the case's layout, a second
    rows-contiguous one, and float32 diag and weights (as lambda_l and s_values are)."""
    gen = torch.Generator().manual_seed(seed)
    s_indices = random_pattern(n, DENSITY, gen)
    nnz = s_indices.shape[1]
    lay = build_layout(s_indices.to(device), n)
    # U^T: the transposed view of a row-major (m x n) U, one element per row apart
    first = (torch.randn(m, n, generator=gen).t() if layout == U_T else torch.randn(n, m, generator=gen))
    return {"nnz": nnz, "ptr": lay.row_ptr, "src": lay.row_src, "A": first.to(device, dtype),
            "Q": torch.randn(n, m, generator=gen).to(device, dtype),
            "diag": (0.5 + torch.rand(n, generator=gen)).to(device),
            "weights": (0.3 * torch.randn(nnz, generator=gen)).to(device)}


def compulsory_bytes(n: int, m: int, nnz: int, dtype: torch.dtype) -> int:
    """Bytes either op must move at the least, the same count for both: two (n x m) operands of ``dtype`` (the row
    gather reads A and writes its result, the sampled dot reads P and Q), n and nnz float32 values (diag and
    weights read, or diag and vals written), and the int64 group offsets (n + 1) and sources (nnz) read once."""
    return 2 * n * m * torch.empty(0, dtype=dtype).element_size() + 4 * (n + nnz) + 8 * (n + 1 + nnz)


def _call(op: str, p: dict):
    if op == "row_gather_diag":
        return torch.ops.frod.row_gather_diag(p["A"], p["diag"], p["weights"], p["ptr"], p["src"])
    return torch.ops.frod.sampled_dot_diag(p["A"], p["Q"], p["ptr"], p["src"])


def _reference(op: str, p: dict) -> list[torch.Tensor]:
    """The float64 twin's results, column block by column block (:data:`REFERENCE_BLOCK`)."""
    m = p["A"].shape[1]
    step = max(1, REFERENCE_BLOCK // max(1, p["nnz"]))
    if op == "row_gather_diag":
        return [torch.cat([reference_row_gather_diag(p["A"][:, j:j + step], p["diag"], p["weights"], p["ptr"],
                                                     p["src"]) for j in range(0, max(m, 1), step)], dim=1)]
    parts = [reference_sampled_dot_diag(p["A"][:, j:j + step], p["Q"][:, j:j + step], p["ptr"], p["src"])
             for j in range(0, max(m, 1), step)]
    return [sum(v for v, _ in parts), sum(d for _, d in parts)]


def run(sizes: Sizes, device: torch.device, progress, copy_bytes_per_s: float | None = None) -> list[dict]:
    """One row per (case, op, backend); ``copy_bytes_per_s``: the device's measured copy bandwidth, if known."""
    plan = backend_plan(device)
    timed = [b for b, why in plan.items() if why is None]
    spin = busy_gpu(device, SPIN_CYCLES)
    rows = []
    for n, m, layout in sizes.kernel_cases:
        # fresh data every run, its seed in each row
        seed = int.from_bytes(os.urandom(4), "little") >> 1
        p = _problem(n, m, layout, sizes.dtype, device, seed)
        for op in OPS:
            progress.start(f"kernels {op} in={n} m={m} {layout}")
            base = {"suite": "kernels", "op": op, "n": n, "m": m, "nnz": p["nnz"], "layout": layout,
                    "dtype": dtype_name(sizes.dtype), "seed": seed,
                    "bytes": compulsory_bytes(n, m, p["nnz"], sizes.dtype)}
            group = {b: dict(base, backend=b) for b in plan}
            ref = _reference(op, p)
            fns = {}
            for b in timed:
                row = group[b]
                row["tolerance"] = tolerance(sizes.dtype, device, b)
                try:
                    with fk.use_backend(b):
                        out = _call(op, p)  # untimed: compiles and tunes, and is the result checked
                    out = [out] if isinstance(out, torch.Tensor) else list(out)
                    row["rel_err"] = max(rel_err(a, r) for a, r in zip(out, ref))
                    row["ok"] = row["rel_err"] <= row["tolerance"]
                    fns[b] = lambda: _call(op, p)
                except Exception as e:  # reported in its row; the other backends still run
                    row["ok"] = False
                    row["error"] = f"{type(e).__name__}: {e}"
            for b, why in plan.items():
                if why is not None:
                    group[b]["skipped"] = why
            # each backend selected before its calls, untimed; the caller's selection is back after
            with fk.use_backend(fk.get_backend()):
                times = measure_interleaved(fns, device, sizes.repeats, sizes.warmup,
                                            before={b: _select(b, spin) for b in fns})
            for b, stats in times.items():
                row = group[b]
                row.update(stats)
                row["bytes_per_s"] = row["bytes"] / (row["median_ms"] * 1e-3)
                if copy_bytes_per_s:
                    row["frac_of_copy_bandwidth"] = row["bytes_per_s"] / copy_bytes_per_s
            torch_ms = group.get("torch", {}).get("median_ms")
            for row in group.values():
                if torch_ms and row.get("median_ms"):
                    row["speedup_vs_torch"] = torch_ms / row["median_ms"]
                if not (row.get("skipped") and rows):  # why a backend is not timed, said once
                    progress.done(row)
                rows.append(row)
    return rows


def _select(backend: str, spin):
    def before() -> None:
        fk.set_backend(backend)
        if spin is not None:
            spin()

    return before
