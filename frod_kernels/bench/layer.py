"""Layer suite: forward+backward of one adapted linear layer, method by method on the same weights and data.

Methods: ``frod_linear`` under each backend that can run here (and, on the CPU, under ``"auto"``), PEFT's FRoD
layer (whose V, U, lambda_l, s_values and s_indices ``frod_linear`` uses), PEFT LoRA r=32 on the same base layer,
and the frozen ``nn.Linear`` (forward, and backward to the input only). Every method computes the gradient of
``x`` (as a layer inside a trained stack must) and of its trainable parameters, through ``torch.autograd.grad`` so
nothing accumulates between calls.

PEFT's layer is built with :func:`~frod_kernels.bench.peft_models.fast_projections` (a random orthogonal ``V``):
the time of a forward+backward does not depend on V's values, and PEFT's own setup, timed by the init suite, takes
minutes for the widest shapes.

FLOPs, for the "fraction of matmul peak" column: the minimum of docs/DESIGN.md section 3, the materialized path's
three GEMMs of ``b * in * out`` multiply-adds (forward, ``dx``, and the weight-shaped gradient that ``dlambda`` and
``dS`` are read from), so ``6 * b * in * out`` FLOPs for every adapted method; ``4 * b * in * out`` for the frozen
layer (forward and ``dx``). LoRA's rank-32 extra work is not counted, so its fraction is slightly understated.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import frod_kernels as fk
from frod_kernels import autotune, cost_model, engine, roofline

from .._numerics import dtype_name
from . import peft_models
from .common import measure_interleaved, measure_peak_memory
from .sizes import Sizes

PEFT_FROD = "PEFT FRoD"
LORA = f"PEFT LoRA r={peft_models.LORA_RANK}"
LINEAR = "frozen nn.Linear"


def frod_method(backend: str, path: str | None = None) -> str:
    return f"frod_linear [{backend}]" if path is None else f"frod_linear [{backend}/{path}]"


def runnable_backends(device: torch.device) -> list[str]:
    return [b for b, where in fk.available_backends().items() if where.get(device.type) is None]


def backend_plan(device: torch.device) -> dict[str, str | None]:
    """Every backend, with None where it is timed on ``device`` or the reason it is not. Triton on the CPU runs
    only under its interpreter, a correctness tool thousands of times slower than any kernel (the check suite and
    the tests still cover it)."""
    plan = {b: where.get(device.type) for b, where in fk.available_backends().items()}
    if device.type == "cpu" and plan.get("triton") is None:
        plan["triton"] = ("runs on the CPU only under its interpreter (TRITON_INTERPRET=1), a correctness tool "
                          "thousands of times slower than a kernel: checked by the tests, not timed")
    return plan


def timed_backends(device: torch.device) -> list[str]:
    return [b for b, why in backend_plan(device).items() if why is None]


def layer_backends(device: torch.device) -> list[str]:
    """The backends the suite times ``frod_linear`` under: every one that runs here and, on the CPU, ``"auto"``
    first, the default, which there runs the C kernels on small calls and the twin on large ones (a mix no named
    backend shows). On a GPU ``"auto"`` takes the fastest backend per call class, which the named rows show."""
    return (["auto"] if device.type == "cpu" else []) + timed_backends(device)


def n_steps(sizes: Sizes, device: torch.device) -> int:
    per_backend = 1 + (len(engine.PATH_NAMES) if sizes.all_paths else 0)
    return len(sizes.layer_shapes) * len(sizes.layer_tokens) * (3 + per_backend * len(layer_backends(device)))


def _methods(base: nn.Linear, device: torch.device, dtype: torch.dtype, backends: list[str], all_paths: bool):
    """((name, path, make_step) per method, nnz); make_step(x, g) returns a no-argument forward+backward
    callable."""
    with peft_models.fast_projections(device):
        frod_model, frod_layer = peft_models.peft_frod_linear(base)
    frod_model.to(device)
    _, lora_layer = peft_models.peft_lora_linear(base)
    lora_layer.to(device)
    t = peft_models.frod_tensors(frod_layer)
    # U column-major, as FrodLinear and the PEFT integration store it (docs/DESIGN.md section 6)
    V, U = t["V"].to(device, dtype), t["U"].to(device, dtype).t().contiguous().t()
    lam = t["lambda_l"].detach().clone().requires_grad_(True)
    s = t["s_values"].detach().clone().requires_grad_(True)
    idx = t["s_indices"].to(device)
    W = base.weight.detach().to(device, dtype)

    def peft_frod(x, g):
        params = [x, t["lambda_l"], t["s_values"]]
        return lambda: torch.autograd.grad(frod_layer(x), params, g)

    def lora(x, g):
        params = [x, lora_layer.lora_A["default"].weight, lora_layer.lora_B["default"].weight]
        return lambda: torch.autograd.grad(lora_layer(x), params, g)

    def linear(x, g):
        return lambda: torch.autograd.grad(F.linear(x, W), [x], g)

    def frod(backend, forced=None):
        def make(x, g):
            def step():
                with fk.use_backend(backend):
                    y = fk.frod_linear(x, V, U, lam, s, idx, path=forced)
                    return torch.autograd.grad(y, [x, lam, s], g)
            return step
        return make

    nnz = idx.shape[1]

    def path(backend):
        def chosen(tokens):
            # what the step ran: auto's measured choice where it measured one, else the cost model's (among the
            # kernel paths where a backend is named, which rules the dense path out)
            key = autotune.path_key(tokens, V.shape[0], U.shape[0], nnz, dtype, device, True)
            return autotune.chosen(key) or engine.PATH_NAMES[cost_model.choose_path(
                tokens, V.shape[0], U.shape[0], nnz, device.type, True, kernels_only=backend != "auto")]
        return chosen

    methods = []
    for b in backends:
        methods.append((frod_method(b), path(b), frod(b)))
        if all_paths:
            methods += [(frod_method(b, p), lambda tokens, p=p: p, frod(b, p)) for p in engine.PATH_NAMES.values()]
    methods += [(PEFT_FROD, None, peft_frod), (LORA, None, lora), (LINEAR, None, linear)]
    return methods, nnz


def run(sizes: Sizes, device: torch.device, peak_tflops: float | None, progress,
        gpu: "roofline.GPU | None" = None) -> list[dict]:
    """The suite's rows; with ``gpu`` (the device's measured peaks), each row also gets its roofline floor."""
    dtype, rows = sizes.dtype, []
    backends = layer_backends(device)
    for n_in, n_out in sizes.layer_shapes:
        torch.manual_seed(n_in * 7919 + n_out)
        with torch.device("cpu"):
            base = nn.Linear(n_in, n_out, bias=False).to(dtype)
        base.requires_grad_(False)
        methods, nnz = _methods(base, device, dtype, backends, sizes.all_paths)
        for tokens in sizes.layer_tokens:
            x = torch.randn(tokens, n_in, device=device, dtype=dtype, requires_grad=True)
            g = torch.randn(tokens, n_out, device=device, dtype=dtype)
            group, steps = [], {}
            for name, path, make in methods:
                progress.start(f"layer {n_in}x{n_out} b={tokens} {name}")
                row = {"suite": "layer", "method": name, "n_in": n_in, "n_out": n_out, "tokens": tokens,
                       "dtype": dtype_name(dtype), "path": None}
                try:
                    step = make(x, g)
                    step()  # one-time work (the pattern layout, Triton's and auto's tuning) is not a step's memory
                    row["path"] = path(tokens) if path else None
                    row["peak_mem_bytes"] = measure_peak_memory(step, device)
                    steps[name] = step
                except Exception as e:  # one failing method is reported in its row; the others still run
                    row["error"] = f"{type(e).__name__}: {e}"
                group.append(row)
            timed = measure_interleaved(steps, device, sizes.repeats, sizes.warmup)
            for row in group:
                row.update(timed.get(row["method"], {}))
            _derive(group, peak_tflops)
            if gpu is not None:
                add_floors(group, gpu, nnz)
            for row in group:
                progress.done(row)
            rows += group
        del methods
    return rows


def _derive(group: list[dict], peak_tflops: float | None) -> None:
    """Throughput, FLOP rate and the ratios to PEFT FRoD and LoRA within one (shape, tokens) group."""
    ref = {r["method"]: r.get("median_ms") for r in group}
    for r in group:
        ms = r.get("median_ms")
        if ms is None:
            continue
        b, macs = r["tokens"], r["tokens"] * r["n_in"] * r["n_out"]
        r["tokens_per_s"] = b / (ms * 1e-3)
        r["flops"] = (4 if r["method"] == LINEAR else 6) * macs
        r["tflops"] = r["flops"] / (ms * 1e-3) / 1e12
        r["frac_of_peak"] = r["tflops"] / peak_tflops if peak_tflops else None
        r["speedup_vs_peft_frod"] = ref[PEFT_FROD] / ms if ref.get(PEFT_FROD) else None
        r["time_vs_lora"] = ms / ref[LORA] if ref.get(LORA) else None


def add_floors(group: list[dict], gpu: "roofline.GPU", nnz: int) -> None:
    """Each row's roofline floor on ``gpu`` and its fraction of it (1.0: at the roofline). FRoD rows, PEFT's
    included, are held to the least time FRoD's math allows (the best path's floor); ours also to the floor of
    the path they ran, which tells a slow kernel from a poor path choice. LoRA and the frozen layer get their own."""
    for r in group:
        if r.get("median_ms") is None:
            continue
        b, n_in, n_out, dtype = r["tokens"], r["n_in"], r["n_out"], r["dtype"]
        if r["method"] == LINEAR:
            floor = roofline.floor_ms(roofline.linear_steps(b, n_in, n_out, dtype), gpu, dtype)
        elif r["method"] == LORA:
            floor = roofline.floor_ms(roofline.lora_steps(b, n_in, n_out, peft_models.LORA_RANK, dtype), gpu, dtype)
        else:
            floor = roofline.frod_floor(b, n_in, n_out, nnz, gpu, dtype)[1]
            if r.get("path") in engine.KERNEL_PATH_NAMES.values():  # the dense path has no roofline
                p = next(k for k, v in engine.KERNEL_PATH_NAMES.items() if v == r["path"])
                r["path_floor_ms"] = roofline.floor_ms(roofline.path_steps(p, b, n_in, n_out, nnz, dtype), gpu,
                                                       dtype)
        r["floor_ms"] = floor
        r["frac_of_floor"] = floor / r["median_ms"]
