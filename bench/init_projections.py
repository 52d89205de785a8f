"""Projection setup, side by side: PEFT's ``get_peft_model(model, FrodConfig(...))`` against
``frod_kernels.projections.build_projections`` on the same Llama-shaped model (FRoD on ``q_proj``, square, and
``v_proj``, quarter width), each method in its own subprocess so its peak memory (VmHWM, reset before setup) is its
own. Then the results are compared: ``s_indices`` exactly, ``V``/``U``/``lambda_l`` element-wise, and
``U diag(lambda_l) V^T`` against each base weight.

    python bench/init_projections.py                       # width 1024, 16 layers (about a minute on 2 cores)
    python bench/init_projections.py --hidden 2048         # the issue's target size
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

METHODS = ("peft", "frod_kernels")
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
            out_path: str, threads: int | None = None) -> None:
    """One method's setup in this (fresh) process; writes its timing, peak memory and tensors to ``out_path``."""
    import warnings

    import torch

    if threads:
        torch.set_num_threads(threads)
    model = _model(hidden, layers)
    rss0 = _status_kib("VmRSS")
    reset = _reset_peak()
    t0 = time.perf_counter()
    if method == "peft":
        from peft import FrodConfig, get_peft_model

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
        from frod_kernels.projections import build_projections

        weights = {k: m.weight for k, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and k.rsplit(".", 1)[-1] in TARGETS}
        projs = build_projections(weights, sparse_rate=sparse_rate, projection_prng_key=seed, progressbar=False,
                                  device=device)
        if device is not None and torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        V = {c: p.V for c, p in projs.items()}
        S = {c: p.s_indices for c, p in projs.items()}
        U = {k: u for p in projs.values() for k, u in p.U.items()}
        L = {k: l for p in projs.values() for k, l in p.lambda_l.items()}
    peak = _status_kib("VmHWM")
    torch.save({"seconds": elapsed, "peak_extra_mib": (peak - rss0) / 1024 if reset else None,
                "peak_rss_mib": peak / 1024, "V": V, "s_indices": S, "U": U, "lambda_l": L,
                "threads": torch.get_num_threads()}, out_path)


def _compare(ref: dict, got: dict, weights: dict) -> dict:
    import torch

    from frod_kernels.reference import rel_err

    out = {"s_indices_equal": all(torch.equal(ref["s_indices"][c], got["s_indices"][c]) for c in ref["s_indices"]),
           "V_bitwise": all(torch.equal(ref["V"][c], got["V"][c]) for c in ref["V"]),
           "V_max_rel": max(rel_err(got["V"][c], ref["V"][c]) for c in ref["V"]),
           "U_bitwise": all(torch.equal(ref["U"][k], got["U"][k]) for k in ref["U"]),
           "U_max_rel": max(rel_err(got["U"][k], ref["U"][k]) for k in ref["U"]),
           "lambda_bitwise": all(torch.equal(ref["lambda_l"][k], got["lambda_l"][k]) for k in ref["lambda_l"]),
           "lambda_max_rel": max(rel_err(got["lambda_l"][k], ref["lambda_l"][k]) for k in ref["lambda_l"])}
    recon = 0.0
    for key, w in weights.items():
        V = got["V"][_category(key)]
        recon = max(recon, rel_err((got["U"][key] * got["lambda_l"][key]) @ V.T, w))
    out["reconstruction_max_rel"] = recon
    return out


def _category(key: str) -> str:
    from frod_kernels.projections import category_from_key

    return category_from_key(key)


def bench_init(hidden: int = 1024, layers: int = 16, device: str | None = None, sparse_rate: float = 0.01,
               seed: int = 0, methods=METHODS, threads: int | None = None, timeout_s: float = 900) -> dict:
    """Time each method's projection setup in its own subprocess and compare the tensors.

    Returns ``{"config": ..., "env": ..., "results": {method: {"seconds", "peak_extra_mib", "peak_rss_mib"}},
    "speedup_vs_peft": float | None, "parity": {...} | None}`` (parity: frod_kernels against PEFT, when both ran;
    with the reconstruction error of ``U diag(lambda_l) V^T`` against the base weights). ``threads``: torch threads
    in both workers (default torch's); one thread measures the work itself, free of the waits that other load on
    the machine causes at the thread barriers of multi-threaded LAPACK.
    """
    import torch

    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"methods: expected a subset of {METHODS}, got {sorted(unknown)}")
    results, tensors = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in methods:
            path = os.path.join(tmp, f"{method}.pt")
            cmd = [sys.executable, os.path.abspath(__file__), "--_worker", method, "--hidden", str(hidden),
                   "--layers", str(layers), "--sparse-rate", str(sparse_rate), "--seed", str(seed), "--_out", path]
            if threads:
                cmd += ["--threads", str(threads)]
            if device is not None and method == "frod_kernels":
                cmd += ["--device", str(device)]
            # Other work on a shared machine slows BLAS/LAPACK's threads badly (their barriers wait for a core):
            # the 1-minute load average before each method says how much to trust its time.
            load = os.getloadavg()[0]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
            if proc.returncode != 0:
                results[method] = {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr else
                                   f"exit {proc.returncode}"}
                continue
            tensors[method] = torch.load(path)
            results[method] = {k: tensors[method][k] for k in ("seconds", "peak_extra_mib", "peak_rss_mib",
                                                               "threads")}
            results[method]["load_avg_before"] = load
    model = _model(hidden, layers)
    weights = {k: m.weight.detach() for k, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and k.rsplit(".", 1)[-1] in TARGETS}
    parity = _compare(tensors["peft"], tensors["frod_kernels"], weights) if len(tensors) == 2 else None
    speedup = None
    if "seconds" in results.get("peft", {}) and "seconds" in results.get("frod_kernels", {}):
        speedup = results["peft"]["seconds"] / results["frod_kernels"]["seconds"]
    return {
        "config": {"hidden": hidden, "layers": layers, "targets": list(TARGETS), "sparse_rate": sparse_rate,
                   "projection_prng_key": seed, "device": device or "cpu", "threads": threads or "default"},
        "env": {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
                "machine": platform.processor() or platform.machine(),
                "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
        "results": results,
        "speedup_vs_peft": speedup,
        "parity": parity,
    }


def _table(report: dict) -> str:
    cfg, env = report["config"], report["env"]
    lines = [f"projection setup: {cfg['layers']} layers, width {cfg['hidden']}, FRoD on q_proj + quarter-width "
             f"v_proj, sparse_rate {cfg['sparse_rate']}, device {cfg['device']}, threads {cfg['threads']}",
             f"{env['date']}  torch {env['torch']}  {env['cpus']} CPUs  gpu {env['gpu']}",
             f"{'method':<14}{'seconds':>10}{'peak extra MiB':>16}{'peak RSS MiB':>14}{'load before':>13}"]
    for method, r in report["results"].items():
        if "error" in r:
            lines.append(f"{method:<14}  error: {r['error']}")
            continue
        extra = f"{r['peak_extra_mib']:.0f}" if r["peak_extra_mib"] is not None else "n/a"
        lines.append(f"{method:<14}{r['seconds']:>10.2f}{extra:>16}{r['peak_rss_mib']:>14.0f}"
                     f"{r['load_avg_before']:>13.2f}")
    if report["speedup_vs_peft"]:
        lines.append(f"speedup vs PEFT: {report['speedup_vs_peft']:.2f}x")
    if report["parity"]:
        lines.append("parity vs PEFT: " + ", ".join(
            f"{k}={v:.2e}" if isinstance(v, float) else f"{k}={v}" for k, v in report["parity"].items()))
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
    ap.add_argument("--json", help="also write the report here")
    ap.add_argument("--_worker", help=argparse.SUPPRESS)
    ap.add_argument("--_out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._worker:
        _worker(args._worker, args.hidden, args.layers, args.device, args.sparse_rate, args.seed, args._out,
                args.threads)
        return
    report = bench_init(hidden=args.hidden, layers=args.layers, device=args.device, sparse_rate=args.sparse_rate,
                        seed=args.seed, methods=args.methods, threads=args.threads)
    print(_table(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
