"""What ``"auto"`` runs: on a GPU, the fastest implementation that gives the right result, found by measurement.

The engine has two kinds of choices, and on hardware no one here has run the kernels on, neither can be fixed in
advance: which backend implements each kernel-family op (``cuda``, ``triton`` or the ``torch`` twin over cuSPARSE),
and which engine path (sparse, factored, materialized) a layer call takes. Under ``fk.set_backend("auto")`` (the
default) on a CUDA device, the first call of each *shape class* times every candidate on the call's own tensors,
keeps the fastest, and caches the choice, as ``torch.backends.cudnn.benchmark`` and Triton's autotuner do:

* a kernel-family op (``frod::row_gather_diag``, ``frod::sampled_dot_diag``): key (op, device name, dtype, operand
  layout, power-of-two classes of rows, columns and nonzeros per row); candidates: every backend that can run;
* a layer call (:func:`frod_kernels.frod_linear`): key (device name, dtype, power-of-two class of tokens, in, out,
  nnz, training); candidates: the three paths, each run forward (and backward when training).

Each candidate runs once untimed (Triton compiles and autotunes then) and its result is compared with the torch
twin's (or, for paths, the first path's) within the dtype's tolerance of DESIGN.md section 5. A candidate that
raises or computes a wrong result is left out with a warning: a kernel that miscompiles on an unknown GPU is never
chosen, and the torch twin is always a candidate, so "auto" is never slower than it by more than timing noise.
A chosen kernel that raises later (a new shape of a known class) warns once, is dropped for that op on that device
type for the process, and the call runs on the torch twin.

Measurement is skipped, and the fixed order ``cuda > triton > torch`` (paths: the cost model of
:mod:`frod_kernels.engine`) decides, where timing would be wrong or harmful: on the CPU (there ``auto`` is the
torch backend), under ``torch.use_deterministic_algorithms(True)`` or ``set_autotune(False)`` /
``FROD_AUTOTUNE=0`` (timings vary between runs, so measured choices, hence the bits of results, could too), while
``torch.compile`` traces, and while a CUDA graph is captured.

Choices live for the process; ``set_autotune(cache="file.json")`` or ``FROD_AUTOTUNE_CACHE=file.json`` also keeps
them on disk (JSON, keyed by device name and library versions, written atomically), so later runs and every rank
of a job reuse them. :func:`explain` says what was chosen and why.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import statistics
import tempfile
import threading
import time
import warnings
from typing import Any, Callable, Optional, Sequence

import torch

from .reference import TOLERANCE, rel_err

__all__ = ["clear", "explain", "get_autotune", "set_autotune"]

# Device types whose choices are measured. The CPU has one real backend (Triton runs there only interpreted), and
# the engine's CPU cost model was calibrated by measurement; the tests add "cpu" to drive the mechanism.
MEASURED_DEVICE_TYPES = {"cuda"}
# The order used wherever nothing is measured; it is also the deterministic mode's documented order.
FIXED_ORDER = ("cuda", "triton", "torch")
FORMAT = 1

Timer = Callable[[str, Callable[[], Any], torch.device], float]


@dataclasses.dataclass
class Choice:
    kind: str  # "backend" or "path"
    key: tuple
    chosen: str
    why: str
    times_ms: dict[str, float] = dataclasses.field(default_factory=dict)
    rejected: dict[str, str] = dataclasses.field(default_factory=dict)  # candidate -> why it was left out


def _env_enabled() -> bool:
    raw = os.environ.get("FROD_AUTOTUNE", "1").strip().lower()
    if raw not in ("0", "1", "true", "false", "on", "off"):
        raise ValueError(f"FROD_AUTOTUNE: expected 0 or 1, got {raw!r}")
    return raw in ("1", "true", "on")


_enabled = _env_enabled()
_cache_file: Optional[str] = os.environ.get("FROD_AUTOTUNE_CACHE") or None
_choices: dict[tuple, Choice] = {}
_disk: Optional[dict[str, dict]] = None  # the cache file's entries, loaded on first use
# (op, backend, device type) that raised after being chosen: never tried again in this process
_broken: set[tuple[str, str, str]] = set()
_lock = threading.Lock()
_timer: Optional[Timer] = None


def set_autotune(enabled: bool = True, *, cache: "str | os.PathLike | None | bool" = None) -> None:
    """Measure ``"auto"``'s choices on a GPU (``enabled=True``, the default) or use the fixed order (``False``).

    ``cache``: a JSON file that keeps measured choices across processes (read at the first measurement, rewritten
    atomically after each new one); ``False`` stops using one; ``None`` leaves the current setting.
    """
    global _enabled, _cache_file, _disk
    if enabled is not True and enabled is not False:
        raise TypeError(f"enabled: expected True or False, got {enabled!r}")
    if cache is not None and cache is not False and not isinstance(cache, (str, os.PathLike)):
        raise TypeError(f"cache: expected a file path, False or None, got {type(cache).__name__} {cache!r}")
    _enabled = enabled
    if cache is False:
        _cache_file, _disk = None, None
    elif cache is not None:
        _cache_file, _disk = os.fspath(cache), None


def get_autotune() -> dict:
    """``{"enabled": bool, "cache": path or None, "deterministic": bool}``: the settings now in force."""
    return {"enabled": _enabled, "cache": _cache_file, "deterministic": torch.are_deterministic_algorithms_enabled()}


def clear() -> None:
    """Forget this process's choices and failures (the cache file is left as it is)."""
    global _disk
    with _lock:
        _choices.clear()
        _broken.clear()
        _disk = None


def _not_measured(device: torch.device) -> Optional[str]:
    """Why choices on ``device`` are not measured now, or None when they are."""
    if device.type not in MEASURED_DEVICE_TYPES:
        return f"choices on {device.type} are not measured"
    if not _enabled:
        return "autotuning is off (set_autotune(False) or FROD_AUTOTUNE=0): fixed order"
    if torch.are_deterministic_algorithms_enabled():
        return "torch.use_deterministic_algorithms(True): fixed order, so results are the same every run"
    if torch.compiler.is_compiling():
        return "torch.compile is tracing: fixed order"
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return "a CUDA graph is being captured: fixed order"
    return None


def measures(device: torch.device) -> bool:
    """Whether ``"auto"``'s choices on ``device`` are measured now (else: the fixed order and the cost model)."""
    return _not_measured(device) is None


def _bucket(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return _cuda_name(device.index if device.index is not None else torch.cuda.current_device())
    return device.type


@functools.lru_cache(maxsize=None)
def _cuda_name(index: int) -> str:
    # every measured call builds a key with it: ask the driver once per device
    return torch.cuda.get_device_name(index)


# ---- kernel-family ops ------------------------------------------------------------------------------------------

def backend_key(op: str, args: Sequence[torch.Tensor]) -> tuple:
    """Shape class of a kernel-family call: both ops take a 2-D operand first and the group sources last."""
    A, src = args[0], args[-1]
    n, m = A.shape
    layout = "cols" if A.stride(0) == 1 and A.stride(1) != 1 else "rows"
    per_row = -(-src.numel() // max(n, 1))
    return ("backend", op, _device_name(A.device), str(A.dtype).removeprefix("torch."), layout, _bucket(n),
            _bucket(m), _bucket(per_row))


def pick_backend(op: str, impls: dict[str, Callable], runnable: list[str], args: Sequence[torch.Tensor]) -> str:
    """The backend to run ``op`` on ``args`` with under ``"auto"``: measured, cached, or the first of ``runnable``
    (the backends that can run here, in ``auto``'s fixed order)."""
    device = args[0].device
    usable = [b for b in runnable if b in impls and (op, b, device.type) not in _broken]
    if len(usable) <= 1 or _not_measured(device) is not None:
        return usable[0] if usable else "torch"
    key = backend_key(op, args)
    hit = _lookup(key, usable)
    if hit is not None:
        return hit

    reference = impls["torch"](*args)
    tol = 2 * TOLERANCE.get(args[0].dtype, TOLERANCE[torch.float32])

    def check(out):
        err = _max_rel_err(out, reference)
        return err <= tol, f"result {err:.1e} from the torch twin's (tolerance {tol:.0e})"

    return _measure("backend", key, {b: (lambda b=b: impls[b](*args)) for b in usable}, check, device)


def run_guarded(op: str, name: str, impls: dict[str, Callable], args: Sequence[torch.Tensor]):
    """``impls[name](*args)``; if that raises (a kernel that does not compile or launch on this GPU), warn once,
    drop ``name`` for ``op`` on this device type, and return the torch twin's result."""
    if name == "torch":
        return impls["torch"](*args)
    try:
        return impls[name](*args)
    except torch.OutOfMemoryError:
        raise  # the torch twin needs memory too; not a kernel fault
    except Exception as e:  # noqa: BLE001 - any kernel failure falls back; the warning carries it
        device_type = args[0].device.type
        with _lock:
            _broken.add((op, name, device_type))
        warnings.warn(f"frod_kernels: the {name} kernel of {op} failed on {device_type} ({type(e).__name__}: {e}); "
                      f"using the torch backend for {op} from now on in this process", RuntimeWarning, stacklevel=3)
        return impls["torch"](*args)


# ---- engine paths -----------------------------------------------------------------------------------------------

def path_key(b: int, n_in: int, n_out: int, nnz: int, dtype: torch.dtype, device: torch.device,
             training: bool) -> tuple:
    return ("path", _device_name(device), str(dtype).removeprefix("torch."), _bucket(b), n_in, n_out, nnz, training)


def chosen(key: tuple) -> Optional[str]:
    """The candidate chosen for ``key`` in this process, if one was measured or read from the cache file."""
    hit = _choices.get(key)
    return None if hit is None else hit.chosen


def pick_path(key: tuple, device: torch.device, names: dict[int, str], run: Callable[[int], torch.Tensor],
              fallback: int) -> int:
    """The engine path of a layer call: measured (``run(path)`` runs one forward, and backward when training,
    returning the output) or cached; ``fallback`` is the cost model's path, the reference the others must match.
    Call it only where :func:`measures` holds."""
    hit = _lookup(key, list(names.values()))
    if hit is None:
        ref = run(fallback)
        tol = 2 * TOLERANCE.get(ref.dtype, TOLERANCE[torch.float32])

        def check(out):
            err = rel_err(out, ref)
            return err <= tol, f"output {err:.1e} from the {names[fallback]} path's (tolerance {tol:.0e})"

        hit = _measure("path", key, {name: (lambda p=p: run(p)) for p, name in names.items()}, check, device)
    return next(p for p, name in names.items() if name == hit)


# ---- measurement and the caches ---------------------------------------------------------------------------------

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


def _measure(kind: str, key: tuple, candidates: dict[str, Callable[[], Any]], check, device) -> str:
    timer = _timer or _default_timer
    times, rejected = {}, {}
    with torch.no_grad():
        for name, fn in candidates.items():
            try:
                ok, why = check(fn())  # untimed: compiles, autotunes, and proves the result
                if not ok:
                    rejected[name] = f"wrong {why}"
                    continue
                times[name] = float(timer(name, fn, device))
            except torch.OutOfMemoryError as e:
                rejected[name] = f"out of memory ({e})"
            except Exception as e:  # noqa: BLE001 - a candidate that fails is left out, with the reason kept
                rejected[name] = f"{type(e).__name__}: {e}"
    for name, why in rejected.items():
        warnings.warn(f"frod_kernels autotune: {kind} {name!r} left out for {_show(key)}: {why}", RuntimeWarning,
                      stacklevel=4)
    if not times:
        raise RuntimeError(f"frod_kernels autotune: no candidate ran for {_show(key)}: {rejected}")
    chosen = min(times, key=times.__getitem__)
    why = "fastest measured: " + ", ".join(f"{n} {t:.3g} ms" for n, t in sorted(times.items(), key=lambda i: i[1]))
    choice = Choice(kind, key, chosen, why, times, rejected)
    with _lock:
        _choices[key] = choice
    _store(choice)
    return chosen


def _lookup(key: tuple, usable: list[str]) -> Optional[str]:
    """A cached choice for ``key`` among ``usable``: this process's, else the cache file's."""
    hit = _choices.get(key)
    if hit is not None and hit.chosen in usable:
        return hit.chosen
    entry = _disk_entries().get(_disk_key(key))
    if entry is not None and entry.get("chosen") in usable:
        choice = Choice(key[0], key, entry["chosen"], f"from {_cache_file} ({entry.get('why', '')})",
                        dict(entry.get("times_ms", {})), dict(entry.get("rejected", {})))
        with _lock:
            _choices[key] = choice
        return choice.chosen
    return None


def _versions() -> dict[str, Optional[str]]:
    from . import __version__

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"frod_kernels": __version__, "torch": torch.__version__, "triton": triton_version}


def _disk_key(key: tuple) -> str:
    # versions in the key: another library, compiler or kernel set is another measurement
    return json.dumps([list(key), _versions()])


def _disk_entries() -> dict[str, dict]:
    global _disk
    if _cache_file is None:
        return {}
    if _disk is None:
        _disk = {}
        try:
            with open(_cache_file, encoding="utf-8") as f:
                data = json.load(f)
            if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("entries"), dict):
                raise ValueError(f"not a format-{FORMAT} frod_kernels autotune cache")
            _disk = {k: v for k, v in data["entries"].items() if isinstance(v, dict)}
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as e:
            warnings.warn(f"frod_kernels autotune: ignoring the cache file {_cache_file!r} ({e}); it is rewritten "
                          "at the next measurement", RuntimeWarning, stacklevel=5)
    return _disk


def _store(choice: Choice) -> None:
    if _cache_file is None:
        return
    entries = _disk_entries()
    entries[_disk_key(choice.key)] = {"chosen": choice.chosen, "why": choice.why, "times_ms": choice.times_ms,
                                      "rejected": choice.rejected}
    directory = os.path.dirname(os.path.abspath(_cache_file))
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".autotune-", suffix=".json")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"format": FORMAT, "entries": entries}, f, indent=1)
        os.replace(tmp, _cache_file)  # atomic: a reader sees the old file or the new one, never half of one
    except OSError as e:
        warnings.warn(f"frod_kernels autotune: cannot write the cache file {_cache_file!r} ({e}); choices stay in "
                      "this process", RuntimeWarning, stacklevel=5)


def _max_rel_err(out, ref) -> float:
    outs, refs = (out, ref) if isinstance(out, tuple) else ((out,), (ref,))
    return max((rel_err(o, r) for o, r in zip(outs, refs) if r.numel()), default=0.0)


def _show(key: tuple) -> str:
    if key[0] == "backend":
        _, op, dev, dtype, layout, n, m, per_row = key
        return f"{op} on {dev}, {dtype}, {layout}-contiguous, ~{n}x{m}, ~{per_row} nonzeros per row"
    _, dev, dtype, b, n_in, n_out, nnz, training = key
    return f"frod_linear on {dev}, {dtype}, ~{b} tokens, {n_in}->{n_out}, nnz {nnz}, " + (
        "forward+backward" if training else "forward")


def explain() -> str:
    """What ``"auto"`` chose so far in this process and why, and the policy in force now."""
    from . import _backends

    lines = [f"backend setting: {_backends.get_backend()!r}; autotune "
             f"{'on' if _enabled else 'off'}; cache file: {_cache_file or 'none'}"]
    for device in (torch.device("cpu"),) + ((torch.device("cuda"),) if torch.cuda.is_available() else ()):
        reason = _not_measured(device)
        runnable = [b for b in FIXED_ORDER if _backends.unavailable_reason(b, device.type) is None]
        lines.append(f"{device.type}: " + (f"measured per shape class among {runnable}" if reason is None else
                                          f"{reason}: {' > '.join(_backends.AUTO_ORDER.get(device.type, ['torch']))}"
                                          " for kernels, the cost model for paths"))
    for op, backend, device_type in sorted(_broken):
        lines.append(f"dropped after a failure: {backend} for {op} on {device_type}")
    for choice in _choices.values():
        lines.append(f"{_show(choice.key)}: {choice.kind} {choice.chosen!r} ({choice.why})"
                     + "".join(f"; left out {n}: {w}" for n, w in choice.rejected.items()))
    return "\n".join(lines)
