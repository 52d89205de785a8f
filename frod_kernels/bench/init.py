"""Init suite: projection setup time (V per category, U and lambda_l per layer, the sparse pattern) on the train
suite's Llama-style model, FRoD on ``q_proj``/``v_proj``: PEFT's ``get_peft_model(model, FrodConfig(...))``
against the same call under ``frod_kernels.peft.enable()`` (what a PEFT user gets) and against
:func:`frod_kernels.projections.build_projections` on the same weights (its CPU route, and on a GPU its CUDA route
too).

PEFT's time includes wrapping the modules, which is small next to its decompositions. Each PEFT run starts from a
fresh copy of the model, so nothing carries over. Each frod-kernels row also says how far its V, U and pattern
are from PEFT's (largest relative difference over categories and layers, V's and U's column signs aligned with
PEFT's first): the exact CPU route matches PEFT bitwise, the fast CPU route (``method="fast"``) and the CUDA route
only up to the eigenproblem's conditioning (see :mod:`frod_kernels.projections`); ``bench/init_projections.py
--eigen-check`` holds them to a float64 reference instead.

The "cached" rows time a second setup of the same model: an untimed first one fills a temporary projection cache
(:mod:`frod_kernels.cache`; never the user's), the timed ones read it, and ``bitwise_same_as_uncached`` says
whether their tensors equal the uncached row's bitwise. Every other row runs with the cache off.
"""

from __future__ import annotations

import copy
import gc
import tempfile
import time
from typing import Callable

import torch
from torch import nn

from frod_kernels.reference import rel_err

from . import peft_models
from .common import Sizes, dtype_name, summarize, synchronize

PEFT_INIT = "PEFT get_peft_model(FrodConfig)"
PEFT_ENABLED = "PEFT get_peft_model + frod_kernels.peft.enable()"
PEFT_ENABLED_CACHED = "PEFT get_peft_model + frod_kernels.peft.enable(), cached"


def fk_init(route: str) -> str:
    return f"frod_kernels build_projections ({route})"


def _routes(device: torch.device) -> list[tuple[str, str, str, bool]]:
    """(label, device, method, cached) of each build_projections route to time."""
    return [("cpu", "cpu", "exact", False), ("cpu, fast", "cpu", "fast", False), ("cpu, cached", "cpu", "exact", True)
            ] + ([("cuda", "cuda", "exact", False)] if device.type == "cuda" else [])


def n_steps(sizes: Sizes, device: torch.device) -> int:
    return 3 + len(_routes(device))


def _build_projections():
    try:
        from frod_kernels.projections import build_projections
    except ImportError as e:
        return None, f"frod_kernels.projections.build_projections is not available ({e})"
    return build_projections, None


def target_weights(model: nn.Module) -> dict:
    """Module key -> weight of the modules FRoD adapts, in ``named_modules()`` order (as PEFT visits them)."""
    return {k: m.weight for k, m in model.named_modules()
            if isinstance(m, nn.Linear) and k.rsplit(".", 1)[-1] in peft_models.TARGETS}


def _time_runs(fn, repeats: int, device: torch.device, prepare=lambda: None):
    """Wall times of ``repeats`` calls of ``fn(prepare())`` (synchronized; ``prepare`` is not timed), and the last
    call's result."""
    times, result = [], None
    for _ in range(repeats):
        result = None
        gc.collect()
        arg = prepare()
        synchronize(device)
        t0 = time.perf_counter()
        result = fn(arg)
        synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return summarize(times), result


def _enabled_init(cache):
    """``get_peft_model`` under ``frod_kernels.peft.enable(cache=cache)``, or the reason it cannot run."""
    try:
        import frod_kernels.peft as fkp
    except ImportError as e:
        return None, f"frod_kernels.peft is not available ({e})"

    def init(model):
        fkp.enable(cache=cache)
        try:
            return peft_models.wrap(model, peft_models.frod_config(peft_models.TARGETS))
        finally:
            fkp.disable()  # later suites time PEFT itself

    return init, None


def _as_projections(peft_model) -> dict:
    """A PEFT FRoD model's V, pattern, U and lambda_l in build_projections' layout, to compare like with like."""
    from peft.tuners.frod.layer import Linear as FrodLinear

    from frod_kernels.projections import CategoryProjection, category_from_key

    base, out = peft_model.base_model, {}
    for key, module in base.model.named_modules():
        if isinstance(module, FrodLinear):
            cat = category_from_key(key)
            proj = out.setdefault(cat, CategoryProjection(name=cat, V=base.frod_V[cat]["default"],
                                                          s_indices=base.frod_s_indices[cat]["default"], keys=[]))
            proj.keys.append(key)
            proj.U[key], proj.lambda_l[key] = module.frod_U["default"], module.frod_lambda_l["default"]
    return out


def _same_tensors(a: dict, b: dict) -> bool:
    """Whether two results (category -> CategoryProjection) hold bitwise the same V, patterns, U and lambda_l."""
    def same(p, q):
        return (torch.equal(p.V, q.V) and torch.equal(p.s_indices, q.s_indices) and p.U.keys() == q.U.keys()
                and all(torch.equal(p.U[k], q.U[k]) and torch.equal(p.lambda_l[k], q.lambda_l[k]) for k in p.U))

    return a.keys() == b.keys() and all(same(a[c], b[c]) for c in a)


def _difference_from_peft(projections: dict, peft_model) -> dict:
    base = peft_model.base_model
    v_err = u_err = lam_err = 0.0
    same_pattern = True
    for name, proj in projections.items():
        V = base.frod_V[name]["default"]
        # eigh's sign of each column is free (the fast and CUDA routes' differ): align with PEFT's first
        sign = torch.where((proj.V.to(V.dtype) * V).sum(0) < 0, -1.0, 1.0).to(V.dtype)
        v_err = max(v_err, rel_err(proj.V.to(V.dtype) * sign, V))
        same_pattern &= torch.equal(proj.s_indices.cpu(), base.frod_s_indices[name]["default"].cpu())
        for key in proj.keys:
            layer = base.model.get_submodule(key)
            U = layer.frod_U["default"]
            u_err = max(u_err, rel_err(proj.U[key].to(U.dtype) * sign.to(U.dtype), U))
            lam_err = max(lam_err, rel_err(proj.lambda_l[key], layer.frod_lambda_l["default"]))
    return {"rel_diff_V": v_err, "rel_diff_U": u_err, "rel_diff_lambda_l": lam_err, "same_pattern": same_pattern}


def _frod_rows(model, base: dict, device: torch.device, sizes: Sizes, peft_model, cache_dir: str,
               tick: Callable[[str], None]) -> list[dict]:
    """The frod-kernels rows; a cached row's first, untimed, setup fills ``cache_dir``."""
    # (name, fn, why not, prepare, as_projections, the uncached row a cached one must equal)
    candidates = []
    for name, cache, same_as in ((PEFT_ENABLED, False, None), (PEFT_ENABLED_CACHED, cache_dir, PEFT_ENABLED)):
        enabled, reason = _enabled_init(cache)
        candidates.append((name, enabled, reason, lambda: copy.deepcopy(model), _as_projections, same_as))
    build, reason = _build_projections()
    weights = target_weights(model)
    for label, route, method, cached in _routes(device):
        cache = cache_dir if cached else False
        fn = None if build is None else (lambda _, route=route, method=method, cache=cache: build(
            weights, sparse_rate=0.01, projection_prng_key=0, progressbar=False, device=route, method=method,
            cache=cache))
        candidates.append((fk_init(label), fn, reason, lambda: None, lambda projections: projections,
                           fk_init("cpu") if cached else None))

    rows, outputs = [], {}
    for name, fn, reason, prepare, as_projections, same_as in candidates:
        tick(f"init {name}")
        row = dict(base, method=name)
        if fn is None:
            row["skipped"] = reason
        else:
            try:
                if same_as is not None:
                    fn(prepare())  # the first setup, which fills the cache
                stats, result = _time_runs(fn, sizes.init_repeats, device, prepare)
                row.update(stats)
                outputs[name] = as_projections(result)
                if peft_model is not None:
                    row.update(_difference_from_peft(outputs[name], peft_model))
                if same_as in outputs:
                    row["bitwise_same_as_uncached"] = _same_tensors(outputs[name], outputs[same_as])
            except Exception as e:  # reported in its row
                row["error"] = f"{type(e).__name__}: {e}"
        rows.append(row)
    return rows


def run(sizes: Sizes, device: torch.device, tick: Callable[[str], None]) -> list[dict]:
    cfg = sizes.train
    model = peft_models.llama(cfg, sizes.dtype, device)
    base = {"suite": "init", "dtype": dtype_name(sizes.dtype), "model": "llama", **cfg,
            "adapted_layers": len(target_weights(model))}
    rows = []

    tick(f"init {PEFT_INIT}")
    row = dict(base, method=PEFT_INIT)
    peft_model = None
    try:
        stats, peft_model = _time_runs(lambda m: peft_models.wrap(m, peft_models.frod_config(peft_models.TARGETS)),
                                       sizes.init_repeats, device, prepare=lambda: copy.deepcopy(model))
        row.update(stats)
    except Exception as e:  # reported in its row; the other methods still run
        row["error"] = f"{type(e).__name__}: {e}"
    rows.append(row)

    with tempfile.TemporaryDirectory(prefix="frod-bench-cache-") as cache_dir:
        rows += _frod_rows(model, base, device, sizes, peft_model, cache_dir, tick)

    peft_ms = rows[0].get("median_ms")
    for r in rows:
        if r.get("median_ms") and peft_ms:
            r["speedup_vs_peft"] = peft_ms / r["median_ms"]
    return rows
