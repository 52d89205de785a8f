"""Timing candidates: each runs once untimed (Triton compiles and autotunes then) and must reproduce the reference
within the dtype's tolerance (docs/DESIGN.md section 5) before it is timed; the fastest right one is recorded."""

from __future__ import annotations

import statistics
import time
import warnings
from typing import Any, Callable, Optional

import torch

from ..reference import rel_err
from .state import Choice, record

Timer = Callable[[str, Callable[[], Any], torch.device], float]
_timer: Optional[Timer] = None


def set_timer(timer: Optional[Timer]) -> None:
    """Replace the timer (``timer(candidate, fn, device) -> milliseconds``); ``None`` restores the default. For
    tests, which drive the mechanism on the CPU with chosen timings."""
    global _timer
    _timer = timer


def time_once(fn: Callable[[], Any], device: torch.device) -> float:
    """Milliseconds of one call of ``fn``: CUDA events on a GPU, the wall clock elsewhere."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def _default_timer(name: str, fn: Callable[[], Any], device: torch.device) -> float:
    """Median of a few calls; fewer for slow candidates."""
    times = []
    for _ in range(5):
        times.append(time_once(fn, device))
        if sum(times) > 50:
            break
    return statistics.median(times)


def max_rel_err(out, ref) -> float:
    """The largest relative error over the tensors of a result (a tensor or a tuple of them)."""
    outs, refs = (out, ref) if isinstance(out, tuple) else ((out,), (ref,))
    return max((rel_err(o, r) for o, r in zip(outs, refs) if r.numel()), default=0.0)


def measure(kind: str, key: tuple, candidates: dict[str, Callable[[], Any]],
            check: Callable[[Any], tuple[bool, str]], device: torch.device, show: str,
            on_wrong: Callable[[str, str], None] = lambda name, why: None) -> str:
    """Time every candidate that runs and passes ``check``; record and return the fastest. ``on_wrong(name,
    why)`` hears of each candidate whose result failed ``check``."""
    timer = _timer or _default_timer
    times, rejected = {}, {}
    with torch.no_grad():
        for name, fn in candidates.items():
            try:
                ok, why = check(fn())  # untimed: compiles, autotunes, and proves the result
                if not ok:
                    rejected[name] = f"wrong {why}"
                    on_wrong(name, rejected[name])
                    continue
                times[name] = float(timer(name, fn, device))
            except torch.OutOfMemoryError as e:
                rejected[name] = f"out of memory ({e})"
            except Exception as e:  # noqa: BLE001 - a candidate that fails is left out, with the reason kept
                rejected[name] = f"{type(e).__name__}: {e}"
    for name, why in rejected.items():
        warnings.warn(f"frod_kernels autotune: {kind} {name!r} left out for {show}: {why}", RuntimeWarning,
                      stacklevel=5)
    if not times:
        raise RuntimeError(f"frod_kernels autotune: no candidate ran for {show}: {rejected}")
    chosen = min(times, key=times.__getitem__)
    why = "fastest measured: " + ", ".join(f"{n} {t:.3g} ms" for n, t in sorted(times.items(), key=lambda i: i[1]))
    record(Choice(kind, key, chosen, why, times, rejected))
    return chosen
