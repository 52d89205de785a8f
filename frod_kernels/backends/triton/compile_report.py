"""Compile every Triton kernel for real GPUs (sm_80, sm_90) on a machine without one, and check what ptxas made.

For each launch the engine makes (kernel x operand layout, :data:`LAUNCHES`), each dtype, each of the autotuner's GPU
configs (``gpu_configs``, also in a process that interprets) and each target, Triton's own compiler builds the cubin
that GPU would load. Its resources (``cuobjdump --dump-resource-usage``) and ptxas's spill counts are checked:

* a compile error fails, and so do any spill and any local memory (a stack frame included);
* shared memory (Triton's dynamic plus the cubin's static) above the target's per-block maximum fails;
* registers that do not leave room for one block of the config's warps fail (registers are allocated in units of
  8 a thread, 256 a warp).

Warps resident per SM as the registers and as the shared memory allow are reported, for information.

Specialization mirrors a launch. The arguments come from the kernel modules' own ``kernel_launch`` on meta tensors
shaped like an engine problem (:data:`SHAPES`) and go through Triton's binder for the target, so an integer equal
to 1 becomes a constexpr and multiples of 16 get ``tt.divisibility`` exactly as a GPU launch would give them. Meta
tensors sit at address 0, which gives every pointer the 16-byte alignment a launch sees (the caching allocator's
blocks are 512-byte aligned). Adapter vectors (``lambda``, ``s``) are float32, PEFT's adapter dtype under a
half-precision base (float64 for float64 data).

Results are cached on disk, one JSON file per compile, keyed by Triton's hashes of the kernel source (with every
jit function it calls), signature, specialization, options and backend (ptxas version, arch) plus Triton's version.

    python -m frod_kernels.backends.triton.compile_report [--kernel row_gather,sampled_dot] [--arch 80,90] [--json FILE]
        [--jobs N] [--cache-dir DIR | --no-cache]

It exits non-zero if any compile fails a check. It must run in a process that compiles (``TRITON_INTERPRET``
unset): Triton decides at import whether jit functions, its own standard library's included, are interpreted.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import io
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

from . import row_gather, sampled_dot
from ._common import interpreting

# Bumped when what a cache entry holds changes.
_CACHE_SCHEMA = 1
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclasses.dataclass(frozen=True)
class Target:
    """Per-SM and per-block limits of one GPU architecture (CUDA programming guide, compute capabilities table)."""

    arch: int
    smem_per_block: int  # opt-in maximum of one block
    smem_per_sm: int
    regs_per_sm: int = 65536
    max_warps_per_sm: int = 64
    max_blocks_per_sm: int = 32
    smem_reserved_per_block: int = 1024  # held by the CUDA runtime for every resident block


TARGETS = {80: Target(80, smem_per_block=166912, smem_per_sm=167936),
           90: Target(90, smem_per_block=232448, smem_per_sm=233472)}


@dataclasses.dataclass(frozen=True)
class Problem:
    """The sizes of a layer that decide a launch's specialization."""

    n_in: int
    n_out: int
    tokens: int
    nnz: int


# x16: every size a multiple of 16, as models' widths and most token counts are. odd: none is (any token count can
# come), which costs the divisibility hints, and with them vectorized loads, and takes the most registers. nnz: 1 % of
# n_in^2 (PEFT's default sparse_rate). One token (tokens = 1: the row length and a stride become constexpr 1) compiles
# to less code; measured once, it stayed within the odd class's registers.
SHAPES = {"x16": Problem(n_in=4096, n_out=4096, tokens=2048, nnz=167772),
          "odd": Problem(n_in=4095, n_out=4097, tokens=2047, nnz=167690)}


def _meta(*shape, dtype):
    return torch.empty(shape, dtype=dtype, device="meta")


def _adapter_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _row_gather(p, A):
    n, vec = A.shape[0], _adapter_dtype(A.dtype)
    return row_gather.kernel_launch(A, _meta(n, dtype=vec), _meta(p.nnz, dtype=vec), _meta(n + 1, dtype=torch.int64),
                                    _meta(p.nnz, dtype=torch.int64), _meta(*A.shape, dtype=A.dtype))


def _sampled_dot(p, P, Q):
    (n, m), acc = P.shape, _adapter_dtype(P.dtype)
    splits = sampled_dot.n_splits(m)
    return sampled_dot.kernel_launch(P, Q, _meta(n + 1, dtype=torch.int64), _meta(p.nnz, dtype=torch.int64),
                                     _meta(splits, p.nnz, dtype=acc), _meta(splits, n, dtype=acc))


def _feature_major(p, dtype):
    # z^T, dt^T: in x tokens, rows contiguous (engine.forward / engine.backward)
    return _meta(p.n_in, p.tokens, dtype=dtype)


def _u_t(p, dtype):
    # U.t(): in x out, columns contiguous, as the engine passes it
    return _meta(p.n_out, p.n_in, dtype=dtype).t()


# (kernel, layout) -> (problem, dtype) -> (autotuner, args, kwargs): one entry per kind of launch in engine.py.
LAUNCHES = {
    # t^T from z^T, dz^T from dt^T, and C^T from U^T: the gather makes every A row-contiguous before its launch,
    # so the feature-major operand's launch (in x tokens) stands for all of them.
    ("row_gather", "rows"): lambda p, dt: _row_gather(p, _feature_major(p, dt)),
    # factored path: dt^T, z^T
    ("sampled_dot", "rows"): lambda p, dt: _sampled_dot(p, _feature_major(p, dt), _feature_major(p, dt)),
    # materialized path: U^T and (dW' V)^T, in x out with rows contiguous
    ("sampled_dot", "cols"): lambda p, dt: _sampled_dot(p, _u_t(p, dt), _meta(p.n_in, p.n_out, dtype=dt)),
}


def configs(kernel: str, layout: str) -> list[triton.Config]:
    """The GPU autotune configs of the autotuner that serves this launch."""
    tuner, _, _ = LAUNCHES[kernel, layout](SHAPES["x16"], torch.float32)
    return tuner.gpu_configs


def config_name(config: triton.Config) -> str:
    tiles = "x".join(f"{k.removeprefix('BLOCK_')}{v}" for k, v in config.kwargs.items())
    return f"{tiles} w{config.num_warps} s{config.num_stages}"


@dataclasses.dataclass
class Result:
    kernel: str
    layout: str
    shapes: str
    dtype: str
    config: str
    arch: int
    num_warps: int
    regs: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    local: int | None = None  # bytes a thread
    stack: int | None = None  # bytes a thread
    shared: int | None = None  # bytes a block, dynamic + static
    warps_by_regs: int | None = None
    warps_by_smem: int | None = None
    error: str | None = None
    failures: list[str] = dataclasses.field(default_factory=list)


def check(r: Result) -> Result:
    """Fill the occupancy fields and the failures of a measured (or failed) compile."""
    if r.error is not None:
        r.failures = [f"compile error: {r.error}"]
        return r
    t = TARGETS[r.arch]
    regs_per_warp = -(-r.regs // 8) * 8 * 32
    blocks_by_regs = min(t.regs_per_sm // regs_per_warp, t.max_warps_per_sm) // r.num_warps
    blocks_by_smem = t.smem_per_sm // (r.shared + t.smem_reserved_per_block)
    r.warps_by_regs = min(blocks_by_regs, t.max_blocks_per_sm) * r.num_warps
    r.warps_by_smem = min(blocks_by_smem, t.max_blocks_per_sm, t.max_warps_per_sm // r.num_warps) * r.num_warps
    r.failures = []
    if r.spill_stores or r.spill_loads:
        r.failures.append(f"spills {r.spill_stores} B stored, {r.spill_loads} B loaded")
    if r.local or r.stack:
        r.failures.append(f"local memory: {r.stack} B stack frame, {r.local} B local a thread")
    if r.shared > t.smem_per_block:
        r.failures.append(f"shared memory {r.shared} B > {t.smem_per_block} B a block")
    if blocks_by_regs == 0:
        r.failures.append(f"{r.regs} registers a thread ({regs_per_warp} a warp as allocated) x {r.num_warps} warps "
                          f"> {t.regs_per_sm} an SM")
    return r


def _cache_key(src, backend, options) -> str:
    key = f"{_CACHE_SCHEMA}-{triton.__version__}-{src.hash()}-{backend.hash()}-{options.hash()}"
    return hashlib.sha256(key.encode()).hexdigest()


def _cuobjdump() -> str:
    return knobs.nvidia.cuobjdump.path  # Triton's wheel ships it; RuntimeError where it is missing


def _resources(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name], check=True,
                             capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    if m is None:
        raise RuntimeError(f"no resource usage in cuobjdump's output:\n{out}")
    regs, stack, shared, local = map(int, m.groups())
    return {"regs": regs, "stack": stack, "static_shared": shared, "local": local}


def _spills(ptxas_log: str) -> dict:
    m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", ptxas_log)
    if m is None:
        raise RuntimeError(f"no spill counts in ptxas's log:\n{ptxas_log}")
    return {"spill_stores": int(m.group(1)), "spill_loads": int(m.group(2))}


def _compile(src, target, options) -> dict:
    # A private cache directory forces ptxas to run (its log, printed by Triton, carries the spill counts) and keeps
    # cubins for GPUs this machine lacks out of the user's Triton cache.
    log = io.StringIO()
    with tempfile.TemporaryDirectory() as tmp, knobs.cache.scope(), knobs.nvidia.scope(), \
            contextlib.redirect_stdout(log):
        knobs.cache.dir = tmp
        knobs.nvidia.dump_ptxas_log = True
        kernel = triton.compile(src, target=target, options=options.__dict__)
    res = _resources(kernel.asm["cubin"])
    res.update(_spills(log.getvalue()))
    res["shared"] = kernel.metadata.shared + res.pop("static_shared")
    return res


def measure(kernel: str, layout: str, shapes: str, dtype: torch.dtype, config: triton.Config, arch: int,
            cache_dir: "Path | None", cached_only: bool = False) -> "Result | None":
    """Compile one launch with one config for ``sm_<arch>`` (or read the cached result) and check it.

    ``cached_only``: None instead of a compile where the cache has no result.
    """
    if interpreting():
        raise RuntimeError("compile_report compiles for a GPU: run it with TRITON_INTERPRET unset")
    r = Result(kernel, layout, shapes, str(dtype).removeprefix("torch."), config_name(config), arch,
               config.num_warps)
    tuner, args, kwargs = LAUNCHES[kernel, layout](SHAPES[shapes], dtype)
    fn = tuner.fn
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    # What JITFunction.run does for a launch, with the target's backend in place of the current device's.
    kwargs = {**kwargs, **config.all_kwargs()}
    bound, specialization, options = create_function_from_signature(fn.signature, fn.params, backend)(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    src = ASTSource(fn, signature, constexprs, attrs)
    entry = cache_dir / f"{_cache_key(src, backend, options)}.json" if cache_dir else None
    if entry is not None and entry.exists():
        res = json.loads(entry.read_text())
    elif cached_only:
        return None
    else:
        try:
            res = _compile(src, target, options)
        except Exception as e:  # a compile error is a result to report, with the others
            r.error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            return check(r)
        if entry is not None:
            entry.parent.mkdir(parents=True, exist_ok=True)
            part = entry.with_suffix(f".{os.getpid()}.part")
            part.write_text(json.dumps(res))
            part.replace(entry)  # atomic: a concurrent reader sees all of it or nothing
    for k, v in res.items():
        setattr(r, k, v)
    return check(r)


def _measure_task(task):
    return measure(*task)


def run(kernels=None, archs=tuple(TARGETS), dtypes=DTYPES, jobs: int = 1, cache_dir: "Path | None" = None
        ) -> list[Result]:
    """Every launch (of ``kernels``, default all) x shape class x dtype x GPU config x arch, in ``jobs`` processes."""
    tasks = [(kernel, layout, shapes, dtype, config, arch, cache_dir) for (kernel, layout) in LAUNCHES
             if kernels is None or kernel in kernels
             for shapes in SHAPES for dtype in dtypes for config in configs(kernel, layout) for arch in archs]
    # Cache hits here, so that a warm run starts no worker (each imports torch and Triton: seconds).
    results = [measure(*t, cached_only=True) if cache_dir else None for t in tasks]
    missing = [i for i, r in enumerate(results) if r is None]
    jobs = min(jobs, len(missing))
    if jobs <= 1:
        compiled = [_measure_task(tasks[i]) for i in missing]
    else:
        # spawn: fresh interpreters, none of this process's Triton state (knobs, caches) carried over
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            compiled = list(pool.map(_measure_task, [tasks[i] for i in missing]))
    for i, r in zip(missing, compiled):
        results[i] = r
    return results


def unavailable() -> "str | None":
    """Why Triton cannot compile for the NVIDIA targets on this machine, or None."""
    try:
        for arch in TARGETS:
            make_backend(GPUTarget("cuda", arch, 32)).hash()  # runs that arch's ptxas --version
        _cuobjdump()
    except (RuntimeError, OSError, subprocess.CalledProcessError) as e:
        return f"Triton's NVIDIA backend cannot compile here: {e}"
    return None


def _fmt(v):
    return "-" if v is None else str(v)


def table(results: list[Result]) -> str:
    head = ["kernel", "layout", "shapes", "dtype", "config", "arch", "regs", "spill st/ld", "local", "smem",
            "warps/SM regs", "warps/SM smem", "result"]
    rows = [[r.kernel, r.layout, r.shapes, r.dtype, r.config, f"sm_{r.arch}", _fmt(r.regs),
             f"{_fmt(r.spill_stores)}/{_fmt(r.spill_loads)}", _fmt(r.local), _fmt(r.shared), _fmt(r.warps_by_regs),
             _fmt(r.warps_by_smem), "FAIL: " + "; ".join(r.failures) if r.failures else "ok"] for r in results]
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    return "\n".join("  ".join(x.ljust(w) for x, w in zip(row, widths)).rstrip() for row in [head, *rows])


def summary(results: list[Result]) -> str:
    """One line per kernel, layout, shape class and arch: register range, least warps resident, most shared memory,
    failures."""
    groups: dict[tuple, list[Result]] = {}
    for r in results:
        groups.setdefault((r.kernel, r.layout, r.shapes, r.arch), []).append(r)
    lines = []
    for (kernel, layout, shapes, arch), rs in groups.items():
        ok = [r for r in rs if r.error is None]
        failed = sum(bool(r.failures) for r in rs)
        span = (f"regs {min(r.regs for r in ok)}-{max(r.regs for r in ok)}, "
                f"min warps/SM {min(min(r.warps_by_regs, r.warps_by_smem) for r in ok)}, "
                f"max smem {max(r.shared for r in ok)} B" if ok else "nothing compiled")
        lines.append(f"{kernel:<11} {layout:<4} {shapes:<3} sm_{arch}: {len(rs)} compiles, {span}, "
                     + (f"{failed} FAILED" if failed else "all ok"))
    return "\n".join(lines)


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "frod_kernels" / "triton-compile"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m frod_kernels.backends.triton.compile_report",
                                description=__doc__.split("\n")[0])
    kernels = sorted({k for k, _ in LAUNCHES})
    p.add_argument("--kernel", default=",".join(kernels), help="kernels, comma-separated (default: %(default)s)")
    p.add_argument("--arch", default=",".join(map(str, TARGETS)), help="compute capabilities (default: %(default)s)")
    p.add_argument("--json", type=Path, help="also write the results to this file")
    p.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)),
                   help="compiler processes (default: this machine's cores, %(default)s)")
    p.add_argument("--cache-dir", type=Path, default=default_cache_dir(), help="default: %(default)s")
    p.add_argument("--no-cache", action="store_true", help="compile everything, read and write no cache")
    a = p.parse_args(argv)
    if interpreting():
        p.error("TRITON_INTERPRET is set: this process would interpret, not compile; unset it")
    archs = tuple(int(x) for x in a.arch.split(","))
    chosen = a.kernel.split(",")
    for what, got, known in (("arch", archs, list(TARGETS)), ("kernel", chosen, kernels)):
        if set(got) - set(known):
            p.error(f"unknown {what} {sorted(set(got) - set(known))}; known: {known}")
    reason = unavailable()
    if reason:
        p.error(reason)
    results = run(chosen, archs, jobs=a.jobs, cache_dir=None if a.no_cache else a.cache_dir)
    print(table(results))
    print()
    print(summary(results))
    if a.json:
        shapes = {k: dataclasses.asdict(v) for k, v in SHAPES.items()}
        a.json.write_text(json.dumps({"triton": triton.__version__, "shapes": shapes,
                                      "results": [dataclasses.asdict(r) for r in results]}, indent=1))
    return 1 if any(r.failures for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
