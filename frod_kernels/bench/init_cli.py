"""``python -m frod_kernels.bench.init_cli`` (also ``python bench/init_projections.py``): the init suite
(:mod:`.init`) at a chosen model size, each method in a fresh process of its own so its peak memory is its own.

    python -m frod_kernels.bench.init_cli                    # width 1024, 16 layers (about a minute on 2 cores)
    python -m frod_kernels.bench.init_cli --hidden 2048 --eigen-check
    python -m frod_kernels.bench.init_cli --hidden 2048 --methods peft frod_kernels frod_kernels_cached
    python -m frod_kernels.bench.init_cli --device cuda --hidden 4096 --layers 32 --methods frod_kernels

Prints each row as it finishes and the table last; ``--json FILE`` writes the rows in frod-bench's results format
(machine, versions, date and command beside them), so ``frod-bench --summarize FILE`` prints them again.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

import torch

from . import init
from .common import environment
from .sizes import DTYPES


def _worker(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    model = init.llama(args.hidden, args.layers, DTYPES[args.dtype])
    row, tensors, _ = init.measure(args._worker, args._route, model, args.repeats, args.sparse_rate, args.seed,
                                   args._cache_dir, fill_cache=False, own_process=True)
    torch.save({"row": row, "tensors": init.to_cpu(tensors) if args._keep else None}, args._out)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m frod_kernels.bench.init_cli", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=1024, help="model width (default 1024)")
    p.add_argument("--layers", type=int, default=16, help="decoder layers (default 16)")
    p.add_argument("--device", default="cpu", help="build_projections' route: cpu (default) or cuda; PEFT always "
                   "sets up on the CPU")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="the model's dtype (default float32)")
    p.add_argument("--sparse-rate", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0, help="projection_prng_key")
    p.add_argument("--methods", nargs="+", default=list(init.METHODS), choices=init.METHODS)
    p.add_argument("--repeats", type=int, default=1, help="timed setups per method (default 1)")
    p.add_argument("--threads", type=int, default=None, help="torch threads in every setup (default torch's)")
    p.add_argument("--eigen-check", action="store_true",
                   help="also hold every V to a float64 reference of PEFT's eigenproblem (slow: float64 QR)")
    p.add_argument("--in-process", action="store_true", help="every method in this process (no peak memory)")
    p.add_argument("--timeout", type=float, default=900, help="seconds a method's process may take (default 900)")
    p.add_argument("--json", help="write the rows here, in frod-bench's results format")
    for hidden in ("--_worker", "--_route", "--_out", "--_cache-dir"):
        p.add_argument(hidden, help=argparse.SUPPRESS)
    p.add_argument("--_keep", action="store_true", help=argparse.SUPPRESS)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = parser()
    args = p.parse_args(argv)
    if args._worker:
        _worker(args)
        return 0
    for name in ("hidden", "layers", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name}: expected a positive integer, got {getattr(args, name)}")
    if not 0.0 <= args.sparse_rate <= 1.0:
        p.error(f"--sparse-rate: expected a fraction in [0, 1], got {args.sparse_rate}")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        p.error(f"--device: expected cpu, cuda or cuda:N, got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device: got {args.device!r} but torch sees no CUDA device")

    from .progress import Printer
    from .report import init_table

    methods = [(m, args.device if m.startswith("frod_kernels") else "cpu") for m in args.methods]
    printer = Printer(len(methods))
    try:
        rows = init.run_methods(methods, args.hidden, args.layers, DTYPES[args.dtype], args.repeats,
                                args.sparse_rate, args.seed, args.eigen_check, not args.in_process, args.threads,
                                printer, {"timeout_s": args.timeout})
    finally:
        printer.close()
    print("\n" + init_table(rows))
    if args.json:
        results = {"environment": environment(device, argv), "suites": {"init": rows}}
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1, default=str)
        print(f"wrote {args.json}")
    return 1 if any(r.get("error") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
