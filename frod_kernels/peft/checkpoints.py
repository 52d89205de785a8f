"""Checkpoints that cannot lie (``PeftModel.save_pretrained`` / ``load_adapter``, hence ``from_pretrained``, wrapped):
an accelerated model saves a fingerprint of each adapter's projections next to its ``adapter_config.json``
(:mod:`.fingerprint`; plain PEFT ignores the file), and loading into an accelerated model compares the projections
PEFT built with the fingerprint and warns (:class:`ProjectionMismatchWarning`) when they differ: the adapter then
computes something else than it was trained to. PEFT loads such an adapter without a word, and acceleration must
not change what loads, so it is a warning; ``warnings.simplefilter("error", ProjectionMismatchWarning)`` makes it
an error.
"""

from __future__ import annotations

import functools
import inspect
import os
import warnings
from typing import Any, Optional

from torch import nn

from . import fingerprint
from .state import PEFT_LOAD_ADAPTER, PEFT_SAVE, FrodModel, is_on


class ProjectionMismatchWarning(UserWarning):
    """A FRoD adapter was loaded onto projections (V, U, pattern) other than those it was trained with: other base
    weights, another ``projection_prng_key``, or another library or BLAS that regenerated them differently."""


def _frod_tuner(peft_model) -> Optional[nn.Module]:
    tuner = getattr(peft_model, "base_model", None)
    return tuner if isinstance(tuner, FrodModel) and is_on(tuner) else None


@functools.wraps(PEFT_SAVE)
def save_pretrained(self, save_directory, *args: Any, **kwargs: Any):
    out = PEFT_SAVE(self, save_directory, *args, **kwargs)
    bound = inspect.signature(PEFT_SAVE).bind(self, save_directory, *args, **kwargs)
    bound.apply_defaults()
    tuner = _frod_tuner(self)
    if tuner is None or not bound.arguments["is_main_process"]:
        return out
    for name in bound.arguments["selected_adapters"] or list(self.peft_config):
        # PEFT's layout: the default adapter in the directory itself, any other in a subdirectory of its name
        directory = os.path.join(save_directory, name) if name != "default" else save_directory
        fingerprint.write(directory, fingerprint.adapter_fingerprint(tuner, name))
    return out


@functools.wraps(PEFT_LOAD_ADAPTER)
def load_adapter(self, model_id, adapter_name, *args: Any, **kwargs: Any):
    out = PEFT_LOAD_ADAPTER(self, model_id, adapter_name, *args, **kwargs)
    tuner = _frod_tuner(self)
    if tuner is not None:
        subfolder = kwargs.get("subfolder")
        _verify(tuner, adapter_name, os.path.join(model_id, subfolder) if subfolder else str(model_id),
                self.peft_config[adapter_name].save_projection)
    return out


def _verify(tuner, adapter_name: str, directory: str, save_projection: bool) -> None:
    """Warn when the projections PEFT built for ``adapter_name`` are not the ones its checkpoint in ``directory``
    was trained with. With ``save_projection=True`` V and the pattern come from the checkpoint, but PEFT computes U
    before loading them, from the V it regenerated: the fingerprint's U check catches that too."""
    saved = fingerprint.read(directory) if os.path.isdir(directory) else None
    if saved is None:
        if not save_projection:
            where = ("has no " + fingerprint.SIDECAR_NAME if os.path.isdir(directory)
                     else "is not a local directory (only local checkpoints are verified)")
            warnings.warn(f"FRoD adapter checkpoint {directory!r} was saved with save_projection=False and {where}: "
                          "its regenerated projections cannot be verified against the ones it was trained with. "
                          "Save adapters with save_projection=True, or with frod_kernels.peft acceleration on, to "
                          "make them verifiable.", UserWarning, stacklevel=3)
        return
    weights = fingerprint.weights_sha256(directory)
    if saved.get("weights_sha256") and weights is not None and weights[1] != saved["weights_sha256"]:
        warnings.warn(f"FRoD adapter checkpoint {directory!r}: {fingerprint.SIDECAR_NAME} is stale (the adapter "
                      "weights were re-saved without frod_kernels.peft acceleration), so the regenerated "
                      "projections cannot be verified", UserWarning, stacklevel=3)
        return
    diffs = fingerprint.compare(saved, fingerprint.adapter_fingerprint(tuner, adapter_name))
    if not diffs:
        return
    then = ", ".join(f"{k} {v}" for k, v in saved.get("versions", {}).items())
    now = ", ".join(f"{k} {v}" for k, v in fingerprint.versions().items())
    shown = diffs[:12] + ([f"... and {len(diffs) - 12} more"] if len(diffs) > 12 else [])
    warnings.warn(
        f"FRoD adapter checkpoint {directory!r} (adapter {adapter_name!r}) was trained with other projections than "
        "the ones built for it here, so it does not compute what it was trained to:\n  - " + "\n  - ".join(shown)
        + f"\nSaved with {then}; loading with {now}. Likely causes: other base model weights than the adapter was "
        "trained on, another projection_prng_key, or another library version or BLAS thread count (PEFT's V is "
        "not reproducible across them). Plain PEFT loads it the same way, silently. To make this an error: "
        "warnings.simplefilter('error', frod_kernels.peft.ProjectionMismatchWarning).",
        ProjectionMismatchWarning, stacklevel=3)
