"""The shapes each frod-bench suite runs, per size preset (``--sizes``), and the dtype names ``--dtype`` takes."""

from __future__ import annotations

import dataclasses

import torch

# Operand layouts of a kernel-family op's dense input (the kernels suite): rows contiguous, as the activations the
# engine produces feature-major (z^T, dt^T); or U^T, the transposed view of a row-major U (out x in) that the
# full-rank update and the materialized path's SDDMM read, one element per row apart.
ROWS, U_T = "rows", "U^T view"


@dataclasses.dataclass
class Sizes:
    """Shapes of one run. ``layer_shapes`` are (in, out) pairs; ``train`` is a LlamaConfig subset plus batch/seq;
    ``init_model`` is (hidden, layers) of the init suite's Llama; ``kernel_cases`` are (in, m, layout) of the
    kernels suite, m the length of a row (tokens, or out for the full-rank update)."""

    name: str
    dtype: torch.dtype
    layer_shapes: list[tuple[int, int]]
    layer_tokens: list[int]
    check_tokens: list[int]
    train: dict
    repeats: int
    warmup: int
    init_repeats: int
    init_model: tuple[int, int]
    # fwd+bwd calls per method in the overhead suite: each is 0.05-2 ms, and host time is a noisy distribution
    overhead_repeats: int
    kernel_cases: list[tuple[int, int, str]]
    # Time frod_linear under each forced engine path as well as the cost model's choice: the data that calibrates
    # the cost model's crossover (cost_model.SPARSE_COST) on a device.
    all_paths: bool = False


def _train_cfg(hidden, layers, inter, heads, kv_heads, vocab, batch, seq):
    return dict(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=inter, num_attention_heads=heads,
                num_key_value_heads=kv_heads, vocab_size=vocab, batch=batch, seq=seq)


def _kernel_cases(widths, lengths):
    """Rows-contiguous operands at every (in, m), and U^T views where m is an out width (m >= 1024)."""
    return [(n, m, ROWS) for n in widths for m in lengths] + [(n, m, U_T) for n in widths for m in lengths
                                                                if m >= 1024 and m <= n]


# `tiny` is for tests and dry runs; `cpu` finishes the suites in a few minutes on 2 cores; `gpu` and `full` use the
# shapes of the Triton issue (4096->4096, 4096->1024, 14336->4096 and a ~1B Llama with 4 x 1024 tokens). The
# kernels suite checks every result against a float64 twin on the CPU (seconds at in=4096, m=4096): `gpu` keeps it
# to m=1024 (bench/gpu_check.sh runs it in about a minute), `full` stops at m=4096.
PRESETS = {
    "tiny": Sizes("tiny", torch.float32, [(96, 80)], [1, 33], [3, 17],
                  _train_cfg(64, 2, 128, 4, 4, 128, 2, 16), repeats=3, warmup=1, init_repeats=1,
                  init_model=(64, 2), overhead_repeats=20, kernel_cases=[(64, 8, ROWS), (96, 80, U_T)]),
    "cpu": Sizes("cpu", torch.float32, [(1024, 1024)], [8, 128, 512, 2048], [3, 257],
                 _train_cfg(512, 4, 1376, 8, 8, 2000, 2, 256), repeats=11, warmup=2, init_repeats=3,
                 init_model=(512, 4), overhead_repeats=300,
                 kernel_cases=[(1024, 8, ROWS), (1024, 512, ROWS), (1024, 1024, U_T)]),
    "gpu": Sizes("gpu", torch.bfloat16, [(4096, 4096)], [1, 512, 4096, 16384], [3, 257],
                 _train_cfg(2048, 4, 5632, 16, 16, 32000, 4, 1024), repeats=20, warmup=3, init_repeats=1,
                 init_model=(2048, 4), overhead_repeats=200,
                 kernel_cases=[(4096, 8, ROWS), (4096, 1024, ROWS), (4096, 1024, U_T)]),
    "full": Sizes("full", torch.bfloat16, [(4096, 4096), (4096, 1024), (14336, 4096)], [1, 512, 4096, 16384],
                  [3, 67], _train_cfg(2048, 16, 5632, 16, 16, 32000, 4, 1024), repeats=20, warmup=3,
                  init_repeats=1, init_model=(2048, 16), overhead_repeats=500,
                  kernel_cases=_kernel_cases((1024, 4096), (8, 128, 1024, 4096))),
}

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
