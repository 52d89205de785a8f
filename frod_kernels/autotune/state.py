"""What ``"auto"`` remembers: its settings, the choices measured, the kernels verified against the torch twin and
the kernels found failing, in the process and, opt-in, in a JSON cache file shared by later runs and every rank.

Cache file: ``{"format": 1, "entries": {key: entry}}``, keyed by the JSON of a choice's key and the library
versions (another library, compiler or kernel set is another measurement), written atomically.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import tempfile
import threading
import warnings
from typing import Optional

import torch

from .. import _env

FORMAT = 1
# Device types whose choices are measured (and whose non-torch kernels auto runs at all): on the CPU, auto is the
# torch backend (Triton runs there only interpreted), and the CPU cost model was calibrated by measurement.
MEASURED_DEVICE_TYPES = {"cuda"}


@dataclasses.dataclass
class Choice:
    kind: str  # "backend", "path" or "verified"
    key: tuple
    chosen: str  # for "verified": the backend that was checked
    why: str
    times_ms: dict[str, float] = dataclasses.field(default_factory=dict)
    rejected: dict[str, str] = dataclasses.field(default_factory=dict)  # candidate -> why it was left out
    ok: bool = True  # for "verified": whether it matched the torch twin


class _State:
    def __init__(self) -> None:
        self.enabled = bool(_env.flag("FROD_AUTOTUNE", True))
        self.cache_file: Optional[str] = _env.path("FROD_AUTOTUNE_CACHE")
        self.choices: dict[tuple, Choice] = {}
        self.disk: Optional[dict[str, dict]] = None  # the cache file's entries, loaded on first use
        # (op, backend, device type) -> why: kernels that raised or computed a wrong result, never run again in
        # this process
        self.failed: dict[tuple[str, str, str], str] = {}
        self.lock = threading.Lock()
        # bumped by every settings change and clear(): the dispatch table keys its cache on it
        self.generation = 0


STATE = _State()


def set_autotune(enabled: bool = True, *, cache: "str | os.PathLike | None | bool" = None) -> None:
    """Measure ``"auto"``'s choices on a GPU (``enabled=True``, the default) or use the fixed order (``False``).

    ``cache``: a JSON file that keeps measured choices across processes (read at the first measurement, rewritten
    atomically after each new one); ``False`` stops using one; ``None`` leaves the current setting.
    """
    if enabled is not True and enabled is not False:
        raise TypeError(f"enabled: expected True or False, got {enabled!r}")
    if cache is not None and cache is not False and not isinstance(cache, (str, os.PathLike)):
        raise TypeError(f"cache: expected a file path, False or None, got {type(cache).__name__} {cache!r}")
    with STATE.lock:
        STATE.enabled = enabled
        if cache is False:
            STATE.cache_file, STATE.disk = None, None
        elif cache is not None:
            STATE.cache_file, STATE.disk = os.fspath(cache), None
        STATE.generation += 1


def get_autotune() -> dict:
    """``{"enabled": bool, "cache": path or None, "deterministic": bool}``: the settings now in force."""
    return {"enabled": STATE.enabled, "cache": STATE.cache_file,
            "deterministic": torch.are_deterministic_algorithms_enabled()}


def clear() -> None:
    """Forget this process's choices, verifications and failures (the cache file is left as it is)."""
    with STATE.lock:
        STATE.choices.clear()
        STATE.failed.clear()
        STATE.disk = None
        STATE.generation += 1


def not_measured(device: torch.device) -> Optional[str]:
    """Why choices on ``device`` are not measured now, or None when they are."""
    if device.type not in MEASURED_DEVICE_TYPES:
        return f"choices on {device.type} are not measured"
    if not STATE.enabled:
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
    # the device type first: every CPU call asks, and the reason's message need not be built for it
    return device.type in MEASURED_DEVICE_TYPES and not_measured(device) is None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return _cuda_name(device.index if device.index is not None else torch.cuda.current_device())
    return device.type


@functools.lru_cache(maxsize=None)
def _cuda_name(index: int) -> str:
    # every measured call builds a key with it: ask the driver once per device
    return torch.cuda.get_device_name(index)


def fail(op: str, backend: str, device_type: str, why: str) -> None:
    """Never run ``backend``'s ``op`` on ``device_type`` again in this process."""
    with STATE.lock:
        STATE.failed.setdefault((op, backend, device_type), why)
        STATE.generation += 1


def has_failed(op: str, backend: str, device_type: str) -> bool:
    return (op, backend, device_type) in STATE.failed


def record(choice: Choice) -> None:
    """Keep ``choice`` for the process and, with a cache file, on disk."""
    with STATE.lock:
        STATE.choices[choice.key] = choice
    _store(choice)


def lookup(key: tuple) -> Optional[Choice]:
    """The choice recorded for ``key``: this process's, else the cache file's."""
    hit = STATE.choices.get(key)
    if hit is not None:
        return hit
    entry = _disk_entries().get(_disk_key(key))
    if entry is None or not isinstance(entry.get("chosen"), str):
        return None
    choice = Choice(key[0], key, entry["chosen"], f"from {STATE.cache_file} ({entry.get('why', '')})",
                    dict(entry.get("times_ms", {})), dict(entry.get("rejected", {})), bool(entry.get("ok", True)))
    with STATE.lock:
        STATE.choices[key] = choice
    return choice


def _versions() -> dict[str, Optional[str]]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"frod_kernels": _env.VERSION, "torch": torch.__version__, "triton": triton_version}


def _disk_key(key: tuple) -> str:
    return json.dumps([list(key), _versions()])


def _disk_entries() -> dict[str, dict]:
    if STATE.cache_file is None:
        return {}
    if STATE.disk is None:
        STATE.disk = {}
        try:
            with open(STATE.cache_file, encoding="utf-8") as f:
                data = json.load(f)
            if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("entries"), dict):
                raise ValueError(f"not a format-{FORMAT} frod_kernels autotune cache")
            STATE.disk = {k: v for k, v in data["entries"].items() if isinstance(v, dict)}
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as e:
            warnings.warn(f"frod_kernels autotune: ignoring the cache file {STATE.cache_file!r} ({e}); it is "
                          "rewritten at the next measurement", RuntimeWarning, stacklevel=5)
    return STATE.disk


def _store(choice: Choice) -> None:
    if STATE.cache_file is None:
        return
    entries = _disk_entries()
    entries[_disk_key(choice.key)] = {"chosen": choice.chosen, "why": choice.why, "times_ms": choice.times_ms,
                                      "rejected": choice.rejected, "ok": choice.ok}
    path = STATE.cache_file
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".autotune-", suffix=".json")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"format": FORMAT, "entries": entries}, f, indent=1)
        os.replace(tmp, path)  # atomic: a reader sees the old file or the new one, never half of one
    except OSError as e:
        warnings.warn(f"frod_kernels autotune: cannot write the cache file {path!r} ({e}); choices stay in this "
                      "process", RuntimeWarning, stacklevel=5)
