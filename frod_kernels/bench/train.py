"""Train suite: AdamW steps of a Llama-style causal LM (random weights from a transformers config) with adapters
on ``q_proj``/``v_proj``: PEFT LoRA r=32, PEFT FRoD, and the same PEFT FRoD model after
``frod_kernels.peft.accelerate(model)``.

LoRA and PEFT FRoD each get a freshly built model from the same seed (same base weights); the accelerated row
reuses the PEFT FRoD model, so PEFT's projection setup is paid once. All use the same token batch and each its own
AdamW over its trainable parameters. Peak memory here is absolute: what is resident when the step begins (model,
adapter, optimizer state; ``torch.cuda.memory_allocated`` on a GPU, the distinct tensor storages on the CPU) plus
the step's own peak above that (see :mod:`frod_kernels.bench.common`). ``v_bytes`` is the size of FRoD's shared
``V`` matrices, for the aim "peak no more than LoRA's plus the V matrices".
"""

from __future__ import annotations

import gc
import time

import torch

from .._numerics import dtype_name
from . import peft_models
from .common import measure_peak_memory, measure_time, tensor_bytes
from .sizes import Sizes

PEFT_FROD = "PEFT FRoD"
ACCELERATED = "PEFT FRoD + frod_kernels.peft.accelerate"
LORA = f"PEFT LoRA r={peft_models.LORA_RANK}"
METHODS = (LORA, PEFT_FROD, ACCELERATED)


def n_steps(sizes: Sizes, device: torch.device) -> int:
    return len(METHODS)


def _accelerate():
    """``frod_kernels.peft.accelerate``, or the reason it cannot be used yet."""
    try:
        from frod_kernels.peft import accelerate
    except ImportError as e:
        return None, f"frod_kernels.peft.accelerate is not available ({e})"
    return accelerate, None


def _resident_bytes(model, opt, device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    state = [t for s in opt.state.values() for t in s.values()]
    grads = [p.grad for p in model.parameters()]
    return tensor_bytes([*model.parameters(), *model.buffers(), *state, *grads])


def _measure(model, ids, sizes: Sizes, device: torch.device) -> dict:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    # The first steps allocate AdamW's state; warm-up covers them so the timed steps are steady-state.
    res = measure_time(step, device, sizes.repeats, max(sizes.warmup, 2))
    res["resident_bytes"] = _resident_bytes(model, opt, device)
    res["peak_mem_bytes"] = res["resident_bytes"] + measure_peak_memory(step, device)
    res["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return res


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run(sizes: Sizes, device: torch.device, progress) -> list[dict]:
    cfg, dtype = sizes.train, sizes.dtype
    tokens = cfg["batch"] * cfg["seq"]
    ids = torch.randint(0, cfg["vocab_size"], (cfg["batch"], cfg["seq"]),
                        generator=torch.Generator().manual_seed(1)).to(device)
    base = {"suite": "train", "dtype": dtype_name(dtype), "tokens": tokens, "model": "llama", **cfg}
    rows = []

    def record(method, fn):
        progress.start(f"train {method}")
        row = dict(base, method=method)
        try:
            row.update(fn())
        except Exception as e:  # one failing method is reported in its row; the others still run
            row["error"] = f"{type(e).__name__}: {e}"
        rows.append(row)
        progress.done(row)

    def lora():
        t0 = time.perf_counter()
        model = peft_models.wrap(peft_models.llama(cfg, dtype, device), peft_models.lora_config(peft_models.TARGETS))
        return dict(_measure(model, ids, sizes, device), setup_s=time.perf_counter() - t0)

    record(LORA, lora)
    _free(device)

    frod = {}

    def peft_frod():
        t0 = time.perf_counter()
        frod["model"] = peft_models.wrap(peft_models.llama(cfg, dtype, device),
                                         peft_models.frod_config(peft_models.TARGETS))
        frod["setup_s"] = time.perf_counter() - t0
        frod["v_bytes"] = tensor_bytes(t for d in frod["model"].base_model.frod_V.values() for t in d.values())
        return dict(_measure(frod["model"], ids, sizes, device), setup_s=frod["setup_s"], v_bytes=frod["v_bytes"])

    record(PEFT_FROD, peft_frod)
    _free(device)

    accelerate, reason = _accelerate()
    if "model" not in frod:
        record(ACCELERATED, lambda: {"skipped": "PEFT FRoD model could not be built"})
    elif accelerate is None:
        record(ACCELERATED, lambda: {"skipped": reason})
    else:
        def accelerated():
            # The same model PEFT FRoD just trained on, so its setup is not paid twice (same weights, fresh AdamW).
            t0 = time.perf_counter()
            model = accelerate(frod["model"]) or frod["model"]
            return dict(_measure(model, ids, sizes, device), setup_s=frod["setup_s"],
                        accelerate_s=time.perf_counter() - t0, v_bytes=frod["v_bytes"])

        record(ACCELERATED, accelerated)
        # accelerate() swaps PEFT's methods at class level: hand them back so later suites time PEFT itself.
        accelerate(frod["model"], enabled=False)
    frod.clear()
    _free(device)

    ref = {r["method"]: r.get("median_ms") for r in rows}
    for r in rows:
        ms = r.get("median_ms")
        if ms is None:
            continue
        r["tokens_per_s"] = tokens / (ms * 1e-3)
        r["speedup_vs_peft_frod"] = ref[PEFT_FROD] / ms if ref.get(PEFT_FROD) else None
        r["time_vs_lora"] = ms / ref[LORA] if ref.get(LORA) else None
    return rows
