"""Make PEFT's FRoD layers run through frod-kernels: one call, no change to configs, checkpoints or behaviour.

    import frod_kernels.peft as fkp
    fkp.enable()             # every PEFT FRoD layer, existing or created later
    fkp.accelerate(model)    # or: this model only
    fkp.disable()            # back to PEFT's own forward and projection setup, everywhere

How: PEFT's ``peft.tuners.frod.layer.Linear.forward`` (and the projection setup, ``FrodModel._init_frod_projections``
and ``FrodLayer._calculate_frod_u_and_lambda``) are replaced at class level by wrappers that check whether the
layer is accelerated (:func:`enable`'s global flag, or membership in the set :func:`accelerate` fills) and otherwise
call PEFT's own method; :func:`disable` puts PEFT's methods back. The wrappers never copy PEFT's computation for
the cases they do not fuse: those call PEFT's forward.

The fused path runs when exactly one adapter of the layer is active, the adapter is not merged and adapters are
not disabled; any dropout. It computes what PEFT's forward computes:

* dropout inactive (``nn.Identity`` or eval): ``y = FRoD(x) + bias``, the base layer skipped (its weight offloaded
  to the CPU under ``runtime_offload_base_weight``, as PEFT does);
* dropout active in training: ``y = base_layer(x) + FRoD_nobias(h) - h W^T`` with ``h = dropout(x)``, the base
  layer called before dropout draws its mask, as PEFT does, so the same seed gives the same mask.

Everything else (several active adapters, merged, disabled adapters, an invalid pattern) runs PEFT's forward.
PEFT keeps ``frod_V`` and ``frod_s_indices`` on the CPU and copies them to the activations' device on every call;
here the device/dtype copies and the packed pattern layout are cached per shared tensor (one V per category on
the device, not one per layer) and rebuilt only when the source tensor is replaced or written in place.

Projection setup goes through the projection cache (:mod:`frod_kernels.cache`; ``enable(cache=...)``): a second
``get_peft_model`` or ``from_pretrained`` of the same base model reads V, the patterns, U and lambda_l the first one
computed, also under another BLAS thread count, so a ``save_projection=False`` adapter reloaded on the machine that
trained it gets the very V it was trained with.

Checkpoints (``PeftModel.save_pretrained`` / ``load_adapter``, hence ``from_pretrained``, wrapped the same way): an
accelerated model saves a fingerprint of each adapter's projections next to its ``adapter_config.json``
(:mod:`frod_kernels.fingerprint`; plain PEFT ignores the file), and loading into an accelerated model compares
the projections PEFT built with the fingerprint and warns (:class:`ProjectionMismatchWarning`) when they differ:
the adapter then computes something else than it was trained to. PEFT loads such an adapter without a word, and
acceleration must not change what loads, so it is a warning; ``warnings.simplefilter("error",
ProjectionMismatchWarning)`` makes it an error.
"""

from __future__ import annotations

import functools
import inspect
import os
import warnings
import weakref
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

try:
    from peft import peft_model as _peft_peft_model
    from peft.tuners.frod import layer as _peft_layer
    from peft.tuners.frod import model as _peft_model
    from peft.tuners.tuners_utils import _maybe_include_all_linear_layers
    from peft.utils.other import transpose
except ImportError as e:  # peft is optional for frod-kernels itself
    raise ImportError("frod_kernels.peft needs PEFT with FRoD support (pip install 'peft>=0.20')") from e

from . import cache as projection_cache
from . import fingerprint, projections
from .layout import build_layout, cached_derived, check_pattern
from .ops import frod_linear

__all__ = ["ProjectionMismatchWarning", "accelerate", "disable", "enable", "is_enabled"]

_Linear = _peft_layer.Linear
_FrodModel = _peft_model.FrodModel
_PEFT_FORWARD = _Linear.forward
_PEFT_INIT_PROJECTIONS = _FrodModel._init_frod_projections
_PEFT_CREATE_AND_REPLACE = _FrodModel._create_and_replace
_PEFT_U_AND_LAMBDA = _peft_layer.FrodLayer._calculate_frod_u_and_lambda
_PEFT_INJECT = _FrodModel.inject_adapter  # BaseTuner's: FrodModel inherits it
_PEFT_TUNER_INIT = _FrodModel.__init__  # BaseTuner's too
_PeftModel = _peft_peft_model.PeftModel
_PEFT_SAVE = _PeftModel.save_pretrained
_PEFT_LOAD_ADAPTER = _PeftModel.load_adapter



class ProjectionMismatchWarning(UserWarning):
    """A FRoD adapter was loaded onto projections (V, U, pattern) other than those it was trained with: other base
    weights, another ``projection_prng_key``, or another library or BLAS that regenerated them differently."""


_enabled = False
_cache: projection_cache.CacheArg = None  # enable()'s cache argument, resolved at each setup
# the FRoD layers (and FrodModels) that accelerate() covers
_accelerated: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def enable(cache: projection_cache.CacheArg = None) -> None:
    """From now on every PEFT FRoD layer runs through frod-kernels where it can (see the module docstring), and
    PEFT's projection setup uses :mod:`frod_kernels.projections` (bitwise the same V, pattern, U and lambda_l:
    no n*n grid of positions for the pattern, one LU factorization of V per category instead of one per layer).

    ``cache``: where that setup caches its projections (:func:`frod_kernels.cache.cache_dir`): None (default: on
    unless ``FROD_CACHE=0``), True, False (off) or a directory; it also applies to :func:`accelerate`'d models."""
    global _enabled, _cache
    projection_cache.cache_dir(cache)  # a bad argument fails here rather than in the first setup
    _enabled, _cache = True, cache
    _install()


def disable() -> None:
    """Back to PEFT everywhere: clears :func:`enable` and every :func:`accelerate`, and restores PEFT's methods."""
    global _enabled, _cache
    _enabled, _cache = False, None
    _accelerated.clear()
    _uninstall()


def is_enabled() -> bool:
    """Whether :func:`enable` is in effect (models accelerated one by one do not count)."""
    return _enabled


def accelerate(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Run this model's PEFT FRoD layers through frod-kernels (``enabled=False``: back to PEFT for this model).

    Covers the FRoD layers the model has now and those a later ``add_adapter``/``load_adapter`` creates in it.
    Accepts a ``PeftModel``, its ``base_model`` (``FrodModel``) or any module holding FRoD layers; returns it.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module (a PeftModel with FRoD adapters), got {type(model).__name__}")
    found = False
    for module in model.modules():
        if isinstance(module, (_Linear, _FrodModel)):
            found = found or isinstance(module, _Linear)
            _mark(module, enabled)
    if not found and enabled:
        raise ValueError(f"model: {type(model).__name__} has no PEFT FRoD layer (peft.tuners.frod.layer.Linear); "
                         "build it with get_peft_model(model, FrodConfig(...)) first")
    if enabled:
        _install()
    elif not _enabled and not _accelerated:
        _uninstall()
    return model


def _mark(module: nn.Module, enabled: bool) -> None:
    if enabled:
        _accelerated.add(module)
    else:
        _accelerated.discard(module)


def _on(module: nn.Module) -> bool:
    # membership, not an attribute: a deepcopy or pickle of an accelerated model is not silently accelerated
    return _enabled or module in _accelerated


def _install() -> None:
    _Linear.forward = _forward
    _FrodModel._init_frod_projections = _init_frod_projections
    _FrodModel._create_and_replace = _create_and_replace
    _FrodModel.inject_adapter = _inject_adapter
    _FrodModel.__init__ = _tuner_init
    _peft_layer.FrodLayer._calculate_frod_u_and_lambda = _calculate_frod_u_and_lambda
    _PeftModel.save_pretrained = _save_pretrained
    _PeftModel.load_adapter = _load_adapter


def _uninstall() -> None:
    _Linear.forward = _PEFT_FORWARD
    _FrodModel._init_frod_projections = _PEFT_INIT_PROJECTIONS
    _FrodModel._create_and_replace = _PEFT_CREATE_AND_REPLACE
    for name in ("inject_adapter", "__init__"):
        if name in vars(_FrodModel):
            delattr(_FrodModel, name)
    _peft_layer.FrodLayer._calculate_frod_u_and_lambda = _PEFT_U_AND_LAMBDA
    _PeftModel.save_pretrained = _PEFT_SAVE
    _PeftModel.load_adapter = _PEFT_LOAD_ADAPTER


# ---------------------------------------------------------------------------------------------------------------
# Forward


@functools.wraps(_PEFT_FORWARD)
def _forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    if not _on(self):
        return _PEFT_FORWARD(self, x, *args, **kwargs)
    adapter = _fusable_adapter(self, x)
    if adapter is None:
        return _PEFT_FORWARD(self, x, *args, **kwargs)
    layout = _device_layout(self.frod_s_indices[adapter], x.device, self.in_features)
    if layout is None:
        return _PEFT_FORWARD(self, x, *args, **kwargs)
    s_indices, packed = layout
    V = _device_copy(self.frod_V[adapter], x.device, x.dtype)
    U = _device_copy(self.frod_U[adapter], x.device, x.dtype)
    # PEFT moves the trainable tensors with a differentiable .to(); a no-op when they already live on x's device
    lambda_l = self.frod_lambda_l[adapter].to(device=x.device)
    s_values = self.frod_lambda_s_values[adapter].to(device=x.device)
    previous_dtype = x.dtype
    base_layer = self.get_base_layer()
    dropout = self.frod_dropout[adapter]

    if isinstance(dropout, nn.Identity) or not dropout.training:
        if self.runtime_offload_base_weight.get(adapter, False):
            self._offload_base_weight_to_cpu()
        bias = base_layer.bias
        if bias is not None:
            bias = bias.to(device=x.device)
        result = frod_linear(x, V, U, lambda_l, s_values, s_indices, bias, layout=packed)
    else:
        # PEFT's terms in PEFT's order: the base layer runs before dropout draws its mask
        self._move_base_weight_to_device(x.device)
        result = self.base_layer(x, *args, **kwargs)
        h = dropout(x)
        out_add = frod_linear(h, V, U, lambda_l, s_values, s_indices, layout=packed)
        base_weight = transpose(base_layer.weight, self.fan_in_fan_out).to(device=x.device, dtype=x.dtype)
        result = result + out_add - F.linear(h, base_weight)
    return result.to(previous_dtype)


def _fusable_adapter(layer, x) -> Optional[str]:
    """The one active adapter when the fused path computes what PEFT's forward does, else None."""
    if layer.disable_adapters or layer.merged or layer.frod_V is None or layer.frod_s_indices is None:
        return None
    active = [a for a in layer.active_adapters if a in layer.frod_lambda_s_values]
    if len(active) != 1:
        return None
    if not isinstance(x, torch.Tensor) or x.dtype not in (torch.float16, torch.bfloat16, torch.float32,
                                                          torch.float64):
        return None
    if x.dim() < 1 or x.shape[-1] != layer.in_features:
        return None
    return active[0]


# Under torch.compile the cached copies and layout are graph constants: dynamo cannot trace the id/weakref/_version
# cache lookups (nor the pattern check's .item()). A layer whose frod_V or frod_s_indices is replaced after
# compiling keeps the old constants until the graph recompiles.
@torch._dynamo.assume_constant_result
def _device_copy(src: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    if src.device == device and src.dtype == dtype:
        return src
    return cached_derived(src, ("to", device, dtype), lambda: src.detach().to(device=device, dtype=dtype))


@torch._dynamo.assume_constant_result
def _device_layout(s_indices: torch.Tensor, device: torch.device, n: int):
    """(s_indices on ``device`` as int64, its packed layout), or None for a pattern the kernels do not take
    (duplicates, diagonal entries: PEFT's coalesce sums duplicates, so such a layer keeps PEFT's forward)."""
    def build():
        idx = s_indices.detach().to(device=device, dtype=torch.long)
        try:
            check_pattern(idx, n)
        except ValueError:
            return None
        return idx, build_layout(idx, n, validate=False).packed

    return cached_derived(s_indices, ("peft-layout", device, n), build)


# ---------------------------------------------------------------------------------------------------------------
# Projection setup


@functools.wraps(_PEFT_INIT_PROJECTIONS)
def _init_frod_projections(self, config, adapter_name: str) -> None:
    """PEFT's ``_init_frod_projections`` with :func:`frod_kernels.projections.build_projections`: the same V (the
    same float32 ops in the same order) and the same pattern (the same randperm draws), without materializing the
    n*n grid of positions PEFT indexes the pattern from."""
    if not _on(self) or not 0.0 <= config.sparse_rate <= 1.0:
        return _PEFT_INIT_PROJECTIONS(self, config, adapter_name)
    model_config = self.get_model_config(self.model)
    peft_config = self._prepare_adapter_config(config, model_config)
    peft_config = _maybe_include_all_linear_layers(peft_config, self.model)
    weights: dict[str, torch.Tensor] = {}
    for key, module in self.model.named_modules():
        if not self._check_target_module_exists(peft_config, key):
            continue
        if isinstance(module, nn.Linear):
            weights[key] = module.weight
        elif isinstance(module, _peft_model.Conv1D):
            weights[key] = module.weight.T
    if not weights or any(len({w.shape[1] for k, w in weights.items()
                               if projections.category_from_key(k) == c}) != 1
                          for c in {projections.category_from_key(k) for k in weights}):
        # nothing to adapt, or a category mixing widths: PEFT's own code raises its own error
        return _PEFT_INIT_PROJECTIONS(self, config, adapter_name)

    projs = projections.build_projections(
        weights, sparse_rate=config.sparse_rate, projection_prng_key=config.projection_prng_key,
        regularization_alpha=config.regularization_alpha, progressbar=config.progressbar, with_layers=False,
        cache=_cache)

    # PEFT stores V in the dtype of the category's weight at the first layer index inserted into its per-layer
    # dict (where a later key of the same index overwrites an earlier one)
    by_index: dict[int, dict[str, torch.Tensor]] = {}
    for fallback, (key, weight) in enumerate(weights.items()):
        by_index.setdefault(projections.layer_index_from_key(key, fallback), {})[
            projections.category_from_key(key)] = weight

    if not hasattr(self, "frod_V"):
        self.frod_V = nn.ModuleDict()
        self.frod_s_indices = nn.ModuleDict()
        self.frod_s_size = nn.ModuleDict()
    for category, proj in projs.items():
        dtype = next(d[category] for d in by_index.values() if category in d).dtype
        in_dim = proj.V.shape[0]
        for store, value in ((self.frod_V, proj.V.to(dtype=dtype, device="cpu")),
                             (self.frod_s_indices, proj.s_indices.to(torch.long).contiguous()),
                             (self.frod_s_size, torch.tensor([in_dim, in_dim], dtype=torch.long))):
            if category not in store:
                store[category] = _peft_model.BufferDict({}, persistent=config.save_projection)
            store[category][adapter_name] = value


@functools.wraps(_PEFT_CREATE_AND_REPLACE)
def _create_and_replace(self, *args: Any, **kwargs: Any):
    # a FrodModel that accelerate() covers also covers the layers a later add_adapter/load_adapter creates
    out = _PEFT_CREATE_AND_REPLACE(self, *args, **kwargs)
    if self in _accelerated:
        for module in self.model.modules():
            if isinstance(module, _Linear):
                _mark(module, True)
    return out


# Each layer's U and lambda_l solve V B^T = W^T in float64; PEFT's torch.linalg.solve LU-factorizes the category's
# V again for every layer. The solver below factorizes it once (the same LAPACK getrf, then getrs per layer: the
# same bits), and only on a cache miss. The factorizations (float64, in x in per category) live only while one
# adapter is injected.
_SOLVERS: dict[int, tuple[weakref.ref, int, Any]] = {}


@functools.wraps(_PEFT_U_AND_LAMBDA)
def _calculate_frod_u_and_lambda(self, V, W):
    # a layer being built is not in _accelerated yet: the global flag, or the model's injection, decides
    if not (_enabled or _injecting_accelerated) or V.device.type != "cpu":
        return _PEFT_U_AND_LAMBDA(self, V, W)

    def solve():
        hit = _SOLVERS.get(id(V))
        if hit is None or hit[0]() is not V or hit[1] != V._version:
            hit = (weakref.ref(V), V._version, projections.VSolver(V, torch.device("cpu")))
            _SOLVERS[id(V)] = hit
        return hit[2](W)

    # the same computation as build_projections' per-layer solve, so the two share cache entries
    return projections.cached_u_and_lambda(projection_cache.open_store(_cache), "lu-cpu", V, W, solve)


_injecting_accelerated = False


@functools.wraps(_PEFT_TUNER_INIT)
def _tuner_init(self, *args: Any, **kwargs: Any):
    # BaseTuner.__init__ builds the projections (its pre-injection hook), then injects the layers: each weight, and
    # each category's V, is hashed once for the category's cache entries and its layers'
    with projection_cache.digest_scope():
        return _PEFT_TUNER_INIT(self, *args, **kwargs)


@functools.wraps(_PEFT_INJECT)
def _inject_adapter(self, *args: Any, **kwargs: Any):
    global _injecting_accelerated
    _injecting_accelerated = self in _accelerated
    try:
        with projection_cache.digest_scope():  # a later add_adapter/load_adapter injects outside _tuner_init
            return _PEFT_INJECT(self, *args, **kwargs)
    finally:
        _injecting_accelerated = False
        _SOLVERS.clear()


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint fingerprints


def _frod_tuner(peft_model) -> Optional[nn.Module]:
    tuner = getattr(peft_model, "base_model", None)
    return tuner if isinstance(tuner, _FrodModel) and _on(tuner) else None


@functools.wraps(_PEFT_SAVE)
def _save_pretrained(self, save_directory, *args: Any, **kwargs: Any):
    out = _PEFT_SAVE(self, save_directory, *args, **kwargs)
    bound = inspect.signature(_PEFT_SAVE).bind(self, save_directory, *args, **kwargs)
    bound.apply_defaults()
    tuner = _frod_tuner(self)
    if tuner is None or not bound.arguments["is_main_process"]:
        return out
    for name in bound.arguments["selected_adapters"] or list(self.peft_config):
        # PEFT's layout: the default adapter in the directory itself, any other in a subdirectory of its name
        directory = os.path.join(save_directory, name) if name != "default" else save_directory
        fingerprint.write(directory, fingerprint.adapter_fingerprint(tuner, name))
    return out


@functools.wraps(_PEFT_LOAD_ADAPTER)
def _load_adapter(self, model_id, adapter_name, *args: Any, **kwargs: Any):
    out = _PEFT_LOAD_ADAPTER(self, model_id, adapter_name, *args, **kwargs)
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
