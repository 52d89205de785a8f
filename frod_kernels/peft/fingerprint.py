"""Fingerprints of a FRoD adapter's projections, so a checkpoint never trains on a silently different basis.

A PEFT FRoD adapter saved with ``save_projection=False`` stores only lambda_l and s_values; on load PEFT
regenerates V and the sparse pattern from the base weights and ``projection_prng_key``, and U from V and the base
weights. Those are not reproducible everywhere (V is an eigenvector basis of an ill-conditioned matrix: another
BLAS thread count moves it by 10% and flips columns, see :mod:`frod_kernels.projections`), and other base weights
or another key give other projections without any error. The fingerprint records, per category, the pattern
exactly (SHA-256 of the int64 ``s_indices``) and a numeric sketch of V, and per layer a sketch of U; on load the
regenerated projections are sketched again and compared.

Sketch of a matrix M (rows x cols): ``L^T (M r)`` with fixed-seed Rademacher ``r`` (cols) and ``L``
(rows x SKETCH_SIZE), in float64: one matvec per matrix, SKETCH_SIZE numbers whatever the size. Signs are not
normalized on purpose: flipping a column of V or U changes what the trained S entries mean (U_i S_ij V_j^T), so a
flipped basis must fail. Two sketches are compared by their relative distance, within ``tolerance(dtype)``: a few
units of the dtype's rounding (bitwise the same projections give distance 0).

Stored as a JSON sidecar (:data:`SIDECAR_NAME`) next to ``adapter_config.json``: plain PEFT ignores the file, so
the checkpoint loads everywhere unchanged. The sidecar also records the SHA-256 of the adapter weights file it was
written with, so a sidecar left behind by a later save that did not write one is recognized as stale.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Optional

import peft
import torch
from peft.utils.constants import SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME

from .._env import VERSION
from ..projections import category_from_key

__all__ = ["SIDECAR_NAME", "adapter_fingerprint", "compare", "read", "tolerance", "versions", "weights_sha256",
           "write"]

SIDECAR_NAME = "frod_projection_fingerprint.json"
FORMAT = 1
SKETCH_SIZE = 32
_SEED = 0x5EED
_CHUNK_ROWS = 2048  # rows converted to float64 at a time: bounded memory for wide layers


def _rademacher(n: int, m: int, salt: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(_SEED + salt)
    return (torch.randint(0, 2, (n, m), generator=g, dtype=torch.int8) * 2 - 1).to(torch.float64)


def sketch(matrix: torch.Tensor) -> list[float]:
    """``L^T (M r)`` in float64 (see the module docstring), as Python floats (exact in JSON)."""
    rows, cols = matrix.shape
    r = _rademacher(cols, 1, 0)[:, 0]
    left = _rademacher(rows, SKETCH_SIZE, 1)
    out = torch.zeros(SKETCH_SIZE, dtype=torch.float64)
    for start in range(0, rows, _CHUNK_ROWS):
        block = matrix[start:start + _CHUNK_ROWS].detach().to(device="cpu", dtype=torch.float64)
        out += left[start:start + _CHUNK_ROWS].T @ (block @ r)
    return out.tolist()


def pattern_sha256(s_indices: torch.Tensor) -> str:
    idx = s_indices.detach().to(device="cpu", dtype=torch.int64).contiguous()
    return hashlib.sha256(idx.numpy().astype("<i8").tobytes()).hexdigest()


def tolerance(*dtype_names: str) -> float:
    """Relative sketch distance allowed for projections stored in these dtypes (the coarsest decides): 4 units of
    rounding, at least 1e-4 (V is computed in float32 even for a float64 model)."""
    eps = max(torch.finfo(getattr(torch, name)).eps for name in dtype_names)
    return max(1e-4, 4 * eps)


def versions() -> dict[str, str]:
    return {"frod_kernels": VERSION, "peft": peft.__version__, "torch": torch.__version__}


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def adapter_fingerprint(frod_model, adapter_name: str) -> dict[str, Any]:
    """The fingerprint of ``adapter_name``'s projections in a PEFT ``FrodModel`` (``peft_model.base_model``)."""
    categories = {}
    for category in frod_model.frod_V:
        if adapter_name not in frod_model.frod_V[category]:
            continue
        V = frod_model.frod_V[category][adapter_name]
        s_indices = frod_model.frod_s_indices[category][adapter_name]
        categories[category] = {"in_features": V.shape[0], "dtype": _dtype_name(V), "nnz": int(s_indices.shape[-1]),
                                "s_indices_sha256": pattern_sha256(s_indices), "V_sketch": sketch(V)}
    layers = {}
    for name, module in frod_model.model.named_modules():
        U = getattr(module, "frod_U", None)
        if U is None or not hasattr(U, "keys") or adapter_name not in U:
            continue
        U = U[adapter_name]
        layers[name] = {"category": category_from_key(name), "shape": list(U.shape), "dtype": _dtype_name(U),
                        "U_sketch": sketch(U)}
    return {"format": FORMAT, "sketch_size": SKETCH_SIZE, "versions": versions(), "categories": categories,
            "layers": layers}


def weights_sha256(directory: str) -> Optional[tuple[str, str]]:
    """(file name, SHA-256) of the adapter weights file PEFT wrote in ``directory``, or None if there is none."""
    for name in (SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            return name, h.hexdigest()
    return None


def write(directory: str, fingerprint: dict[str, Any]) -> str:
    weights = weights_sha256(directory)
    record = {**fingerprint, "weights_file": weights[0] if weights else None,
              "weights_sha256": weights[1] if weights else None}
    path = os.path.join(directory, SIDECAR_NAME)
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
    return path


def read(directory: str) -> Optional[dict[str, Any]]:
    path = os.path.join(directory, SIDECAR_NAME)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _distance(a: list[float], b: list[float]) -> float:
    ta, tb = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    if ta.shape != tb.shape:
        return float("inf")
    return float((ta - tb).norm() / tb.norm().clamp_min(1e-300))


def compare(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What differs between a saved fingerprint and the current one, one line each (empty: the same projections)."""
    diffs = []
    for category, s in saved["categories"].items():
        c = current["categories"].get(category)
        if c is None:
            diffs.append(f"category {category!r}: in the checkpoint, but the loaded model has no such projection")
            continue
        if (s["in_features"], s["nnz"]) != (c["in_features"], c["nnz"]):
            diffs.append(f"category {category!r}: in_features/nnz {s['in_features']}/{s['nnz']} saved, "
                         f"{c['in_features']}/{c['nnz']} now")
            continue
        if s["s_indices_sha256"] != c["s_indices_sha256"]:
            diffs.append(f"category {category!r}: sparse pattern s_indices differs (sha256 "
                         f"{s['s_indices_sha256'][:12]}... saved, {c['s_indices_sha256'][:12]}... now)")
        d, tol = _distance(c["V_sketch"], s["V_sketch"]), tolerance(s["dtype"], c["dtype"])
        if not d <= tol:
            diffs.append(f"category {category!r}: V differs (sketch {d:.2e} apart, relative; tolerance {tol:.0e} "
                         f"for {s['dtype']} saved / {c['dtype']} now)")
    for name, s in saved["layers"].items():
        c = current["layers"].get(name)
        if c is None:
            diffs.append(f"layer {name!r}: in the checkpoint, but not a FRoD layer of this adapter in the loaded model")
            continue
        d, tol = _distance(c["U_sketch"], s["U_sketch"]), tolerance(s["dtype"], c["dtype"])
        if s["shape"] != c["shape"] or not d <= tol:
            what = (f"shape {s['shape']} saved, {c['shape']} now" if s["shape"] != c["shape"]
                    else f"sketch {d:.2e} apart, relative; tolerance {tol:.0e}")
            diffs.append(f"layer {name!r} (category {s['category']!r}): U differs ({what})")
    return diffs
