"""Init suite: projection setup (V per category, U and lambda_l per layer, the sparse pattern) of a Llama-shaped
model with FRoD on ``q_proj`` (square) and ``v_proj`` (quarter width), method by method:

* ``peft``: PEFT's ``get_peft_model(model, FrodConfig(...))``, wrapping included (small next to its decompositions);
* ``peft_enabled``, ``peft_enabled_cached``: the same call under ``frod_kernels.peft.enable()``, what a PEFT user
  gets;
* ``frod_kernels``, ``frod_kernels_fast``, ``frod_kernels_cached``: :func:`frod_kernels.projections.
  build_projections` on the same weights, on a route (the CPU, or CUDA): the exact route (PEFT's V bitwise on the
  CPU), ``method="fast"`` (V an eigenbasis of PEFT's problem, not PEFT's tensor), the exact route read from the
  cache.

A cached method times a second setup: a first, untimed one fills a temporary projection cache (never the user's)
and ``bitwise_same_as_first`` says whether the timed setup's tensors equal the first's bitwise. The other methods
run with the cache off. Each PEFT setup starts from a fresh copy of the model.

When more than one method runs, each row holds ``U diag(lambda_l) V^T`` against each base weight
(:func:`reconstruction`) and, when PEFT ran too, is compared with PEFT's tensors (:func:`compare`): the pattern
exactly, V, U and lambda_l bitwise and by relative difference (V's and U's column signs aligned with PEFT's first:
eigh may choose either; the fast and CUDA routes differ beyond that inside near-equal eigenvalues).
``eigen_check`` also holds every V, PEFT's included, against a float64 reference of PEFT's eigenproblem
(:func:`frod_kernels.reference.eigenbasis_error`).

``frod-bench --suite init`` runs the methods in its own process, ``init_repeats`` times each.
``python -m frod_kernels.bench.init_cli`` (also ``bench/init_projections.py``) runs each in a fresh process of its
own by default, so its peak memory is its own and a cached method's first setup is another process's.
"""

from __future__ import annotations

import copy
import gc
import os
import subprocess
import sys
import tempfile
from typing import Optional

import torch
from torch import nn

from frod_kernels.reference import (
    eigenbasis_error,
    reference_frod_eigenproblem,
    rel_err,
)

from .._numerics import dtype_name
from . import peft_models
from .common import (
    Quiet,
    host_ms,
    measure_interleaved,
    process_memory_bytes,
    synchronize,
)
from .sizes import Sizes

METHODS = ("peft", "peft_enabled", "peft_enabled_cached", "frod_kernels", "frod_kernels_fast", "frod_kernels_cached")
PEFT_METHODS = ("peft", "peft_enabled", "peft_enabled_cached")
CACHED = ("peft_enabled_cached", "frod_kernels_cached")
TENSORS = ("V", "s_indices", "U", "lambda_l")


def label(method: str, route: str = "cpu") -> str:
    """A method's row name."""
    if method in PEFT_METHODS:
        return ("PEFT get_peft_model(FrodConfig)" if method == "peft" else
                "PEFT get_peft_model + frod_kernels.peft.enable()" + (", cached" if method in CACHED else ""))
    detail = {"frod_kernels": "", "frod_kernels_fast": ", fast", "frod_kernels_cached": ", cached"}[method]
    return f"frod_kernels build_projections ({route}{detail})"


def llama(hidden: int, layers: int, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The Llama-shaped model: 64-wide heads, a quarter as many key/value heads (v_proj a quarter as wide as
    q_proj, as in Llama 3 8B); a tiny MLP and vocabulary, since only q_proj and v_proj are set up."""
    cfg = dict(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=64, vocab_size=64, seq=1,
               num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 256))
    return peft_models.llama(cfg, dtype, torch.device("cpu")).eval()


def target_weights(model: nn.Module) -> dict:
    """Module key -> weight of the modules FRoD adapts, in ``named_modules()`` order (as PEFT visits them)."""
    return {k: m.weight.detach() for k, m in model.named_modules()
            if isinstance(m, nn.Linear) and k.rsplit(".", 1)[-1] in peft_models.TARGETS}


def _peft_tensors(peft_model) -> dict:
    base = peft_model.base_model
    out = {"V": {c: d["default"] for c, d in base.frod_V.items()},
           "s_indices": {c: d["default"] for c, d in base.frod_s_indices.items()}, "U": {}, "lambda_l": {}}
    for key, module in base.model.named_modules():
        if "default" in (getattr(module, "frod_U", None) or {}):
            out["U"][key], out["lambda_l"][key] = module.frod_U["default"], module.frod_lambda_l["default"]
    return out


def _setup(method: str, route: str, sparse_rate: float, seed: int, cache):
    """(setup(model) -> tensors, whether it needs a fresh copy of the model each time)."""
    if method in PEFT_METHODS:
        import frod_kernels.peft as fkp

        def peft_setup(model):
            if method != "peft":
                fkp.enable(cache=cache)
            try:
                return _peft_tensors(peft_models.wrap(model, peft_models.frod_config(peft_models.TARGETS,
                                                                                     sparse_rate, seed)))
            finally:
                if method != "peft":
                    fkp.disable()  # later setups and suites time PEFT itself

        return peft_setup, True
    from frod_kernels.projections import build_projections

    def fk_setup(model):
        projections = build_projections(target_weights(model), sparse_rate=sparse_rate, projection_prng_key=seed,
                                        progressbar=False, device=route,
                                        method="fast" if method == "frod_kernels_fast" else "exact", cache=cache)
        return {"V": {c: p.V for c, p in projections.items()}, "s_indices": {c: p.s_indices for c, p in
                                                                              projections.items()},
                "U": {k: u for p in projections.values() for k, u in p.U.items()},
                "lambda_l": {k: v for p in projections.values() for k, v in p.lambda_l.items()}}

    return fk_setup, False


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="utf-8") as f:  # "5": VmHWM back to VmRSS (Linux >= 4.0)
            f.write("5")
        return True
    except OSError:
        return False


def measure(method: str, route: str, model: nn.Module, repeats: int, sparse_rate: float = 0.01, seed: int = 0,
            cache_dir: str | None = None, fill_cache: bool = True, own_process: bool = False) -> tuple[dict, dict,
                                                                                                     dict | None]:
    """Time ``repeats`` setups by ``method`` on ``route`` in this process: (row fields, the last setup's tensors,
    the cache-filling setup's tensors on the CPU or None). A cached method reads ``cache_dir``, filled first here
    when ``fill_cache``. ``own_process``: this process runs nothing else, so the rise of its RSS high-water mark
    over the setups is their peak memory."""
    setup, needs_copy = _setup(method, route, sparse_rate, seed, cache_dir if method in CACHED else False)
    on_gpu = torch.device(route).type == "cuda"
    row, state = {}, {"setups": 0}

    def synchronized_ms(fn, device: torch.device) -> float:
        return host_ms(lambda: (fn(), synchronize(device)), device)

    def prepare() -> None:  # untimed: the last result freed, a fresh model for PEFT to wrap
        setups = state["setups"]
        state.clear()
        gc.collect()
        # a worker's model is its own: its first setup wraps it in place, as a user's would, with no copy in the
        # peak memory
        fresh = needs_copy and (setups > 0 or not own_process)
        state.update(setups=setups + 1, model=copy.deepcopy(model) if fresh else model)

    def run() -> None:
        state["tensors"] = setup(state["model"])

    first = None
    if method in CACHED and fill_cache:
        prepare()
        row["first_setup_ms"] = synchronized_ms(run, torch.device(route))
        first = to_cpu(state["tensors"])
    # other load slows multi-threaded LAPACK badly (its barriers wait for a core): says how far to trust a time
    row["load_avg_before"] = os.getloadavg()[0]
    rss0, reset = process_memory_bytes("VmRSS"), own_process and _reset_peak_rss()
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    stats = measure_interleaved({method: run}, torch.device(route), repeats, 0, synchronized_ms, {method: prepare})
    row.update(stats[method], threads=torch.get_num_threads())
    if reset and rss0 is not None:
        row["peak_extra_bytes"] = process_memory_bytes("VmHWM") - rss0
    if on_gpu:
        row["gpu_peak_bytes"] = torch.cuda.max_memory_allocated()
    if method in CACHED and cache_dir:
        row["cache_bytes"] = sum(e.stat().st_size for e in os.scandir(cache_dir) if e.is_file())
    return row, state["tensors"], first


def to_cpu(tensors: dict) -> dict:
    return {name: {k: t.detach().cpu() for k, t in tensors[name].items()} for name in TENSORS}


def bitwise_same(a: dict, b: dict) -> bool:
    return all(a[name].keys() == b[name].keys() and all(torch.equal(a[name][k], b[name][k]) for k in a[name])
               for name in TENSORS)


def _category(key: str) -> str:
    from frod_kernels.projections import category_from_key

    return category_from_key(key)


def reconstruction(got: dict, weights: dict) -> dict:
    """How well ``U diag(lambda_l) V^T`` rebuilds each base weight: the worst relative error."""
    return {"reconstruction_max_rel": max(rel_err((got["U"][k] * got["lambda_l"][k]) @ got["V"][_category(k)].T, w)
                                          for k, w in weights.items())}


def compare(ref: dict, got: dict) -> dict:
    """How ``got`` differs from PEFT's tensors ``ref``, V's and U's column signs aligned with PEFT's first (both
    cast to PEFT's dtype: PEFT stores them in the weight's)."""
    V = {c: got["V"][c].to(ref["V"][c].dtype) for c in ref["V"]}
    sign = {c: torch.where((V[c] * ref["V"][c]).sum(0) < 0, -1.0, 1.0).to(V[c].dtype) for c in V}
    U = {k: got["U"][k].to(ref["U"][k].dtype) for k in ref["U"]}
    return {"same_pattern": all(torch.equal(ref["s_indices"][c], got["s_indices"][c]) for c in ref["s_indices"]),
            "V_bitwise": all(torch.equal(V[c], ref["V"][c]) for c in V),
            "V_columns_flipped": int(sum(int((s < 0).sum()) for s in sign.values())),
            "rel_diff_V": max(rel_err(V[c] * sign[c], ref["V"][c]) for c in V),
            "U_bitwise": all(torch.equal(U[k], ref["U"][k]) for k in U),
            "rel_diff_U": max(rel_err(U[k] * sign[_category(k)], ref["U"][k]) for k in U),
            "lambda_bitwise": all(torch.equal(got["lambda_l"][k], ref["lambda_l"][k]) for k in ref["lambda_l"]),
            "rel_diff_lambda_l": max(rel_err(got["lambda_l"][k], ref["lambda_l"][k]) for k in ref["lambda_l"])}


def eigen_errors(V: dict, weights: dict, regularization_alpha: float = 1e-3) -> dict:
    """The worst category's :func:`frod_kernels.reference.eigenbasis_error` of each measure, ``eigen_`` prefixed."""
    out: dict = {}
    for cat, v in V.items():
        keys = [k for k in weights if _category(k) == cat]  # named_modules() order: layer by layer
        R, T = reference_frod_eigenproblem([weights[k] for k in keys], regularization_alpha)
        for measure_, value in eigenbasis_error(v, R, T).items():
            out["eigen_" + measure_] = max(out.get("eigen_" + measure_, 0.0), value)
    return out


def measure_in_subprocess(method: str, route: str, hidden: int, layers: int, dtype: torch.dtype, repeats: int,
                          sparse_rate: float, seed: int, threads: Optional[int], cache_dir: Optional[str],
                          keep: bool, timeout_s: float = 900):
    """:func:`measure` in a fresh process (``python -m frod_kernels.bench.init_cli``'s worker; a cached method's
    filling setup in another one before it):
    (row fields, tensors or None unless ``keep`` or cached, the filling setup's tensors or None)."""
    with tempfile.TemporaryDirectory(prefix="frod-bench-init-") as tmp:
        def worker(out: str, fill: bool) -> dict:
            cmd = [sys.executable, "-m", "frod_kernels.bench.init_cli", "--_worker", method, "--_route", route,
                   "--hidden", str(hidden),
                   "--layers", str(layers), "--dtype", dtype_name(dtype), "--repeats", str(1 if fill else repeats),
                   "--sparse-rate", str(sparse_rate), "--seed", str(seed), "--_out", out]
            cmd += ["--threads", str(threads)] if threads else []
            cmd += ["--_cache-dir", cache_dir] if cache_dir else []
            cmd += ["--_keep"] if keep or cache_dir else []
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
            if proc.returncode != 0:
                last = proc.stderr.strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
                raise RuntimeError(f"the {'filling ' if fill else ''}worker failed: {last[0]}")
            return torch.load(out)

        first = None
        if cache_dir:
            filled = worker(os.path.join(tmp, "first.pt"), True)
            first = filled["tensors"]
        timed = worker(os.path.join(tmp, "timed.pt"), False)
        fields = timed["row"]
        if cache_dir:
            fields["first_setup_ms"] = filled["row"]["median_ms"]
        return fields, timed["tensors"], first


def run_methods(methods: list[tuple[str, str]], hidden: int, layers: int, dtype: torch.dtype = torch.float32,
                repeats: int = 1, sparse_rate: float = 0.01, seed: int = 0, eigen_check: bool = False,
                isolate: bool = False, threads: int | None = None, progress=None, worker_options=None) -> list[dict]:
    """One row per (method, route), PEFT's first when it runs (the others are compared with it).

    ``isolate``: each setup in a fresh process (:mod:`.init_cli`), a cached method's first setup in another one;
    ``worker_options``: that module's extra options (timeout). ``threads``: torch threads for every setup (one
    thread measures the work itself, free of the waits that other load causes at LAPACK's thread barriers).
    """
    import tempfile


    progress = progress or Quiet()
    methods = sorted(methods, key=lambda m: m[0] != "peft")
    keep = len(methods) > 1 or eigen_check  # U of every layer is gigabytes at 8B shapes: kept only to compare
    # an 8B-shaped model takes a minute to build: here only when a setup runs here or something compares
    model = llama(hidden, layers, dtype) if keep or not isolate else None
    weights = {} if model is None else target_weights(model)
    base = {"suite": "init", "dtype": dtype_name(dtype), "model": "llama", "hidden_size": hidden,
            "num_hidden_layers": layers, "adapted_layers": layers * len(peft_models.TARGETS),
            "sparse_rate": sparse_rate, "projection_prng_key": seed}
    rows, peft = [], None
    saved_threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="frod-bench-cache-") as tmp:
        for method, route in methods:
            progress.start(f"init {label(method, route)}")
            row = dict(base, method=label(method, route), key=method, route=route)
            cache_dir = os.path.join(tmp, f"{method}-{route}") if method in CACHED else None
            try:
                if isolate:
                    fields, tensors, first = measure_in_subprocess(
                        method, route, hidden, layers, dtype, repeats, sparse_rate, seed, threads, cache_dir,
                        keep, **(worker_options or {}))
                else:
                    if threads:
                        torch.set_num_threads(threads)
                    fields, tensors, first = measure(method, route, model, repeats, sparse_rate, seed, cache_dir)
                    tensors = to_cpu(tensors)
                row.update(fields)
                if first is not None:
                    row["bitwise_same_as_first"] = bitwise_same(first, tensors)
                if keep and tensors is not None:
                    row.update(reconstruction(tensors, weights))
                    if method == "peft":
                        peft = tensors
                    elif peft is not None:
                        row.update(compare(peft, tensors))
                    if eigen_check:
                        row.update(eigen_errors(tensors["V"], weights))
            except Exception as e:  # reported in its row; the other methods still run
                row["error"] = f"{type(e).__name__}: {e}"
            finally:
                torch.set_num_threads(saved_threads)
            tensors = first = None
            rows.append(row)
            peft_ms = rows[0].get("median_ms") if rows[0]["key"] == "peft" else None
            if peft_ms and row.get("median_ms"):
                row["speedup_vs_peft"] = peft_ms / row["median_ms"]
            progress.done(row)
    return rows


def n_steps(sizes: Sizes, device: torch.device) -> int:
    return len(suite_methods(device))


def suite_methods(device: torch.device) -> list[tuple[str, str]]:
    return [(m, "cpu") for m in METHODS] + ([("frod_kernels", "cuda")] if device.type == "cuda" else [])


def run(sizes: Sizes, device: torch.device, progress) -> list[dict]:
    hidden, layers = sizes.init_model
    return run_methods(suite_methods(device), hidden, layers, sizes.dtype, sizes.init_repeats, progress=progress)
