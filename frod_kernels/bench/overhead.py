"""Overhead suite: host time and dispatched ops of one forward+backward at a shape too small for any kernel to
matter (64 -> 64, 8 tokens, float32), method by method on one base layer: what a layer costs in Python and
dispatch around its kernels (docs/DESIGN.md section 9, host time).

Methods: a frozen ``nn.Linear`` (backward to the input only), PEFT LoRA r=8, PEFT FRoD, a second PEFT FRoD layer
after ``frod_kernels.peft.accelerate``, ``fk.FrodLinear.from_linear`` and ``fk.frod_linear`` under each forced
path. The FRoD methods compute the gradients of ``x``, ``lambda_l`` and ``s_values``; LoRA those of ``x`` and its
two factors. Only frod_kernels' public API is used, so the suite measures what a user calls.

Host time: one torch thread for the whole suite (restored after), so a number is one core's work and not MKL's
thread barriers; methods interleaved in rounds (:func:`.common.measure_interleaved`); median and quartiles over
the preset's ``overhead_repeats`` calls. On the CPU that is the wall time of a call. On a GPU two numbers: the
host's time to enqueue a call (wall clock without synchronizing, after a synchronize) and the GPU's time for it
(CUDA events, with a spin kernel queued ahead of the call so the events see the device's own time, not its wait for
the host). Launch counts: one call under ``torch.profiler`` (:data:`.common.LAUNCH_NOTE`).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import nn

import frod_kernels as fk

from .. import engine
from . import peft_models
from .common import busy_gpu, count_ops, host_ms, measure_interleaved, synchronize
from .sizes import Sizes

N_IN, N_OUT, TOKENS = 64, 64, 8
LORA_RANK = 8
LINEAR = "frozen nn.Linear"
LORA = f"PEFT LoRA r={LORA_RANK}"
PEFT_FROD = "PEFT FRoD"
ACCELERATED = "PEFT FRoD + frod_kernels.peft.accelerate"
FROD_LINEAR = "FrodLinear"
# A spin this long (GPU clock cycles, about 1 ms at 2 GHz) per millisecond of host time to enqueue a call.
SPIN_CYCLES_PER_MS = 2_000_000


def frod_linear_method(path: str) -> str:
    return f"frod_linear [path={path}]"


METHODS = (LINEAR, LORA, PEFT_FROD, ACCELERATED, FROD_LINEAR,
           *(frod_linear_method(p) for p in engine.PATH_NAMES.values()))


def n_steps(sizes: Sizes, device: torch.device) -> int:
    return len(METHODS)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _steps(device: torch.device) -> tuple[dict[str, Callable[[], object]], dict[str, Callable[[], object]], Callable]:
    """(method -> one forward+backward, method -> what must hold before its calls, cleanup)."""
    import frod_kernels.peft as fkp

    torch.manual_seed(0)
    base = nn.Linear(N_IN, N_OUT, bias=False).requires_grad_(False)
    _, peft_layer = peft_models.peft_frod_linear(base)
    accelerated_model, accelerated_layer = peft_models.peft_frod_linear(base)
    _, lora_layer = peft_models.peft_lora_linear(base, rank=LORA_RANK)
    # cache=False: a benchmark does not write into the user's projection cache
    frod_layer = fk.FrodLinear.from_linear(base, cache=False)
    with torch.no_grad():
        frod_layer.s_values.normal_(0.0, 0.02)  # as after some training: S = 0 would let a kernel skip work
    for m in (base, peft_layer, accelerated_layer, lora_layer, frod_layer):
        m.to(device)
    x = torch.randn(TOKENS, N_IN, device=device, requires_grad=True)
    g = torch.randn(TOKENS, N_OUT, device=device)
    t = peft_models.frod_tensors(peft_layer)
    # U column-major, as FrodLinear and the PEFT integration store it (docs/DESIGN.md section 6)
    V, U, idx = t["V"], t["U"].t().contiguous().t(), t["s_indices"].to(device)
    lam = t["lambda_l"].detach().clone().requires_grad_(True)
    s = t["s_values"].detach().clone().requires_grad_(True)

    def step(layer: Callable[[torch.Tensor], torch.Tensor], params: list[torch.Tensor]) -> Callable[[], object]:
        # autograd.grad, not backward: nothing accumulates in .grad between calls
        return lambda: torch.autograd.grad(layer(x), [x, *params], g)

    steps = {
        LINEAR: step(base, []),
        LORA: step(lora_layer, [lora_layer.lora_A["default"].weight, lora_layer.lora_B["default"].weight]),
        PEFT_FROD: step(peft_layer, [t["lambda_l"], t["s_values"]]),
        ACCELERATED: step(accelerated_layer, [accelerated_layer.frod_lambda_l["default"],
                                              accelerated_layer.frod_lambda_s_values["default"]]),
        FROD_LINEAR: step(frod_layer, [frod_layer.lambda_l, frod_layer.s_values]),
    }
    for p in engine.PATH_NAMES.values():
        steps[frod_linear_method(p)] = step(lambda x, p=p: fk.frod_linear(x, V, U, lam, s, idx, path=p), [lam, s])
    # accelerate() swaps PEFT's forward at class level: PEFT FRoD's calls run with PEFT's own, untouched.
    before = {PEFT_FROD: lambda: fkp.accelerate(accelerated_model, enabled=False),
              ACCELERATED: lambda: fkp.accelerate(accelerated_model)}
    return steps, before, lambda: fkp.accelerate(accelerated_model, enabled=False)


def _then(*hooks: Callable[[], object] | None) -> Callable[[], None]:
    """One ``before`` hook that runs the given ones (None: absent) in order."""
    present = [h for h in hooks if h is not None]

    def run() -> None:
        for h in present:
            h()

    return run


def run(sizes: Sizes, device: torch.device, progress) -> list[dict]:
    rows = {m: {"suite": "overhead", "method": m, "n_in": N_IN, "n_out": N_OUT, "tokens": TOKENS,
                "dtype": "float32", "threads": 1} for m in METHODS}
    with one_thread():
        try:
            steps, before, cleanup = _steps(device)
        except Exception as e:  # reported in every row; the other suites still run
            for row in rows.values():
                row["error"] = f"{type(e).__name__}: {e}"
                progress.done(row)
            return list(rows.values())
        try:
            for m in METHODS:
                progress.start(f"overhead {m}: launch count")
                try:
                    before.get(m, _then())()
                    steps[m]()  # one-time work (layouts, caches, auto's tuning) is not a call's launches
                    rows[m].update(count_ops(steps[m], device))
                except Exception as e:  # reported in its row; the other methods are still timed
                    rows[m]["error"] = f"{type(e).__name__}: {e}"
                    del steps[m]
            progress.start("overhead: host time, methods interleaved")
            host, gpu, spin = _time(steps, before, device, max(sizes.warmup, 10), sizes.overhead_repeats)
        finally:
            cleanup()
    for m in steps:
        rows[m].update(host[m], host_timer="host enqueue, no sync" if device.type == "cuda" else "wall clock")
        if gpu:
            rows[m]["gpu"] = dict(gpu[m], timer="CUDA events" + (", GPU busy ahead of each call" if spin else
                                                                 ", GPU waits for the host (no spin kernel)"))
    _derive(list(rows.values()))
    for row in rows.values():
        progress.done(row)
    return list(rows.values())


def _time(steps: dict, before: dict, device: torch.device, warmup: int, repeats: int):
    """(host times, GPU times or {}, the spin hook or None) of every method, interleaved."""
    if device.type != "cuda":
        return measure_interleaved(steps, device, repeats, warmup, host_ms, before), {}, None
    sync = lambda: synchronize(device)  # noqa: E731
    host = measure_interleaved(steps, device, repeats, warmup, host_ms, {m: _then(before.get(m), sync) for m in steps})
    # the spin must outlast the host's enqueue of the slowest method, or the events see the host again
    spin = busy_gpu(device, int(SPIN_CYCLES_PER_MS * (1 + 2 * max(h["q3_ms"] for h in host.values()))))
    gpu = measure_interleaved(steps, device, repeats, warmup, before={m: _then(before.get(m), spin) for m in steps})
    return host, gpu, spin


def _derive(rows: list[dict]) -> None:
    """Host time relative to PEFT LoRA r=8 and to the frozen nn.Linear, and the GPU time's likewise."""
    ref = {r["method"]: r for r in rows}
    for r in rows:
        for key, stats in (("", r), ("gpu_", r.get("gpu"))):
            if not stats or stats.get("median_ms") is None:
                continue
            for name, other in (("lora", LORA), ("linear", LINEAR)):
                o = (ref[other].get("gpu") if key else ref[other]) or {}
                r[f"{key}time_vs_{name}"] = stats["median_ms"] / o["median_ms"] if o.get("median_ms") else None
