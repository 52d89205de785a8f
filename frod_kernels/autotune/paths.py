"""Which engine path a layer call takes under ``"auto"`` where choices are measured: each path runs the call once
(forward, and backward when training), must match the cost model's path within tolerance, and the fastest wins."""

from __future__ import annotations

from typing import Callable, Optional

import torch

from .._numerics import bucket, dtype_name
from ..reference import TOLERANCE, rel_err
from .kernels import show
from .measure import measure
from .state import STATE, device_name, lookup


def path_key(b: int, n_in: int, n_out: int, nnz: int, dtype: torch.dtype, device: torch.device,
             training: bool) -> tuple:
    return ("path", device_name(device), dtype_name(dtype), bucket(b), n_in, n_out, nnz, training)


def chosen(key: tuple) -> Optional[str]:
    """The candidate chosen for ``key`` in this process, if one was measured or read from the cache file."""
    hit = STATE.choices.get(key)
    return None if hit is None else hit.chosen


def pick_path(key: tuple, device: torch.device, names: dict[int, str], run: Callable[[int], torch.Tensor],
              fallback: int) -> int:
    """The engine path of a layer call: measured (``run(path)`` runs one forward, and backward when training,
    returning the output) or cached; ``fallback`` is the cost model's path, the reference the others must match.
    Call it only where :func:`frod_kernels.autotune.measures` holds."""
    hit = lookup(key)
    name = hit.chosen if hit is not None and hit.chosen in names.values() else None
    if name is None:
        ref = run(fallback)
        tol = 2 * TOLERANCE.get(ref.dtype, TOLERANCE[torch.float32])

        def check(out):
            err = rel_err(out, ref)
            return err <= tol, f"output {err:.1e} from the {names[fallback]} path's (tolerance {tol:.0e})"

        name = measure("path", key, {n: (lambda p=p: run(p)) for p, n in names.items()}, check, device, show(key))
    return next(p for p, n in names.items() if n == name)
