"""Helpers shared by the Triton kernel modules: interpreter detection, autotuning setup, accumulator dtypes."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton import knobs

from ..._numerics import acc_dtype


def interpreting() -> bool:
    return bool(knobs.runtime.interpret)


# Read once, when the kernel modules are first imported: @triton.jit decides then whether a kernel is compiled or
# interpreted, so every launch decision below must agree with that moment.
INTERPRET = interpreting()


def _interpreter_takes_runtime_loop_bounds():
    """Let Triton 3.6's interpreter run ``range()`` over a runtime bound with numpy >= 2.4.

    The interpreter holds every scalar as a one-element array (its kernel arguments, reductions and constants alike:
    no kernel code can make a 0-d one), and 3.6 gives ``range()`` that scalar through ``int(array)``, which numpy 2.4
    refuses ("only 0-dimensional arrays can be converted to Python scalars"; numpy 2.3 warns). Triton 3.8 squeezes
    the array first; this does the same for an interpreter that does not, and nothing where it already copes.
    """
    import warnings
    from types import SimpleNamespace

    import numpy as np
    from triton.runtime import interpreter

    patch_tensor = getattr(interpreter, "_patch_lang_tensor", None)
    scope_type = getattr(interpreter, "_LangPatchScope", None)
    if patch_tensor is None or scope_type is None:
        return

    class Probe:
        pass

    scope = scope_type()
    patch_tensor(Probe, scope)
    probe = Probe()
    probe.handle = SimpleNamespace(data=np.array([3]))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", DeprecationWarning)
            copes = range(probe).stop == 3
    except (TypeError, DeprecationWarning):
        copes = False
    finally:
        scope.restore()
    if copes:
        return

    def patched(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patched


if INTERPRET:
    _interpreter_takes_runtime_loop_bounds()


def autotune(gpu_configs: list[triton.Config], interp_config: triton.Config, key: list[str], prune=None):
    """``triton.autotune`` over ``gpu_configs``, or the one fixed ``interp_config`` under the interpreter.

    With one config Triton's autotuner launches it directly without benchmarking, which the interpreter (slow, and
    timing a CPU emulation says nothing about a GPU) needs. Results are cached per key for the process.

    The returned decorator's autotuners carry ``gpu_configs`` either way: :mod:`.compile_report` compiles each of
    them for real GPUs, also from a process that interprets.
    """
    if INTERPRET:
        tune = triton.autotune(configs=[interp_config], key=key)
    else:
        tune = triton.autotune(configs=gpu_configs, key=key,
                               prune_configs_by={"early_config_prune": prune} if prune else None)

    def decorate(fn):
        tuner = tune(fn)
        tuner.gpu_configs = list(gpu_configs)
        return tuner

    return decorate


def tl_acc_dtype(dtype: torch.dtype):
    """:func:`frod_kernels._numerics.acc_dtype` as a Triton dtype."""
    return tl.float64 if acc_dtype(dtype) == torch.float64 else tl.float32
