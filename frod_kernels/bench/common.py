"""What every suite shares: timing, launch counts, peak memory, the machine description and table formatting.

Timing: on the CPU ``time.perf_counter`` around each call; on CUDA a pair of CUDA events per call. Both after
warm-up calls, reporting the median and the interquartile range over ``repeats`` calls.

Peak memory of one step, "above what was allocated when the step began" (weights, inputs and optimizer state are
already resident then and are reported separately where they differ between methods):

* CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus ``memory_allocated()``.
* CPU: the running sum of the allocation and free events of torch's CPU allocator (``torch.profiler`` with
  ``profile_memory=True``) over one step, maximized. Exact per method in one process, unlike the RSS high-water
  mark, which glibc's free lists make depend on what ran before; it does not see scratch memory that a library
  (MKL) allocates outside torch. The process's RSS high-water mark is recorded once in results.json.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import random
import shlex
import statistics
import sys
import time
from typing import Callable, Iterator, Optional

import torch

from .._numerics import dtype_name
from ..backends.cpu import PROFILER_PREFIX
from ..autotune import time_once


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_time(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> dict:
    """Median, quartiles, min and max of ``fn``'s wall time in milliseconds, after ``warmup`` untimed calls."""
    return measure_interleaved({"fn": fn}, device, repeats, warmup)["fn"]


def measure_interleaved(fns: dict[str, Callable[[], object]], device: torch.device, repeats: int, warmup: int,
                        timer: Callable[[Callable[[], object], torch.device], float] = time_once,
                        before: Optional[dict[str, Callable[[], object]]] = None) -> dict[str, dict]:
    """``measure_time`` for several methods at once, timed in rounds that run each method once, in a shuffled order.

    Side-by-side ratios then see the same machine: a shared or throttling CPU drifts by 10-20% over the seconds
    one method's repeats take, which timing the methods one after the other would read as a difference between
    them. ``timer(fn, device)`` gives one call's milliseconds (default: CUDA events on a GPU, the wall clock
    elsewhere; :func:`host_ms` for the host's time alone); ``before[name]``, when given, runs untimed before each
    of that method's calls, warm-up included (a state the method needs, a synchronization, a busy GPU).
    """
    before = before or {}
    for name, fn in fns.items():
        for _ in range(warmup):
            before.get(name, _nothing)()
            fn()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    # Each round in its own order (seeded, so runs are comparable): a call runs slower after one that filled the
    # caches with its own data, and a fixed order would hand every method the same predecessor, every round.
    order, rng = list(fns), random.Random(0)
    for _ in range(repeats):
        rng.shuffle(order)
        for name in order:
            before.get(name, _nothing)()
            times[name].append(timer(fns[name], device))
    return {name: summarize(ts) for name, ts in times.items()}


def _nothing() -> None:
    pass


def host_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Wall milliseconds of one call without synchronizing: on a GPU, the host's time to enqueue its work."""
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def busy_gpu(device: torch.device, cycles: int) -> Optional[Callable[[], None]]:
    """A ``before`` hook that queues a spin of ``cycles`` GPU clock cycles ahead of each timed call, so the host
    enqueues the call while the GPU still spins and the CUDA events around the call measure the device's own time,
    not its wait for the host. None where torch lacks the spin kernel (then the events include that wait)."""
    spin = getattr(torch.cuda, "_sleep", None)
    if device.type != "cuda" or spin is None:
        return None
    return lambda: spin(cycles)


def summarize(times_ms: list[float]) -> dict:
    """Median, quartiles (inclusive method), min and max, and the samples in the order they were taken."""
    ts = sorted(times_ms)
    q = statistics.quantiles(ts, n=4, method="inclusive") if len(ts) > 1 else [ts[0]] * 3
    return {"median_ms": statistics.median(ts), "q1_ms": q[0], "q3_ms": q[2], "min_ms": ts[0], "max_ms": ts[-1],
            "repeats": len(ts), "samples_ms": list(times_ms)}


def measure_peak_memory(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated during one call of ``fn`` above what was allocated when it began (module docstring)."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - base)
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr_fd(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.device_type() ==
              torch.autograd.DeviceType.CPU]
    cur = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        cur += e.nbytes()
        peak = max(peak, cur)
    return int(peak)


LAUNCH_NOTE = ("aten ops: every aten:: operator event torch.profiler records over one call, forward and backward "
               "(each is a trip through the dispatcher), counting as such the CPU's kernels outside aten (oneDNN's "
               "packed products, mkldnn::, and the cpu backend's C kernels, frod_cpu::); leaf aten ops: those with "
               "no such event below them, the CPU's count of launches (a composite that calls another aten op is "
               "not a leaf: aten::mm calling aten::resolve_conj counts as its resolve_conj calls); CUDA kernels: "
               "kernel events on the GPU, memcpy and memset excluded")
# operator events: aten's, and the CPU kernels that run outside it (see LAUNCH_NOTE)
_OPERATOR_PREFIXES = ("aten::", "mkldnn::", PROFILER_PREFIX)


def count_ops(fn: Callable[[], object], device: torch.device) -> dict:
    """What one call of ``fn`` dispatches, from ``torch.profiler``: ``aten_ops``, ``leaf_aten_ops`` and, on a GPU,
    ``cuda_kernels`` (see :data:`LAUNCH_NOTE`)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with _quiet_stderr_fd(), profile(activities=activities) as prof:
        fn()
        synchronize(device)
    events = prof.events()
    aten = [e for e in events
            if e.name.startswith(_OPERATOR_PREFIXES) and e.device_type == torch.autograd.DeviceType.CPU]

    def has_aten_below(e) -> bool:
        return any(c.name.startswith(_OPERATOR_PREFIXES) or has_aten_below(c) for c in e.cpu_children)

    counts = {"aten_ops": len(aten), "leaf_aten_ops": sum(not has_aten_below(e) for e in aten)}
    if device.type == "cuda":
        counts["cuda_kernels"] = sum(e.device_type == torch.autograd.DeviceType.CUDA
                                     and not e.name.startswith(("Memcpy", "Memset")) for e in events)
    return counts


@contextlib.contextmanager
def _quiet_stderr_fd() -> Iterator[None]:
    """Silence file descriptor 2: the profiler's C++ side logs a line per start and stop (KINETO_LOG_LEVEL is read
    when torch loads, too late to set here), which would tear the progress bar apart."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def tensor_bytes(tensors) -> int:
    """Bytes of distinct storages among ``tensors`` (shared buffers, such as PEFT's V, count once)."""
    seen, total = set(), 0
    for t in tensors:
        if t is None or not isinstance(t, torch.Tensor):
            continue
        key = (t.device, t.untyped_storage().data_ptr())
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype) -> dict:
    """Measured TFLOP/s of a large square matmul: the denominator of the "fraction of peak" column."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = measure_time(lambda: a @ b, device, repeats=10 if device.type == "cuda" else 5, warmup=3)
    return {"n": n, "dtype": dtype_name(dtype), "median_ms": t["median_ms"],
            "tflops": 2 * n ** 3 / (t["median_ms"] * 1e-3) / 1e12}


def copy_bandwidth(device: torch.device) -> dict:
    """Measured device-memory bandwidth of a large copy (bytes read plus written per second): the roofline's other
    denominator, beside :func:`matmul_peak_tflops`."""
    n = (1 << 28) if device.type == "cuda" else (1 << 24)  # 1 GiB of float32 on a GPU
    a = torch.randn(n, device=device)
    b = torch.empty_like(a)
    t = measure_time(lambda: b.copy_(a), device, repeats=10 if device.type == "cuda" else 5, warmup=3)
    return {"bytes": 2 * 4 * n, "median_ms": t["median_ms"], "bytes_per_s": 2 * 4 * n / (t["median_ms"] * 1e-3)}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module: str) -> Optional[str]:
    try:
        return __import__(module).__version__
    except Exception:  # a missing optional package is a fact to record, not an error
        return None


def process_memory_bytes(field: str = "VmHWM") -> Optional[int]:
    """A memory field of this process from /proc/self/status (VmHWM: the RSS high-water mark; VmRSS), or None
    where there is no /proc."""
    try:
        with open("/proc/self/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _program() -> str:
    prog = os.path.basename(sys.argv[0])
    return "python -m frod_kernels.bench" if prog in ("__main__.py", "-c", "") else prog


def environment(device: torch.device, argv: list[str]) -> dict:
    """Machine, versions, date and the exact command: recorded beside every number in results.json."""
    import frod_kernels

    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([_program(), shlex.join(argv)]).strip(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_model(),
        "cpu_model": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {"frod_kernels": frod_kernels.__version__, "torch": torch.__version__,
                     "triton": _version("triton"), "peft": _version("peft"),
                     "transformers": _version("transformers"), "cuda": torch.version.cuda},
        "backends": frod_kernels.available_backends(),
    }
    return env


def fmt_ms(ms: Optional[float]) -> str:
    if ms is None:
        return "-"
    return f"{ms:.3f}" if ms < 1 else f"{ms:.1f}" if ms < 1000 else f"{ms:.0f}"


def fmt_bytes(n: Optional[int]) -> str:
    if n is None:
        return "-"
    return f"{n / 2**20:.1f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


def fmt_ratio(r: Optional[float]) -> str:
    return "-" if r is None else f"{r:.2f}x"


class Quiet:
    """The progress sink of a suite run from code or a test: each suite calls ``start(label)`` as a measurement
    begins and ``done(row)`` as its row is complete; frod-bench's own sink prints them."""

    def start(self, label: str) -> None:
        pass

    def done(self, row: dict) -> None:
        pass
