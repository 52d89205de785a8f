"""The engine on paper: FLOPs and bytes of every step of every path, and the time a GPU's roofline allows.

Each step of :mod:`frod_kernels.engine` is one kernel (a dense GEMM, or one of the two kernel families of docs/DESIGN.md
section 6). Its floor is the slowest of three rates:

    max(flops / peak, hbm_bytes / hbm_bandwidth, l2_bytes / l2_bandwidth)

and a path's floor is the sum of its steps' floors: the steps cannot overlap (each needs the previous one's output).

* ``hbm_bytes`` is the compulsory traffic: every operand read once and every result written once, in the compute
  dtype (``e`` bytes an element), the kernel families' index arrays (int64) and float32 weights included.
* ``l2_bytes`` is what the SMs load through L2, first touches included. A kernel family re-reads operand rows: every
  nonzero of a row gather loads one whole source row (``m`` elements, coalesced, from L2 after the first touch), and
  every nonzero of a sampled dot loads one Q row (the P row stays in registers). At 4096 x 4096 and 1 % that is 42
  row reads per output row, about 21 times the compulsory bytes, so the families are L2-bound, not HBM-bound. The
  working set of a column tile (``n`` rows of one segment: 8 MiB at n = 4096 in bf16) fits the 50 MB L2, which is
  what makes "from L2" the right rate; L1 (256 KB an SM) holds a few percent of it, so it is not counted.
  For a GEMM this is its operands once: the measured matmul peak already prices its tiles' L2 re-reads.
* The memory terms take the max, not the sum: every load crosses L2 -> SM once whether it hit or missed (so
  ``l2_bytes`` already charges the first touches their L2 pass), while misses are filled HBM -> L2 by other hardware
  at the same time; with thousands of loads in flight the slower pipe bounds the time (the hierarchical roofline of
  Nsight Compute). Summing would count the first touches twice.

L2 bandwidth: NVIDIA does not publish it. Chips and Cheese measured about 5.5 TB/s of L2 read bandwidth on an H100
PCIe ("Nvidia's H100: Funny L2, and Tons of Bandwidth", 2023-07-02; the figure Austin et al. use in "How to Scale
Your Model", chapter "How to Think About GPUs"). That part has 114 SMs at up to 1.755 GHz under a 350 W cap; the
H200 has 132 SMs at up to 1.98 GHz and 700 W, so its L2 is likely faster, and the A100-era 5,120 bytes a clock at
1.98 GHz (about 10 TB/s) bounds it from above. The model takes the measured 5.5 TB/s (``--l2-bandwidth`` to try
another): the L2-bound floors scale with its inverse. A GPU run should measure it (an L2-resident copy).

With ``b`` tokens, ``n`` = in, ``o`` = out, ``k`` = nnz (multiply-adds as 2 FLOPs):

========================  ==============  ====================================  ======================================
step                      FLOPs           HBM bytes (compulsory)                L2 bytes (loads)
========================  ==============  ====================================  ======================================
GEMM (p x q)(q x r)       2 p q r         e (p q + q r + p r)                   e (p q + q r)
row gather, n x m         2 m (n + k)     e 2 n m + I                           e m (n + k) + I
sampled dot, n x m        2 m (n + k)     e 2 n m + 4 (n + k) + J               e m (2 n + k) + J
========================  ==============  ====================================  ======================================

``I = 4 n + 12 k + 8 (n + 1)`` (diag, weights and src, ptr), ``J = 8 k + 8 (n + 1)`` (src, ptr); a sampled dot
writes ``4 (n + k)`` (vals, diag). Which steps each path runs (forward; backward with the input gradient and both
adapter gradients) is :func:`path_steps`: the same sequence as ``engine.forward`` / ``engine.backward``.
``python -m frod_kernels.roofline`` prints the table for given shapes on a given GPU (default: the H200 numbers
measured on the project's test machine, and the L2 figure above).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Optional

from ._table import format_table
from .engine import FACTORED, KERNEL_PATH_NAMES, MATERIALIZED, SPARSE

__all__ = ["GPU", "H200", "Step", "floor_ms", "frod_floor", "lora_steps", "linear_steps", "path_steps"]


# Bytes a second the SMs load from L2 on Hopper: measured on an H100 PCIe (see the module docstring).
HOPPER_L2_BANDWIDTH = 5.5e12


@dataclasses.dataclass(frozen=True)
class GPU:
    name: str
    bandwidth: float  # bytes/s, device memory
    peak_flops: dict  # dtype name -> FLOP/s of a large dense matmul
    # frod-bench measures the other two rates on the device but not this one: a Hopper figure stands in
    l2_bandwidth: float = HOPPER_L2_BANDWIDTH


# Measured on the project's H200 (shared/ENVIRONMENT.md): about 4.3 TB/s device copy, about 790 TFLOP/s bf16
# matmul. float32 without TF32 runs on the CUDA cores: H200's 67 TFLOP/s datasheet figure.
H200 = GPU("NVIDIA H200", 4.3e12, {"bfloat16": 790e12, "float16": 790e12, "float32": 67e12})

ELEMENT_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "float64": 8}


@dataclasses.dataclass(frozen=True)
class Step:
    name: str
    flops: float
    bytes: float  # compulsory HBM traffic
    l2_bytes: float  # loads through L2, first touches and re-reads

    def times_s(self, gpu: GPU, dtype: str) -> dict[str, float]:
        """Seconds each resource needs for this step: its roofline is the largest."""
        return {"compute": self.flops / gpu.peak_flops[dtype], "hbm": self.bytes / gpu.bandwidth,
                "l2": self.l2_bytes / gpu.l2_bandwidth}

    def floor_s(self, gpu: GPU, dtype: str) -> float:
        return max(self.times_s(gpu, dtype).values())

    def bound(self, gpu: GPU, dtype: str) -> str:
        times = self.times_s(gpu, dtype)
        return max(times, key=times.__getitem__)


def _gemm(name: str, p: int, q: int, r: int, e: int) -> Step:
    return Step(name, 2.0 * p * q * r, float(e) * (p * q + q * r + p * r), float(e) * (p * q + q * r))


def _row_gather(name: str, n: int, m: int, k: int, e: int) -> Step:
    index = 4 * n + 12 * k + 8 * (n + 1)  # diag; weights and src; ptr
    # the diagonal reads each row of A once, every nonzero one more whole row
    return Step(name, 2.0 * m * (n + k), float(e) * 2 * n * m + index, float(e) * m * (n + k) + index)


def _sampled_dot(name: str, n: int, m: int, k: int, e: int) -> Step:
    index = 8 * k + 8 * (n + 1)  # src, ptr
    # P's rows once (kept in registers), Q's row j for the diagonal and one Q row per nonzero
    return Step(name, 2.0 * m * (n + k), float(e) * 2 * n * m + 4 * (n + k) + index,
                float(e) * m * (2 * n + k) + index)


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
    """(path, ms): the path with the lowest floor, and that floor: the least time FRoD's math allows here. Over the
    paths the kernel families run: the dense path, taken for its host time on the CPU, has no roofline."""
    floors = {name: floor_ms(path_steps(p, b, n_in, n_out, nnz, dtype, training), gpu, dtype)
              for p, name in KERNEL_PATH_NAMES.items()}
    best = min(floors, key=floors.__getitem__)
    return best, floors[best]


def table(shapes: list[tuple[int, int, int]], gpu: GPU, dtype: str, sparse_rate: float, markdown: bool,
          steps: bool) -> str:
    """Per shape (in, out, tokens) and path: FLOPs, HBM and L2 bytes, arithmetic intensity (on the HBM bytes) and
    floor, forward+backward; with ``steps``, every kernel and the resource that bounds it."""

    rows = []
    for n_in, n_out, b in shapes:
        nnz = int(n_in * n_in * sparse_rate)
        linear = floor_ms(linear_steps(b, n_in, n_out, dtype), gpu, dtype)
        for p, name in KERNEL_PATH_NAMES.items():
            path = path_steps(p, b, n_in, n_out, nnz, dtype)
            flops, moved, loaded = (sum(getattr(s, f) for s in path) for f in ("flops", "bytes", "l2_bytes"))
            ms = floor_ms(path, gpu, dtype)
            rows.append([f"{n_in}x{n_out}, {b} tokens", name, f"{flops / 1e9:.0f}", f"{moved / 2**20:.0f}",
                         f"{loaded / 2**20:.0f}", f"{flops / moved:.0f}", f"{ms:.3f}", f"{ms / linear:.2f}x"])
            if steps:
                for s in path:
                    rows.append(["", "  " + s.name, f"{s.flops / 1e9:.1f}", f"{s.bytes / 2**20:.1f}",
                                 f"{s.l2_bytes / 2**20:.1f}", f"{s.flops / max(s.bytes, 1):.0f}",
                                 f"{1e3 * s.floor_s(gpu, dtype):.4f}", s.bound(gpu, dtype)])
        rows.append([f"{n_in}x{n_out}, {b} tokens", "frozen nn.Linear (fwd + dx)", "-", "-", "-", "-",
                     f"{linear:.3f}", "1.00x"])
    headers = ["shape (in x out)", "path", "GFLOP", "HBM MiB", "L2 MiB", "FLOP/byte", "floor ms", "floor / Linear"]
    return format_table(headers, rows, markdown)


def summary(shapes: list[tuple[int, int, int]], gpu: GPU, dtype: str, sparse_rate: float, markdown: bool) -> str:
    """One row per shape: each path's floor (the best in bold, or starred), the frozen layer's, and the ratio."""

    rows = []
    for n_in, n_out, b in shapes:
        nnz = int(n_in * n_in * sparse_rate)
        best, best_ms = frod_floor(b, n_in, n_out, nnz, gpu, dtype)
        linear = floor_ms(linear_steps(b, n_in, n_out, dtype), gpu, dtype)
        cells = []
        for p, name in KERNEL_PATH_NAMES.items():
            cell = _ms(floor_ms(path_steps(p, b, n_in, n_out, nnz, dtype), gpu, dtype))
            cells.append((f"**{cell}**" if markdown else f"{cell} *") if name == best else cell)
        rows.append([f"{n_in} × {n_out}, {b}", *cells, _ms(linear), f"{best_ms / linear:.2f}×"])
    headers = ["shape (in × out), tokens", *KERNEL_PATH_NAMES.values(), "frozen `nn.Linear` (fwd + dx)",
               "best FRoD / Linear"]
    if not markdown:
        return format_table(headers, rows)
    rule = ["---"] + ["---:"] * (len(headers) - 1)
    return "\n".join("| " + " | ".join(r) + " |" for r in [headers, rule, *rows])


def _ms(ms: float) -> str:
    return f"{ms:.2f} ms" if ms >= 0.1 else f"{ms:.3f} ms"


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
    p.add_argument("--l2-bandwidth", type=float, default=H200.l2_bandwidth / 1e12,
                   help="L2 load bandwidth in TB/s (default: %(default)s, see above)")
    p.add_argument("--steps", action="store_true", help="also list every kernel of every path")
    p.add_argument("--summary", action="store_true", help="one row per shape, the paths side by side (the README's)")
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args(argv)
    gpu = dataclasses.replace(H200, l2_bandwidth=args.l2_bandwidth * 1e12)
    print(f"{gpu.name}: {gpu.bandwidth / 1e12:.1f} TB/s HBM, {gpu.l2_bandwidth / 1e12:.1f} TB/s L2, "
          f"{gpu.peak_flops[args.dtype] / 1e12:.0f} TFLOP/s {args.dtype}; forward + backward (dx, dlambda, dS), "
          f"sparse rate {args.sparse_rate}")
    if args.summary:
        print(summary(args.shapes, gpu, args.dtype, args.sparse_rate, args.markdown))
    else:
        print(table(args.shapes, gpu, args.dtype, args.sparse_rate, args.markdown, args.steps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
