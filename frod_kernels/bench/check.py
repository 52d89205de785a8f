"""Check suite: every backend's output and gradients against the float64 reference, on the benchmark's shapes.

A fast wrong kernel must not hide in the timing table: each candidate (a backend under each forced path, or any
callable passed in) computes ``y`` and the gradients of ``x``, ``lambda_l``, ``s_values`` and ``bias`` on fresh
random data, and each is compared with :func:`frod_kernels.reference.reference_grads` by relative error against
the tolerances of docs/DESIGN.md section 5. :func:`run` raises :class:`CheckFailed`, naming every failing
backend/path/tensor, after checking them all.
"""

from __future__ import annotations

import os
from typing import Callable, Optional

import torch

import frod_kernels as fk
from frod_kernels import engine
from frod_kernels.reference import TOLERANCE, TOLERANCE_TF32, reference_grads, rel_err

from .._numerics import dtype_name
from .layer import runnable_backends
from .sizes import Sizes

TENSORS = ("y", "dx", "dlambda_l", "ds_values", "dbias")

# A candidate computes y = frod_linear(x, V, U, lambda_l, s_values, s_indices, bias) differentiably.
Candidate = Callable[..., torch.Tensor]


class CheckFailed(RuntimeError):
    def __init__(self, failures: list[dict], rows: list[dict]):
        self.failures, self.rows = failures, rows
        lines = [f"{f['candidate']} {f['n_in']}x{f['n_out']} b={f['tokens']} {f['dtype']}: {f['tensor']} rel err "
                 f"{f['rel_err']:.3g} > tolerance {f['tolerance']:.3g}" if f.get("rel_err") is not None else
                 f"{f['candidate']} {f['n_in']}x{f['n_out']} b={f['tokens']} {f['dtype']}: {f['error']}"
                 for f in failures]
        super().__init__("frod-bench check FAILED (output or gradients outside the docs/DESIGN.md section 5 tolerance):"
                         "\n  " + "\n  ".join(lines))


def backend_candidates(device: torch.device) -> list[tuple[str, Candidate]]:
    """``("<backend>/<path>", fn)`` for each backend that can run on ``device`` and each path that runs the kernel
    families, and ``("dense", fn)`` once: the dense path runs no backend's kernels, so it is the same under all."""
    def make(backend, path):
        def fn(x, V, U, lambda_l, s_values, s_indices, bias):
            with fk.use_backend(backend):
                return fk.frod_linear(x, V, U, lambda_l, s_values, s_indices, bias, path=path)
        fn.backend = backend
        return fn
    return [(f"{b}/{p}", make(b, p)) for b in runnable_backends(device) for p in engine.KERNEL_PATH_NAMES.values()] \
        + [(engine.PATH_NAMES[engine.DENSE], make("torch", engine.PATH_NAMES[engine.DENSE]))]


def n_steps(sizes: Sizes, device: torch.device, candidates=None) -> int:
    n = len(candidates) if candidates is not None else len(backend_candidates(device))
    return len(sizes.layer_shapes) * len(sizes.check_tokens) * n


def random_pattern(n: int, sparse_rate: float, gen: torch.Generator) -> torch.Tensor:
    """A (2, nnz) pattern of PEFT's kind: distinct off-diagonal positions of an n x n S, unsorted, PEFT's count."""
    nnz = max(1, min(int(n * n * sparse_rate), n * (n - 1)))
    off = torch.randperm(n * (n - 1), generator=gen)[:nnz]
    rows, cols = off // (n - 1), off % (n - 1)
    return torch.stack([rows, cols + (cols >= rows).long()])  # skip the diagonal


def random_problem(n_in: int, n_out: int, tokens: int, dtype: torch.dtype, device: torch.device,
                   seed: int, sparse_rate: float = 0.01):
    """Fresh random FRoD inputs, never zeros, O(1) outputs: x, V, U, lambda_l, s_values, s_indices, bias.

    The pattern follows PEFT's construction (distinct off-diagonal positions, unsorted), at PEFT's default rate.
    """
    gen = torch.Generator().manual_seed(seed)
    # Built on the CPU in float32 and moved: no O(n^3) factorization, so a 14336-wide basis costs nothing here.
    V = torch.randn(n_in, n_in, generator=gen) / n_in ** 0.5
    U = torch.randn(n_out, n_in, generator=gen)
    U = U / U.norm(dim=0, keepdim=True)
    x = torch.randn(tokens, n_in, generator=gen)
    lam = 0.5 + torch.rand(n_in, generator=gen)
    s_indices = random_pattern(n_in, sparse_rate, gen)
    s = 0.3 * torch.randn(s_indices.shape[1], generator=gen)
    bias = torch.randn(n_out, generator=gen)
    param_dtype = torch.float32 if dtype != torch.float64 else dtype  # PEFT keeps lambda/s in float32
    return (x.to(device, dtype), V.to(device, dtype), U.to(device, dtype), lam.to(device, param_dtype),
            s.to(device, param_dtype), s_indices.to(device), bias.to(device, dtype))


def tolerance(dtype: torch.dtype, device: torch.device, backend: Optional[str]) -> float:
    """The allowed relative error of ``backend``'s result (None: not one backend's) against float64."""
    # Triton's float32 dot is tf32 by default; docs/DESIGN.md section 5 allows 1e-3 for it.
    if dtype == torch.float32 and device.type == "cuda" and backend != "torch":
        return TOLERANCE_TF32
    return TOLERANCE[dtype]


def run(sizes: Sizes, device: torch.device, progress,
        candidates: Optional[list[tuple[str, Candidate]]] = None) -> list[dict]:
    """One row per (candidate, shape, tokens) with each tensor's relative error; raises CheckFailed at the end if
    any tensor of any candidate is outside tolerance (or a candidate raised)."""
    candidates = backend_candidates(device) if candidates is None else candidates
    dtype, rows, failures = sizes.dtype, [], []
    for n_in, n_out in sizes.layer_shapes:
        for tokens in sizes.check_tokens:
            # Fresh data every run, independent of the seeds the other suites set; the seed is in each row.
            seed = int.from_bytes(os.urandom(4), "little") >> 1
            x, V, U, lam, s, idx, bias = random_problem(n_in, n_out, tokens, dtype, device, seed)
            g = torch.randn(tokens, n_out, generator=torch.Generator().manual_seed(seed + 1)).to(device, dtype)
            ref = reference_grads(x, V, U, lam, s, idx, bias, g)
            for name, fn in candidates:
                progress.start(f"check {n_in}x{n_out} b={tokens} {name}")
                tol = tolerance(dtype, device, getattr(fn, "backend", None))
                row = {"suite": "check", "candidate": name, "n_in": n_in, "n_out": n_out, "tokens": tokens,
                       "dtype": dtype_name(dtype), "seed": seed, "tolerance": tol}
                try:
                    leaves = [t.detach().clone().requires_grad_(True) for t in (x, lam, s, bias)]
                    y = fn(leaves[0], V, U, leaves[1], leaves[2], idx, leaves[3])
                    grads = torch.autograd.grad(y, leaves, g)
                    errs = {name_: rel_err(a, r) for name_, a, r in zip(TENSORS, (y, *grads), ref)}
                    row["rel_err"] = errs
                    bad = {k: e for k, e in errs.items() if not e <= tol}
                    row["ok"] = not bad
                    failures += [dict(row, candidate=name, tensor=k, rel_err=e) for k, e in bad.items()]
                except Exception as e:  # a candidate that raises fails the check like a wrong one
                    row["ok"] = False
                    row["error"] = f"{type(e).__name__}: {e}"
                    failures.append(dict(row))
                rows.append(row)
                progress.done(row)
    if failures:
        raise CheckFailed(failures, rows)
    return rows
