"""What ``"auto"`` runs for a kernel-family call where more than the torch twin could run.

* Measured (the default on a GPU): the first call of each shape class times every backend that can run, each
  after it reproduced the torch twin's result, and keeps the fastest (:mod:`.measure`).
* Not measured (deterministic mode, autotuning off, a CUDA graph being captured): the fixed order, most preferred
  backend first (:func:`frod_kernels.registry.backends`), but a backend other than the twin runs only once it has
  matched the twin on that shape class: the first call of a class runs both and compares. A verification is
  remembered like a measured choice (in the process and in the cache file), so it costs one extra call per class.
  During a CUDA graph capture nothing can be verified (comparing needs a sync): an unverified class runs the twin.
* The CPU: never measured; a fixed rule by the size of the call (:func:`small_on_cpu`).

A kernel that computes a wrong result (while measured or verified) or raises after it was chosen is a failure:
warned once, never run again for that op on that device type in this process, and the call runs on the twin.
"""

from __future__ import annotations

import warnings
from typing import Callable, Sequence

import torch

from .. import registry
from .._numerics import bucket, dtype_name
from ..reference import TOLERANCE
from . import state
from .measure import max_rel_err, measure
from .state import Choice, device_name, fail, has_failed, lookup, not_measured, record

TWIN = "torch"
CPU_BACKEND = "cpu"
# Most multiply-adds (nonzeros x the operand's columns, the tokens) of a call for which "auto" runs the C kernels on
# the CPU, by the operand's layout; the twin above, whose CSR kernels MKL runs on every core. Measured on the
# project's CPU (2 cores, float32, 1% density, both families): on token-major operands (what the engine hands over
# below 64 tokens, and above where products are packed) the twin pays a transposed copy and the C kernels win up to
# about a million (2x at in = 1024 and 8 tokens; even at 4096 and 8 tokens, 1.3 million); on feature-major ones the
# twin reads rows as they are, and the C kernels win only up to about 100,000 (1.2-1.5x at 1024 and 8 tokens, 1.5x
# slower at 16). The C kernels run on one thread: on a CPU with more cores the twin's side would gain.
CPU_KERNEL_MAX_WORK_TOKEN_MAJOR = 1 << 20
CPU_KERNEL_MAX_WORK_FEATURE_MAJOR = 1 << 17


def small_on_cpu(c_kernel: Callable, twin: Callable) -> Callable:
    """The CPU's rule, fixed rather than measured (a CPU's timings are too noisy to decide per call class): the C
    kernel (:mod:`frod_kernels.backends.cpu`) up to the work above, else the twin. Both are deterministic and held
    to the float64 reference by the tests, so no run-time verification."""
    def kernel(A, *rest):
        work = rest[-1].numel() * A.shape[1]  # both families take the group sources last
        limit = CPU_KERNEL_MAX_WORK_TOKEN_MAJOR if _token_major(A) else CPU_KERNEL_MAX_WORK_FEATURE_MAJOR
        return (c_kernel if work <= limit else twin)(A, *rest)

    return kernel


def _token_major(A: torch.Tensor) -> bool:
    """Whether a family's operand (n x m) has contiguous columns, one per token: the transpose of a token-major
    product (the "cols" layout class of :func:`backend_key`)."""
    return A.stride(0) == 1 and A.stride(1) != 1


def backend_key(op: str, args: Sequence[torch.Tensor]) -> tuple:
    """Shape class of a kernel-family call: both ops take a 2-D operand first and the group sources last."""
    A, src = args[0], args[-1]
    n, m = A.shape
    layout = "cols" if _token_major(A) else "rows"
    per_row = -(-src.numel() // max(n, 1))
    return ("backend", op, device_name(A.device), dtype_name(A.dtype), layout, bucket(n), bucket(m),
            bucket(per_row))


def show(key: tuple) -> str:
    kind, rest = key[0], key[1:]
    if kind in ("backend", "verified"):
        op, dev, dtype, layout, n, m, per_row = rest[:7]
        return f"{op} on {dev}, {dtype}, {layout}-contiguous, ~{n}x{m}, ~{per_row} nonzeros per row"
    dev, dtype, b, n_in, n_out, nnz, training = rest
    return f"frod_linear on {dev}, {dtype}, ~{b} tokens, {n_in}->{n_out}, nnz {nnz}, " + (
        "forward+backward" if training else "forward")


def _tolerance(dtype: torch.dtype) -> float:
    return 2 * TOLERANCE.get(dtype, TOLERANCE[torch.float32])


class AutoKernel:
    """``"auto"``'s implementation of ``op`` on ``device_type``: one of ``candidates`` (most preferred first, the
    twin among them) per call, by the rules of the module docstring."""

    def __init__(self, op: str, device_type: str, candidates: list[str]):
        self.op, self.device_type, self.candidates = op, device_type, candidates
        self.impls = registry.impls(op)

    def __call__(self, *args):
        usable = [b for b in self.candidates if b == TWIN or not has_failed(self.op, b, self.device_type)]
        if usable == [TWIN]:
            return self.impls[TWIN](*args)
        key = backend_key(self.op, args)
        device = args[0].device
        if not_measured(device) is None:
            return self._run(self._measured(key, usable, args), args)
        for name in usable:
            if name == TWIN:
                break
            hit = lookup(("verified",) + key[1:] + (name,))
            if hit is not None:
                if hit.ok:
                    return self._run(name, args)
                continue
            if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                continue  # no verification during a capture: the twin runs until a class is verified outside one
            out = self._verify(key, name, args)
            if out is not None:
                return out
        return self.impls[TWIN](*args)

    def _measured(self, key: tuple, usable: list[str], args) -> str:
        hit = lookup(key)
        if hit is not None and hit.chosen in usable:
            return hit.chosen
        reference = self.impls[TWIN](*args)
        tol = _tolerance(args[0].dtype)

        def check(out):
            err = max_rel_err(out, reference)
            return err <= tol, f"result {err:.1e} from the torch twin's (tolerance {tol:.0e})"

        return measure("backend", key, {b: (lambda b=b: self.impls[b](*args)) for b in usable}, check,
                       args[0].device, show(key), on_wrong=lambda b, why: fail(self.op, b, self.device_type, why))

    def _verify(self, key: tuple, name: str, args):
        """Run ``name`` and the twin once on ``args``; the candidate's result if it matched (and record that),
        else None (and record the failure)."""
        vkey = ("verified",) + key[1:] + (name,)
        tol = _tolerance(args[0].dtype)
        try:
            with torch.no_grad():
                out = self.impls[name](*args)
                err = max_rel_err(out, self.impls[TWIN](*args))
            why = f"result {err:.1e} from the torch twin's (tolerance {tol:.0e})"
            ok = err <= tol
        except torch.OutOfMemoryError:
            raise
        except Exception as e:  # noqa: BLE001 - a kernel that fails its first run is a failure, recorded with why
            ok, why, out = False, f"{type(e).__name__}: {e}", None
        record(Choice("verified", vkey, name, ("matched the torch twin: " if ok else "wrong: ") + why, ok=ok))
        if ok:
            return out
        fail(self.op, name, self.device_type, why)
        warnings.warn(f"frod_kernels: the {name} kernel of {self.op} did not match the torch twin for {show(key)} "
                      f"({why}); using the next backend for {self.op} from now on in this process", RuntimeWarning,
                      stacklevel=4)
        return None

    def _run(self, name: str, args):
        """``name``'s result; if it raises (a kernel that does not compile or launch on this GPU), warn once, drop
        ``name`` for this op on this device type, and return the twin's result."""
        if name == TWIN:
            return self.impls[TWIN](*args)
        try:
            return self.impls[name](*args)
        except torch.OutOfMemoryError:
            raise  # the twin needs memory too; not a kernel fault
        except Exception as e:  # noqa: BLE001 - any kernel failure falls back; the warning carries it
            fail(self.op, name, self.device_type, f"{type(e).__name__}: {e}")
            warnings.warn(f"frod_kernels: the {name} kernel of {self.op} failed on {self.device_type} "
                          f"({type(e).__name__}: {e}); using the torch backend for {self.op} from now on in this "
                          "process", RuntimeWarning, stacklevel=4)
            return self.impls[TWIN](*args)


def auto_kernel(op: str, device_type: str) -> Callable:
    """``"auto"``'s implementation of ``op`` on ``device_type``: on the CPU, :func:`small_on_cpu` (or the twin
    where the C kernels cannot run); elsewhere the twin itself where only it can run, else an :class:`AutoKernel`."""
    impls = registry.impls(op)
    if device_type == "cpu" and device_type not in state.MEASURED_DEVICE_TYPES:
        if CPU_BACKEND in impls and registry.unavailable_reason(CPU_BACKEND, "cpu") is None:
            return small_on_cpu(impls[CPU_BACKEND], impls[TWIN])
        return impls[TWIN]
    candidates = [TWIN]
    if device_type in state.MEASURED_DEVICE_TYPES:
        candidates = [b for b in registry.runnable(device_type) if b in impls]
    if candidates == [TWIN]:
        return impls[TWIN]
    return AutoKernel(op, device_type, candidates)
