"""PEFT's FRoD classes and the methods of theirs that :mod:`frod_kernels.peft` wraps, and which layers and models
are accelerated now."""

from __future__ import annotations

import weakref

from torch import nn

try:
    from peft import peft_model as peft_peft_model
    from peft.tuners.frod import layer as peft_layer
    from peft.tuners.frod import model as peft_model
except ImportError as e:  # peft is optional for frod-kernels itself
    raise ImportError("frod_kernels.peft needs PEFT with FRoD support (pip install 'peft>=0.20')") from e

from .. import cache as projection_cache

Linear = peft_layer.Linear
FrodLayer = peft_layer.FrodLayer
FrodModel = peft_model.FrodModel
PeftModel = peft_peft_model.PeftModel

# PEFT's methods as its classes resolve them (inherited ones included: FrodModel's __init__ and inject_adapter are
# BaseTuner's), read before anything is patched: what the wrappers call when a layer is not accelerated.
PEFT_FORWARD = Linear.forward
PEFT_INIT_PROJECTIONS = FrodModel._init_frod_projections
PEFT_CREATE_AND_REPLACE = FrodModel._create_and_replace
PEFT_U_AND_LAMBDA = FrodLayer._calculate_frod_u_and_lambda
PEFT_INJECT = FrodModel.inject_adapter
PEFT_TUNER_INIT = FrodModel.__init__
PEFT_SAVE = PeftModel.save_pretrained
PEFT_LOAD_ADAPTER = PeftModel.load_adapter


class _State:
    def __init__(self) -> None:
        self.enabled = False
        self.cache: projection_cache.CacheArg = None  # enable()'s cache argument, resolved at each setup
        # the FRoD layers (and FrodModels) that accelerate() covers
        self.accelerated: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()
        # set while an accelerated FrodModel injects its layers (a layer being built is not in `accelerated` yet)
        self.injecting = False


STATE = _State()


def is_on(module: nn.Module) -> bool:
    # membership, not an attribute: a deepcopy or pickle of an accelerated model is not silently accelerated
    return STATE.enabled or module in STATE.accelerated


def mark(module: nn.Module, enabled: bool) -> None:
    if enabled:
        STATE.accelerated.add(module)
    else:
        STATE.accelerated.discard(module)
