"""Projection setup, side by side: PEFT's ``get_peft_model(model, FrodConfig(...))`` against
``frod_kernels.projections.build_projections`` on the same Llama-shaped model (FRoD on ``q_proj``, square, and
``v_proj``, quarter width), each method in its own subprocess so its peak memory (VmHWM, reset before setup) is its
own. ``frod_kernels`` is the exact route (PEFT's V bitwise), ``frod_kernels_fast`` the fast one
(``method="fast"``: V an eigenbasis of PEFT's problem but not PEFT's tensor, for saved projections).
``frod_kernels_cached`` and ``peft_enabled_cached`` (``get_peft_model`` under ``frod_kernels.peft.enable()``) time a
second setup: a first process fills a temporary projection cache, a second one (timed) reads it, and the two
processes' tensors must be bitwise the same. The other methods run with the cache off. Then the
results are compared: ``s_indices`` exactly, ``V``/``U``/``lambda_l`` element-wise (columns' signs aligned with
PEFT's first: eigh may choose either), ``U diag(lambda_l) V^T`` against each base weight, and (``--eigen-check``)
every V, PEFT's included, against a float64 reference of PEFT's eigenproblem, in measures that no free choice of
eigh changes (:func:`frod_kernels.reference.eigenbasis_error`).

    python bench/init_projections.py                       # width 1024, 16 layers (about a minute on 2 cores)
    python bench/init_projections.py --hidden 2048         # the issue's target size
    python bench/init_projections.py --hidden 2048 --methods peft frod_kernels frod_kernels_cached peft_enabled_cached
    python bench/init_projections.py --device cuda --hidden 4096 --layers 32 --methods frod_kernels

``bench_init(...)`` returns the same numbers as a dict (frod-bench's init suite calls it).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

METHODS = ("peft", "frod_kernels", "frod_kernels_fast", "frod_kernels_cached", "peft_enabled_cached")
CACHED = ("frod_kernels_cached", "peft_enabled_cached")
TARGETS = ("q_proj", "v_proj")


def _model(hidden: int, layers: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    # Only q_proj/v_proj matter: a tiny MLP and vocabulary keep the model's own memory and build time small.
    cfg = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                      num_key_value_heads=max(1, hidden // 256), intermediate_size=64, vocab_size=64)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:  # "5" resets VmHWM to the current RSS (Linux >= 4.0)
            f.write("5")
        return True
    except OSError:
        return False


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def _worker(method: str, hidden: int, layers: int, device: str | None, sparse_rate: float, seed: int,
            out_path: str, threads: int | None = None, keep_tensors: bool = True, cache_dir: str | None = None) -> None:
    """One method's setup in this (fresh) process; writes its timing, peak memory and (``keep_tensors``) its
    tensors to ``out_path``. ``cache_dir``: the projection cache of the cached methods (the others run without)."""
    import warnings

    import torch
    from peft import FrodConfig, get_peft_model

    import frod_kernels.peft as fkp
    from frod_kernels.projections import build_projections

    if threads:
        torch.set_num_threads(threads)
    model = _model(hidden, layers)
    rss0 = _status_kib("VmRSS")
    reset = _reset_peak()
    t0 = time.perf_counter()
    if method in ("peft", "peft_enabled_cached"):
        if method == "peft_enabled_cached":
            fkp.enable(cache=cache_dir)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = get_peft_model(model, FrodConfig(target_modules=list(TARGETS), sparse_rate=sparse_rate,
                                                  projection_prng_key=seed, progressbar=False))
        elapsed = time.perf_counter() - t0
        base = pm.base_model
        V = {c: base.frod_V[c]["default"] for c in base.frod_V}
        S = {c: base.frod_s_indices[c]["default"] for c in base.frod_s_indices}
        U, L = {}, {}
        for name, mod in pm.named_modules():
            frod_u = getattr(mod, "frod_U", None)
            if frod_u is not None and "default" in frod_u:
                key = name.removeprefix("base_model.model.")
                U[key], L[key] = frod_u["default"], mod.frod_lambda_l["default"].detach()
    else:
        weights = {k: m.weight for k, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and k.rsplit(".", 1)[-1] in TARGETS}
        projs = build_projections(weights, sparse_rate=sparse_rate, projection_prng_key=seed, progressbar=False,
                                  device=device, method="fast" if method == "frod_kernels_fast" else "exact",
                                  cache=cache_dir if method in CACHED else False)
        if device is not None and torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        V = {c: p.V for c, p in projs.items()}
        S = {c: p.s_indices for c, p in projs.items()}
        U = {k: u for p in projs.values() for k, u in p.U.items()}
        L = {k: l for p in projs.values() for k, l in p.lambda_l.items()}
    peak = _status_kib("VmHWM")
    on_gpu = device is not None and torch.device(device).type == "cuda"
    report = {"seconds": elapsed, "peak_extra_mib": (peak - rss0) / 1024 if reset else None,
              "peak_rss_mib": peak / 1024, "threads": torch.get_num_threads(),
              "gpu_peak_mib": torch.cuda.max_memory_allocated() / 2**20 if on_gpu else None}
    if keep_tensors:
        report.update(V=V, s_indices=S, U=U, lambda_l=L)
    torch.save(report, out_path)


def _compare(ref: dict, got: dict, weights: dict) -> dict:
    import torch

    from frod_kernels.reference import rel_err

    # eigh's sign of each column is free: align with PEFT's before comparing (U's columns flip with V's)
    sign = {c: torch.where((got["V"][c] * ref["V"][c]).sum(0) < 0, -1.0, 1.0) for c in ref["V"]}
    out = {"s_indices_equal": all(torch.equal(ref["s_indices"][c], got["s_indices"][c]) for c in ref["s_indices"]),
           "V_bitwise": all(torch.equal(ref["V"][c], got["V"][c]) for c in ref["V"]),
           "V_columns_flipped": int(sum((s < 0).sum() for s in sign.values())),
           "V_max_rel": max(rel_err(got["V"][c] * sign[c], ref["V"][c]) for c in ref["V"]),
           "U_bitwise": all(torch.equal(ref["U"][k], got["U"][k]) for k in ref["U"]),
           "U_max_rel": max(rel_err(got["U"][k] * sign[_category(k)], ref["U"][k]) for k in ref["U"]),
           "lambda_bitwise": all(torch.equal(ref["lambda_l"][k], got["lambda_l"][k]) for k in ref["lambda_l"]),
           "lambda_max_rel": max(rel_err(got["lambda_l"][k], ref["lambda_l"][k]) for k in ref["lambda_l"])}
    recon = 0.0
    for key, w in weights.items():
        V = got["V"][_category(key)]
        recon = max(recon, rel_err((got["U"][key] * got["lambda_l"][key]) @ V.T, w))
    out["reconstruction_max_rel"] = recon
    return out


def _bitwise_same(a: dict, b: dict) -> bool:
    import torch

    return all(a[name].keys() == b[name].keys() and all(torch.equal(a[name][k], b[name][k]) for k in a[name])
               for name in ("V", "s_indices", "U", "lambda_l"))


def _cache_bytes(directory: str) -> int:
    return sum(e.stat().st_size for e in os.scandir(directory) if e.is_file())


def _eigen_check(tensors: dict, weights: dict) -> dict:
    from frod_kernels.reference import eigenbasis_error, reference_frod_eigenproblem

    out: dict = {m: {} for m in tensors}
    for cat in next(iter(tensors.values()))["V"]:
        keys = sorted((k for k in weights if _category(k) == cat), key=lambda k: int(k.split(".")[2]))
        R, T = reference_frod_eigenproblem([weights[k] for k in keys], 1e-3)
        for method, t in tensors.items():
            for measure, value in eigenbasis_error(t["V"][cat], R, T).items():
                out[method][measure] = max(out[method].get(measure, 0.0), value)
    return out


def _category(key: str) -> str:
    from frod_kernels.projections import category_from_key

    return category_from_key(key)


def bench_init(hidden: int = 1024, layers: int = 16, device: str | None = None, sparse_rate: float = 0.01,
               seed: int = 0, methods=METHODS, threads: int | None = None, timeout_s: float = 900,
               eigen_check: bool = False) -> dict:
    """Time each method's projection setup in its own subprocess and compare the tensors.

    Returns ``{"config": ..., "env": ..., "results": {method: {"seconds", "peak_extra_mib", "peak_rss_mib"}},
    "speedup_vs_peft": {method: float}, "parity": {method: {...}}, "eigenbasis_error_vs_float64": ... | None}``
    (parity: each frod_kernels method against PEFT, when both ran, with the reconstruction error of
    ``U diag(lambda_l) V^T`` against the base weights; ``eigen_check``: every method's V against a float64
    reference of PEFT's eigenproblem, the worst category per measure). A cached method's result also has
    ``first_setup_seconds`` (the process that filled the cache, writes included), ``cache_mib`` and
    ``bitwise_same_as_first`` (its tensors against the filling process's). ``threads``: torch threads
    in both workers (default torch's); one thread measures the work itself, free of the waits that other load on
    the machine causes at the thread barriers of multi-threaded LAPACK.
    """
    import torch

    from frod_kernels.bench.common import _cpu_model, _version

    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"methods: expected a subset of {METHODS}, got {sorted(unknown)}")
    results, tensors = {}, {}
    # the tensors (all of U: gigabytes at 8B shapes) travel only when something compares them
    compare = len(methods) > 1 or eigen_check
    with tempfile.TemporaryDirectory() as tmp:
        def run(method: str, path: str, keep: bool, cache_dir: str | None = None):
            cmd = [sys.executable, os.path.abspath(__file__), "--_worker", method, "--hidden", str(hidden),
                   "--layers", str(layers), "--sparse-rate", str(sparse_rate), "--seed", str(seed), "--_out", path]
            if not keep:
                cmd += ["--_no-tensors"]
            if threads:
                cmd += ["--threads", str(threads)]
            if device is not None and method not in ("peft", "peft_enabled_cached"):
                cmd += ["--device", str(device)]
            if cache_dir:
                cmd += ["--_cache-dir", cache_dir]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
            if proc.returncode != 0:
                return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr else f"exit {proc.returncode}"}
            return torch.load(path)

        for method in methods:
            cache_dir = first = None
            if method in CACHED:  # the first setup fills the cache (and is the reference the second must equal)
                cache_dir = os.path.join(tmp, f"cache-{method}")
                first = run(method, os.path.join(tmp, f"{method}-first.pt"), True, cache_dir)
                if "error" in first:
                    results[method] = first
                    continue
            # Other work on a shared machine slows BLAS/LAPACK's threads badly (their barriers wait for a core):
            # the 1-minute load average before each method says how much to trust its time.
            load = os.getloadavg()[0]
            out = run(method, os.path.join(tmp, f"{method}.pt"), compare or first is not None, cache_dir)
            if "error" in out:
                results[method] = out
                continue
            results[method] = {k: out[k] for k in ("seconds", "peak_extra_mib", "peak_rss_mib", "gpu_peak_mib",
                                                   "threads")}
            results[method]["load_avg_before"] = load
            if first is not None:
                results[method].update(first_setup_seconds=first["seconds"],
                                       cache_mib=_cache_bytes(cache_dir) / 2**20,
                                       bitwise_same_as_first=_bitwise_same(first, out))
            if compare:
                tensors[method] = out
    model = _model(hidden, layers) if compare else None
    weights = {} if model is None else {k: m.weight.detach() for k, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and k.rsplit(".", 1)[-1] in TARGETS}
    parity = {m: _compare(tensors["peft"], tensors[m], weights) for m in tensors
              if compare and m != "peft" and "peft" in tensors}
    speedup = {m: results["peft"]["seconds"] / r["seconds"] for m, r in results.items()
               if m != "peft" and "seconds" in r and "seconds" in results.get("peft", {})}
    eigen = _eigen_check(tensors, weights) if eigen_check and tensors else None
    return {
        "config": {"hidden": hidden, "layers": layers, "targets": list(TARGETS), "sparse_rate": sparse_rate,
                   "projection_prng_key": seed, "device": device or "cpu", "threads": threads or "default"},
        "env": {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "torch": torch.__version__, "peft": _version("peft"), "frod_kernels": _version("frod_kernels"),
                "python": platform.python_version(), "cpus": os.cpu_count(), "cpu_model": _cpu_model(),
                "machine": platform.processor() or platform.machine(),
                "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
        "results": results,
        "speedup_vs_peft": speedup,
        "parity": parity,
        "eigenbasis_error_vs_float64": eigen,
    }


def _table(report: dict) -> str:
    cfg, env = report["config"], report["env"]
    lines = [f"projection setup: {cfg['layers']} layers, width {cfg['hidden']}, FRoD on q_proj + quarter-width "
             f"v_proj, sparse_rate {cfg['sparse_rate']}, device {cfg['device']}, threads {cfg['threads']}",
             f"{env['date']}  torch {env['torch']}  {env['cpus']} CPUs  gpu {env['gpu']}",
             f"{'method':<18}{'seconds':>10}{'peak extra MiB':>16}{'peak RSS MiB':>14}{'load before':>13}"]
    for method, r in report["results"].items():
        if "error" in r:
            lines.append(f"{method:<18}  error: {r['error']}")
            continue
        extra = f"{r['peak_extra_mib']:.0f}" if r["peak_extra_mib"] is not None else "n/a"
        gpu = f"  GPU peak {r['gpu_peak_mib']:.0f} MiB" if r.get("gpu_peak_mib") is not None else ""
        lines.append(f"{method:<18}{r['seconds']:>10.2f}{extra:>16}{r['peak_rss_mib']:>14.0f}"
                     f"{r['load_avg_before']:>13.2f}{gpu}")
    for method, r in report["results"].items():
        if "bitwise_same_as_first" in r:
            lines.append(f"{method}: a second setup; the first (filling the cache) took "
                         f"{r['first_setup_seconds']:.2f} s, cache {r['cache_mib']:.0f} MiB, tensors bitwise the "
                         f"first's: {r['bitwise_same_as_first']}")
    for method, speedup in (report["speedup_vs_peft"] or {}).items():
        lines.append(f"{method}: {speedup:.2f}x faster than PEFT")
    for method, parity in (report["parity"] or {}).items():
        lines.append(f"{method} vs PEFT: " + ", ".join(
            f"{k}={v:.2e}" if isinstance(v, float) else f"{k}={v}" for k, v in parity.items()))
    for method, errors in (report["eigenbasis_error_vs_float64"] or {}).items():
        lines.append(f"{method} V vs float64 eigenproblem: " + ", ".join(f"{k}={v:.2e}" for k, v in errors.items()))
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--device", default=None, help="frod_kernels' device (cuda runs the GPU route)")
    ap.add_argument("--sparse-rate", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--threads", type=int, default=None, help="torch threads in both methods (default torch's)")
    ap.add_argument("--eigen-check", action="store_true",
                    help="also hold every V to a float64 reference of PEFT's eigenproblem (slow: float64 QR)")
    ap.add_argument("--json", help="also write the report here")
    ap.add_argument("--_worker", help=argparse.SUPPRESS)
    ap.add_argument("--_out", help=argparse.SUPPRESS)
    ap.add_argument("--_no-tensors", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--_cache-dir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._worker:
        _worker(args._worker, args.hidden, args.layers, args.device, args.sparse_rate, args.seed, args._out,
                args.threads, keep_tensors=not args._no_tensors, cache_dir=args._cache_dir)
        return
    report = bench_init(hidden=args.hidden, layers=args.layers, device=args.device, sparse_rate=args.sparse_rate,
                        seed=args.seed, methods=args.methods, threads=args.threads, eigen_check=args.eigen_check)
    print(_table(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
