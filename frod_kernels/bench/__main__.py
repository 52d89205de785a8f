"""``frod-bench`` / ``python -m frod_kernels.bench``: how much faster frod-kernels makes FRoD here, and that it
computes the same thing.

    frod-bench                              # all suites, sizes picked for this machine
    frod-bench --suite layer,check --out bench_out
    frod-bench --suite overhead,kernels     # host time per call; each kernel-family op per backend
    frod-bench --full --out "$OUT"          # the GPU shapes of bench/gpu_check.sh
    frod-bench --summarize "$OUT/results.json" --markdown   # the README's tables, from an earlier run

Each suite prints its rows as they finish, then its table. Exit status: 0 when every suite ran and every backend
passed the checks; 1 when the check failed, a kernel gave a wrong result or a method raised (the tables and the
message at the end name which); 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Optional

import torch

SUITES = ("check", "overhead", "kernels", "layer", "train", "init")
MEMORY_NOTE = ("layer: peak bytes allocated during one forward+backward above what was allocated when it began; "
               "train: absolute, resident (model, adapter, optimizer state) plus the step's peak above it. CUDA: "
               "the caching allocator's counters; CPU: torch's CPU allocator (torch.profiler memory events), not "
               "library-internal scratch; the process RSS high-water mark is in environment.")


def _shape(spec: str) -> tuple[int, int]:
    try:
        a, b = spec.lower().split("x")
        shape = int(a), int(b)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shapes: expected IN x OUT like 4096x1024, got {spec!r}") from None
    if min(shape) < 2:
        raise argparse.ArgumentTypeError(f"--shapes: expected sizes >= 2, got {spec!r}")
    return shape


def _ints(spec: str) -> list[int]:
    try:
        vals = [int(v) for v in spec.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--tokens: expected a comma list of integers, got {spec!r}") from None
    if min(vals) < 1:
        raise argparse.ArgumentTypeError(f"--tokens: expected positive token counts, got {spec!r}")
    return vals


def parser() -> argparse.ArgumentParser:
    import frod_kernels

    from .sizes import DTYPES, PRESETS

    p = argparse.ArgumentParser(prog="frod-bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"frod-bench (frod-kernels) {frod_kernels.__version__}")
    p.add_argument("--suite", default=",".join(SUITES),
                   help=f"comma list of suites to run, from {', '.join(SUITES)} (default: all)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="compute dtype (default: the size preset's)")
    p.add_argument("--sizes", choices=sorted(PRESETS),
                   help="size preset: tiny (seconds), cpu (default without a GPU), gpu (default with one), full")
    p.add_argument("--full", action="store_true", help="the full GPU shapes (bf16, 4096->4096, 4096->1024, "
                   "14336->4096, tokens 1..16384, a ~1B Llama): same as --sizes full")
    p.add_argument("--shapes", type=lambda s: [_shape(v) for v in s.split(",")],
                   help="layer shapes IN x OUT, comma separated, e.g. 1024x1024,4096x1024 (overrides the preset)")
    p.add_argument("--tokens", type=_ints, help="layer token counts, e.g. 8,512,2048 (overrides the preset)")
    p.add_argument("--all-paths", action="store_true",
                   help="layer suite: also time frod_linear under each forced engine path (sparse, factored, "
                        "materialized), the data that calibrates the cost model")
    p.add_argument("--repeats", type=int, help="timed repeats per measurement, the overhead suite's calls per "
                   "method included (default: the preset's)")
    p.add_argument("--out", help="folder for results.json, summary.txt (the short table) and the PNG plots")
    p.add_argument("--summarize", metavar="RESULTS_JSON",
                   help="print the short table of an earlier run's results.json and exit (runs nothing)")
    p.add_argument("--markdown", action="store_true", help="with --summarize: GitHub-flavoured tables (README)")
    p.add_argument("--plot", metavar="RESULTS_JSON",
                   help="redraw the PNG plots of an earlier run's results.json beside it and exit")
    return p


def resolve_sizes(args: argparse.Namespace, device: torch.device):
    from .sizes import DTYPES, PRESETS

    name = "full" if args.full else args.sizes or ("gpu" if device.type == "cuda" else "cpu")
    sizes = dataclasses.replace(PRESETS[name])
    if args.dtype:
        sizes.dtype = DTYPES[args.dtype]
    if args.shapes:
        sizes.layer_shapes = args.shapes
    if args.tokens:
        sizes.layer_tokens = args.tokens
    sizes.all_paths = args.all_paths
    if args.repeats is not None:
        if args.repeats < 1:
            raise ValueError(f"--repeats: expected a positive count, got {args.repeats}")
        sizes.repeats = sizes.overhead_repeats = args.repeats
    return sizes


def _save(results: dict, out: str) -> None:
    os.makedirs(out, exist_ok=True)
    tmp = os.path.join(out, "results.json.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1, default=str)
    os.replace(tmp, os.path.join(out, "results.json"))


def _load(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            results = json.load(f)
    except (OSError, ValueError) as e:
        raise SystemExit(f"frod-bench: cannot read results {path!r}: {e}") from None
    if not isinstance(results, dict) or not {"environment", "suites"} <= results.keys():
        raise SystemExit(f"frod-bench: {path!r} is not a frod-bench results file (it has no 'environment' and "
                         "'suites'; bench/init_projections.py wrote another format before 2026-12-03)")
    return results


def _from_file(summarize: Optional[str], plot: Optional[str], markdown: bool) -> int:
    from . import report

    if summarize:
        print(report.summary(_load(summarize), markdown))
    if plot:
        from .plots import plot_all

        for w in plot_all(_load(plot), os.path.dirname(os.path.abspath(plot))):
            print(f"wrote {w}")
    return 0


def _problems(suite: str, rows: list[dict]) -> list[str]:
    from .report import row_line

    if suite == "check":  # CheckFailed names its failures
        return []
    return [row_line(r) for r in rows if r.get("error") or r.get("ok") is False]


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = parser()
    args = p.parse_args(argv)
    if args.markdown and not args.summarize:
        p.error("--markdown: formats the tables that --summarize RESULTS_JSON prints; it needs --summarize (a run "
                "prints terminal tables; render its results.json afterwards)")
    if args.summarize or args.plot:
        return _from_file(args.summarize, args.plot, args.markdown)
    suites = [s.strip() for s in args.suite.split(",") if s.strip()]
    bad = [s for s in suites if s not in SUITES]
    if bad or not suites:
        p.error(f"--suite: expected a comma list from {', '.join(SUITES)}, got {args.suite!r}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device: got {args.device!r} but torch sees no CUDA device")
    try:
        sizes = resolve_sizes(args, device)
    except ValueError as e:
        p.error(str(e))

    from .. import roofline
    from .._numerics import dtype_name
    from . import check, init, kernels, layer, overhead, report, train
    from .common import (
        copy_bandwidth,
        environment,
        matmul_peak_tflops,
        process_memory_bytes,
    )
    from .progress import Printer

    modules = {"check": check, "overhead": overhead, "kernels": kernels, "layer": layer, "train": train,
               "init": init}
    results = {"environment": environment(device, argv), "sizes": dataclasses.asdict(sizes), "suites": {},
               "memory_note": MEMORY_NOTE}
    print(f"frod-bench on {results['environment']['device_name']} ({device}), sizes {sizes.name}, "
          f"{dtype_name(sizes.dtype)}, suites {', '.join(suites)}", file=sys.stderr)
    peak = gpu = None
    if device.type == "cuda" and {"layer", "kernels"} & set(suites):
        # every GPU row is read against this device's own measured copy bandwidth (and matmul peak)
        results["copy_bandwidth"] = copy_bandwidth(device)
    if "layer" in suites:
        results["matmul_peak"] = matmul_peak_tflops(device, sizes.dtype)
        peak = results["matmul_peak"]["tflops"]
        if device.type == "cuda":
            gpu = roofline.GPU(results["environment"]["device_name"], results["copy_bandwidth"]["bytes_per_s"],
                               {dtype_name(sizes.dtype): peak * 1e12})
    progress = Printer(sum(modules[s].n_steps(sizes, device) for s in suites))
    problems = []
    try:
        for suite in suites:
            progress.write(f"\n== {suite} ==")
            try:
                if suite == "layer":
                    rows = layer.run(sizes, device, peak, progress, gpu)
                elif suite == "kernels":
                    rows = kernels.run(sizes, device, progress,
                                       results.get("copy_bandwidth", {}).get("bytes_per_s"))
                else:
                    rows = modules[suite].run(sizes, device, progress)
            except check.CheckFailed as e:
                rows = e.rows
                problems.append(str(e))
            problems += _problems(suite, rows)
            results["suites"][suite] = rows
            progress.write("\n" + report.suite_table(suite, rows, device.type == "cuda"))
            if args.out:
                _save(results, args.out)
    finally:
        progress.close()
    results["environment"]["rss_high_water_mark_bytes"] = process_memory_bytes("VmHWM")
    from ..autotune import explain

    results["autotune"] = explain()  # what "auto" ran in every suite, and why
    goals = report.targets(results)
    if goals:
        print("\ntargets:\n" + "\n".join("  " + g for g in goals))
    if args.out:
        _save(results, args.out)
        with open(os.path.join(args.out, "summary.txt"), "w", encoding="utf-8") as f:
            f.write(report.summary(results) + "\n")
        try:
            from .plots import plot_all

            written = plot_all(results, args.out)
        except ImportError as e:
            written = []
            print(f"\nno plots: matplotlib is missing ({e}); pip install 'frod-kernels[bench]'", file=sys.stderr)
        print(f"\nwrote {os.path.join(args.out, 'results.json')}" + "".join(f"\nwrote {w}" for w in written))
    if problems:
        print("\n" + "\n".join(problems), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
