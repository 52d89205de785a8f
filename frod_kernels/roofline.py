"""The engine on paper: FLOPs and bytes of every step of every path, and the time a GPU's roofline allows.

Each step of :mod:`frod_kernels.engine` is one kernel (a dense GEMM, or one of the two kernel families of DESIGN.md
section 6), so its floor is ``max(flops / peak, bytes / bandwidth)`` and a path's floor is the sum of its steps'
floors: no kernel can beat its own roofline, and the steps cannot overlap (each needs the previous one's output).
Bytes are the compulsory traffic: every operand read once and every result written once, in the compute dtype
(``e`` bytes an element), the kernel families' index arrays (int64) and float32 weights included. Gathered rows
are counted once, as if caches served every repeat: a floor, which the kernels approach when a tile's sources stay
in L2.

With ``b`` tokens, ``n`` = in, ``o`` = out, ``k`` = nnz (multiply-adds as 2 FLOPs):

========================  =====================  ===========================================================
step                      FLOPs                  bytes
========================  =====================  ===========================================================
GEMM (p x q)(q x r)       2 p q r                e (p q + q r + p r)
row gather, n x m         2 m (n + k)            e (2 n m) + 4 n + 12 k + 8 n  (A read, out written; diag,
                                                 weights, src, ptr)
sampled dot, n x m        2 m (n + k)            e (2 n m) + 4 (n + k) + 8 (n + k)  (P, Q read; vals, diag
                                                 written; src, ptr)
========================  =====================  ===========================================================

Which steps each path runs (forward; backward with the input gradient and both adapter gradients) is
:func:`path_steps`: the same sequence as ``engine.forward`` / ``engine.backward``. ``python -m
frod_kernels.roofline`` prints the table for given shapes on a given GPU (default: the H200 numbers measured on
the project's test machine).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Optional

from .engine import FACTORED, MATERIALIZED, PATH_NAMES, SPARSE

__all__ = ["GPU", "H200", "Step", "floor_ms", "frod_floor", "lora_steps", "linear_steps", "path_steps"]


@dataclasses.dataclass(frozen=True)
class GPU:
    name: str
    bandwidth: float  # bytes/s, device memory
    peak_flops: dict  # dtype name -> FLOP/s of a large dense matmul


# Measured on the project's H200 (shared/ENVIRONMENT.md): about 4.3 TB/s device copy, about 790 TFLOP/s bf16
# matmul. float32 without TF32 runs on the CUDA cores: H200's 67 TFLOP/s datasheet figure.
H200 = GPU("NVIDIA H200", 4.3e12, {"bfloat16": 790e12, "float16": 790e12, "float32": 67e12})

ELEMENT_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "float64": 8}


@dataclasses.dataclass(frozen=True)
class Step:
    name: str
    flops: float
    bytes: float

    def floor_s(self, gpu: GPU, dtype: str) -> float:
        return max(self.flops / gpu.peak_flops[dtype], self.bytes / gpu.bandwidth)


def _gemm(name: str, p: int, q: int, r: int, e: int) -> Step:
    return Step(name, 2.0 * p * q * r, float(e) * (p * q + q * r + p * r))


def _row_gather(name: str, n: int, m: int, k: int, e: int) -> Step:
    return Step(name, 2.0 * m * (n + k), float(e) * 2 * n * m + 4 * n + 12 * k + 8 * n)


def _sampled_dot(name: str, n: int, m: int, k: int, e: int) -> Step:
    return Step(name, 2.0 * m * (n + k), float(e) * 2 * n * m + 12 * (n + k))


def path_steps(path: int, b: int, n_in: int, n_out: int, nnz: int, dtype: str = "bfloat16", training: bool = True,
               keep_weight: bool = False) -> list[Step]:
    """The kernels one call of ``path`` runs (forward, and backward when ``training``), in engine order."""
    e = ELEMENT_BYTES[dtype]
    n, o, k = n_in, n_out, nnz
    c_build = _row_gather("C^T = row_gather(U^T)", n, o, k, e)
    z = _gemm("z^T = V^T x^T", n, n, b, e)
    steps = {
        SPARSE: [z, _row_gather("t^T = row_gather(z^T)", n, b, k, e), _gemm("y = t U^T", b, n, o, e)],
        FACTORED: [c_build, z, _gemm("y = z C^T", b, n, o, e)],
        MATERIALIZED: [c_build, _gemm("W'^T = V C^T", n, n, o, e), _gemm("y = x W'^T", b, n, o, e)],
    }[path]
    if not training:
        return steps
    dt = _gemm("dt^T = U^T g^T", n, o, b, e)
    dx = _gemm("dx = dz V^T", b, n, n, e)
    if path == MATERIALIZED:
        back = [] if keep_weight else [c_build, _gemm("W'^T = V C^T", n, n, o, e)]
        back += [_gemm("dx = g W'", b, o, n, e), _gemm("x^T g", n, b, o, e), _gemm("(dW' V)^T = V^T (x^T g)", n, n, o, e),
                 _sampled_dot("dS, dlambda = sampled_dot(U^T, (dW' V)^T)", n, o, k, e)]
    elif path == FACTORED:
        back = [dt, _sampled_dot("dS, dlambda = sampled_dot(dt^T, z^T)", n, b, k, e), c_build,
                _gemm("dz = g C", b, o, n, e), dx]
    else:
        back = [dt, _sampled_dot("dS, dlambda = sampled_dot(dt^T, z^T)", n, b, k, e),
                _row_gather("dz^T = row_gather(dt^T)", n, b, k, e), dx]
    return steps + back


def linear_steps(b: int, n_in: int, n_out: int, dtype: str = "bfloat16", training: bool = True) -> list[Step]:
    """A frozen ``nn.Linear``: forward, and the input gradient when ``training``."""
    e = ELEMENT_BYTES[dtype]
    return [_gemm("y = x W^T", b, n_in, n_out, e)] + ([_gemm("dx = g W", b, n_out, n_in, e)] if training else [])


def lora_steps(b: int, n_in: int, n_out: int, rank: int, dtype: str = "bfloat16", training: bool = True) -> list[Step]:
    """LoRA on a frozen linear: ``y = x W^T + (x A^T) B^T``; backward: dx, dA, dB."""
    e = ELEMENT_BYTES[dtype]
    steps = linear_steps(b, n_in, n_out, dtype, training) + [_gemm("h = x A^T", b, n_in, rank, e),
                                                              _gemm("y += h B^T", b, rank, n_out, e)]
    if training:
        steps += [_gemm("dh = g B", b, n_out, rank, e), _gemm("dB = g^T h", n_out, b, rank, e),
                  _gemm("dA = dh^T x", rank, b, n_in, e), _gemm("dx += dh A", b, rank, n_in, e)]
    return steps


def floor_ms(steps: list[Step], gpu: GPU, dtype: str) -> float:
    return 1e3 * sum(s.floor_s(gpu, dtype) for s in steps)


def frod_floor(b: int, n_in: int, n_out: int, nnz: int, gpu: GPU, dtype: str = "bfloat16",
               training: bool = True) -> tuple[str, float]:
    """(path, ms): the path with the lowest floor, and that floor: the least time FRoD's math allows here."""
    floors = {PATH_NAMES[p]: floor_ms(path_steps(p, b, n_in, n_out, nnz, dtype, training), gpu, dtype)
              for p in PATH_NAMES}
    best = min(floors, key=floors.__getitem__)
    return best, floors[best]


def table(shapes: list[tuple[int, int, int]], gpu: GPU, dtype: str, sparse_rate: float, markdown: bool,
          steps: bool) -> str:
    """Per shape (in, out, tokens) and path: FLOPs, bytes, arithmetic intensity and floor, forward+backward."""
    from .bench.common import format_table

    rows = []
    for n_in, n_out, b in shapes:
        nnz = int(n_in * n_in * sparse_rate)
        linear = floor_ms(linear_steps(b, n_in, n_out, dtype), gpu, dtype)
        for p, name in PATH_NAMES.items():
            path = path_steps(p, b, n_in, n_out, nnz, dtype)
            flops, moved = sum(s.flops for s in path), sum(s.bytes for s in path)
            ms = floor_ms(path, gpu, dtype)
            rows.append([f"{n_in}x{n_out}, {b} tokens", name, f"{flops / 1e9:.0f}", f"{moved / 2**20:.0f}",
                         f"{flops / moved:.0f}", f"{ms:.3f}", f"{ms / linear:.2f}x"])
            if steps:
                for s in path:
                    bound = "memory" if s.bytes / gpu.bandwidth > s.flops / gpu.peak_flops[dtype] else "compute"
                    rows.append(["", "  " + s.name, f"{s.flops / 1e9:.1f}", f"{s.bytes / 2**20:.1f}",
                                 f"{s.flops / max(s.bytes, 1):.0f}", f"{1e3 * s.floor_s(gpu, dtype):.4f}", bound])
        rows.append([f"{n_in}x{n_out}, {b} tokens", "frozen nn.Linear (fwd + dx)", "-", "-", "-", f"{linear:.3f}",
                     "1.00x"])
    headers = ["shape (in x out)", "path", "GFLOP", "MiB moved", "FLOP/byte", "floor ms", "floor / Linear"]
    return format_table(headers, rows, markdown)


def _shape(spec: str) -> tuple[int, int, int]:
    try:
        dims, tokens = spec.split(":")
        n_in, n_out = dims.lower().split("x")
        return int(n_in), int(n_out), int(tokens)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shapes: expected INxOUT:TOKENS like 4096x4096:16384, got {spec!r}") \
            from None


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m frod_kernels.roofline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", type=lambda s: [_shape(v) for v in s.split(",")],
                   default=[(4096, 4096, 16384), (3072, 3072, 4096), (3072, 1024, 4096)],
                   help="comma list of INxOUT:TOKENS (default: the README's shapes)")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(H200.peak_flops))
    p.add_argument("--sparse-rate", type=float, default=0.01)
    p.add_argument("--steps", action="store_true", help="also list every kernel of every path")
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args(argv)
    print(f"{H200.name}: {H200.bandwidth / 1e12:.1f} TB/s, {H200.peak_flops[args.dtype] / 1e12:.0f} TFLOP/s "
          f"{args.dtype}; forward + backward (dx, dlambda, dS), sparse rate {args.sparse_rate}")
    print(table(args.shapes, H200, args.dtype, args.sparse_rate, args.markdown, args.steps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
