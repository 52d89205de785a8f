"""Make PEFT's FRoD layers run through frod-kernels: one call, no change to configs, checkpoints or behaviour.

    import frod_kernels.peft as fkp
    fkp.enable()             # every PEFT FRoD layer, existing or created later
    fkp.accelerate(model)    # or: this model only
    fkp.disable()            # back to PEFT's own forward and projection setup, everywhere

How: PEFT's ``peft.tuners.frod.layer.Linear.forward`` (:mod:`.forward`), its projection setup
(``FrodModel._init_frod_projections``, ``FrodLayer._calculate_frod_u_and_lambda``: :mod:`.setup`) and
``PeftModel.save_pretrained`` / ``load_adapter`` (:mod:`.checkpoints`) are replaced at class level by wrappers that
check whether the layer is accelerated (:func:`enable`'s global flag, or membership in the set :func:`accelerate`
fills) and otherwise call PEFT's own method; :func:`disable` puts back exactly what the classes held
(:mod:`.patch`). The wrappers never copy PEFT's computation for the cases they do not fuse: those call PEFT's.
"""

from __future__ import annotations

from torch import nn

from .. import cache as projection_cache
from . import checkpoints, forward, setup
from .checkpoints import ProjectionMismatchWarning
from .patch import Patches
from .state import STATE, FrodLayer, FrodModel, Linear, PeftModel, mark

__all__ = ["ProjectionMismatchWarning", "accelerate", "disable", "enable", "is_enabled"]

_PATCHES = Patches([
    (Linear, "forward", forward.forward),
    (FrodModel, "_init_frod_projections", setup.init_frod_projections),
    (FrodModel, "_create_and_replace", setup.create_and_replace),
    (FrodModel, "inject_adapter", setup.inject_adapter),
    (FrodModel, "__init__", setup.tuner_init),
    (FrodLayer, "_calculate_frod_u_and_lambda", setup.calculate_frod_u_and_lambda),
    (PeftModel, "save_pretrained", checkpoints.save_pretrained),
    (PeftModel, "load_adapter", checkpoints.load_adapter),
])


def enable(cache: projection_cache.CacheArg = None) -> None:
    """From now on every PEFT FRoD layer runs through frod-kernels where it can (see the module docstring), and
    PEFT's projection setup uses :mod:`frod_kernels.projections` (bitwise the same V, pattern, U and lambda_l:
    no n*n grid of positions for the pattern, one LU factorization of V per category instead of one per layer).

    ``cache``: where that setup caches its projections (:func:`frod_kernels.cache.cache_dir`): None (default: on
    unless ``FROD_CACHE=0``), True, False (off) or a directory; it also applies to :func:`accelerate`'d models."""
    projection_cache.cache_dir(cache)  # a bad argument fails here rather than in the first setup
    STATE.enabled, STATE.cache = True, cache
    _PATCHES.install()


def disable() -> None:
    """Back to PEFT everywhere: clears :func:`enable` and every :func:`accelerate`, and restores PEFT's methods."""
    STATE.enabled, STATE.cache = False, None
    STATE.accelerated.clear()
    _PATCHES.uninstall()


def is_enabled() -> bool:
    """Whether :func:`enable` is in effect (models accelerated one by one do not count)."""
    return STATE.enabled


def accelerate(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Run this model's PEFT FRoD layers through frod-kernels (``enabled=False``: back to PEFT for this model).

    Covers the FRoD layers the model has now and those a later ``add_adapter``/``load_adapter`` creates in it.
    Accepts a ``PeftModel``, its ``base_model`` (``FrodModel``) or any module holding FRoD layers; returns it.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module (a PeftModel with FRoD adapters), got {type(model).__name__}")
    found = False
    for module in model.modules():
        if isinstance(module, (Linear, FrodModel)):
            found = found or isinstance(module, Linear)
            mark(module, enabled)
    if not found and enabled:
        raise ValueError(f"model: {type(model).__name__} has no PEFT FRoD layer (peft.tuners.frod.layer.Linear); "
                         "build it with get_peft_model(model, FrodConfig(...)) first")
    if enabled:
        _PATCHES.install()
    elif not STATE.enabled and not STATE.accelerated:
        _PATCHES.uninstall()
    return model
