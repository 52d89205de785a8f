"""What ``"auto"`` runs: on a GPU, the fastest implementation that gives the right result, found by measurement.

The engine has two kinds of choices, and on hardware no one here has run the kernels on, neither can be fixed in
advance: which backend implements each kernel-family op (``cuda``, ``triton`` or the ``torch`` twin over
cuSPARSE), and which engine path (sparse, factored, materialized) a layer call takes. Under
``fk.set_backend("auto")`` (the default) on a CUDA device, the first call of each *shape class* times every
candidate on the call's own tensors, keeps the fastest, and caches the choice, as
``torch.backends.cudnn.benchmark`` and Triton's autotuner do:

* a kernel-family op: key (op, device name, dtype, operand layout, power-of-two classes of rows, columns and
  nonzeros per row); candidates: every backend that can run (:mod:`.kernels`);
* a layer call (:func:`frod_kernels.frod_linear`): key (device name, dtype, power-of-two class of tokens, in,
  out, nnz, training); candidates: the three kernel paths, each run forward (and backward when training)
  (:mod:`.paths`).

Each candidate runs once untimed (Triton compiles and autotunes then) and its result is compared with the torch
twin's (or, for paths, the cost model's path's) within the dtype's tolerance of docs/DESIGN.md section 5. A
candidate that raises is left out with a warning; one that computes a wrong result is a failure for the process.
The torch twin is always a candidate, so "auto" is never slower than it by more than timing noise.

Measurement is skipped where timing would be wrong or harmful: on the CPU (there ``auto`` is the torch backend),
under ``torch.use_deterministic_algorithms(True)`` or ``set_autotune(False)`` / ``FROD_AUTOTUNE=0`` (timings vary
between runs, so measured choices, hence the bits of results, could too), while ``torch.compile`` traces, and
while a CUDA graph is captured. Then the order is fixed (paths: the cost model of :mod:`frod_kernels.cost_model`),
and no kernel but the twin runs on a shape class before it has matched the twin there (:mod:`.kernels`).

Choices live for the process; ``set_autotune(cache="file.json")`` or ``FROD_AUTOTUNE_CACHE=file.json`` also keeps
them on disk (:mod:`.state`). :func:`explain` says what was chosen and why.
"""

from __future__ import annotations

import torch

from .. import registry
from . import state
from .kernels import CPU_BACKEND, TWIN, auto_kernel, backend_key, show
from .measure import set_timer, time_once
from .paths import chosen, path_key, pick_path
from .state import (
    FORMAT,
    MEASURED_DEVICE_TYPES,
    STATE,
    clear,
    get_autotune,
    measures,
    not_measured,
    set_autotune,
)

__all__ = ["FORMAT", "MEASURED_DEVICE_TYPES", "auto_kernel", "backend_key", "chosen", "clear", "explain",
           "get_autotune", "measures", "path_key",
           "pick_path", "set_autotune", "set_timer", "time_once"]


def explain() -> str:
    """What ``"auto"`` chose so far in this process and why, and the policy in force now."""
    lines = [f"backend setting: {registry.get_backend()!r}; autotune "
             f"{'on' if STATE.enabled else 'off'}; cache file: {STATE.cache_file or 'none'}"]
    for device in (torch.device("cpu"),) + ((torch.device("cuda"),) if torch.cuda.is_available() else ()):
        reason = not_measured(device)
        runnable = registry.runnable(device.type) if device.type in state.MEASURED_DEVICE_TYPES else [TWIN]
        if reason is None:
            lines.append(f"{device.type}: measured per shape class among {runnable}")
        elif device.type == "cpu":
            c_reason = registry.unavailable_reason(CPU_BACKEND, "cpu")
            kernels = ("the cpu backend's C kernels on small calls, else torch" if c_reason is None
                       else f"torch (the cpu backend cannot run: {c_reason})")
            lines.append(f"cpu: {reason}: {kernels} for kernels, the cost model for paths")
        else:
            lines.append(f"{device.type}: {reason}: {' > '.join(runnable)} for kernels, each verified against the "
                         "torch twin before it runs, the cost model for paths")
    for (op, backend, device_type), why in sorted(STATE.failed.items()):
        lines.append(f"dropped after a failure: {backend} for {op} on {device_type} ({why})")
    for choice in list(STATE.choices.values()):
        if choice.kind == "verified":
            lines.append(f"{show(choice.key)}: {choice.chosen!r} {choice.why}")
            continue
        lines.append(f"{show(choice.key)}: {choice.kind} {choice.chosen!r} ({choice.why})"
                     + "".join(f"; left out {n}: {w}" for n, w in choice.rejected.items()))
    return "\n".join(lines)
