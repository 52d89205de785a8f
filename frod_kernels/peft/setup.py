"""PEFT's projection setup under acceleration: :func:`frod_kernels.projections.build_projections` and its
solver instead of PEFT's own steps (bitwise the same V, pattern, U and lambda_l), through the projection cache
(:mod:`frod_kernels.cache`; ``enable(cache=...)``): a second ``get_peft_model`` or ``from_pretrained`` of the same
base model reads V, the patterns, U and lambda_l the first one computed, also under another BLAS thread count, so
a ``save_projection=False`` adapter reloaded on the machine that trained it gets the very V it was trained with.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from peft.tuners.tuners_utils import _maybe_include_all_linear_layers
from torch import nn

from .. import cache as projection_cache
from .. import projections
from .._tensor_cache import TensorCache
from .._validation import check_sparse_rate
from ..projections.store import open_store
from .state import (
    PEFT_CREATE_AND_REPLACE,
    PEFT_INIT_PROJECTIONS,
    PEFT_INJECT,
    PEFT_TUNER_INIT,
    PEFT_U_AND_LAMBDA,
    STATE,
    Linear,
    is_on,
    mark,
    peft_model,
)


def _valid_sparse_rate(sparse_rate) -> bool:
    # an invalid one goes to PEFT's own code, which raises its own error
    try:
        check_sparse_rate(sparse_rate)
    except ValueError:
        return False
    return True


@functools.wraps(PEFT_INIT_PROJECTIONS)
def init_frod_projections(self, config, adapter_name: str) -> None:
    """PEFT's ``_init_frod_projections`` with :func:`frod_kernels.projections.build_projections`: the same V (the
    same float32 ops in the same order) and the same pattern (the same randperm draws), without materializing the
    n*n grid of positions PEFT indexes the pattern from."""
    if not is_on(self) or not _valid_sparse_rate(config.sparse_rate):
        return PEFT_INIT_PROJECTIONS(self, config, adapter_name)
    model_config = self.get_model_config(self.model)
    peft_config = self._prepare_adapter_config(config, model_config)
    peft_config = _maybe_include_all_linear_layers(peft_config, self.model)
    weights: dict[str, torch.Tensor] = {}
    for key, module in self.model.named_modules():
        if not self._check_target_module_exists(peft_config, key):
            continue
        if isinstance(module, nn.Linear):
            weights[key] = module.weight
        elif isinstance(module, peft_model.Conv1D):
            weights[key] = module.weight.T
    if not weights or any(len({w.shape[1] for k, w in weights.items()
                               if projections.category_from_key(k) == c}) != 1
                          for c in {projections.category_from_key(k) for k in weights}):
        # nothing to adapt, or a category mixing widths: PEFT's own code raises its own error
        return PEFT_INIT_PROJECTIONS(self, config, adapter_name)

    projs = projections.build_projections(
        weights, sparse_rate=config.sparse_rate, projection_prng_key=config.projection_prng_key,
        regularization_alpha=config.regularization_alpha, progressbar=config.progressbar, with_layers=False,
        cache=STATE.cache)

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
                store[category] = peft_model.BufferDict({}, persistent=config.save_projection)
            store[category][adapter_name] = value


@functools.wraps(PEFT_CREATE_AND_REPLACE)
def create_and_replace(self, *args: Any, **kwargs: Any):
    # a FrodModel that accelerate() covers also covers the layers a later add_adapter/load_adapter creates
    out = PEFT_CREATE_AND_REPLACE(self, *args, **kwargs)
    if self in STATE.accelerated:
        for module in self.model.modules():
            if isinstance(module, Linear):
                mark(module, True)
    return out


# Each layer's U and lambda_l solve V B^T = W^T in float64; PEFT's torch.linalg.solve LU-factorizes the category's
# V again for every layer. The solver below factorizes it once (the same LAPACK getrf, then getrs per layer: the
# same bits), and only on a cache miss. The factorizations (float64, in x in per category) live only while one
# adapter is injected.
_SOLVERS = TensorCache()


@functools.wraps(PEFT_U_AND_LAMBDA)
def calculate_frod_u_and_lambda(self, V, W):
    # a layer being built is not in STATE.accelerated yet: the global flag, or the model's injection, decides
    if not (STATE.enabled or STATE.injecting) or V.device.type != "cpu":
        return PEFT_U_AND_LAMBDA(self, V, W)

    def solve():
        return _SOLVERS.get(V, "lu", lambda: projections.VSolver(V, torch.device("cpu")))(W)

    # the same computation as build_projections' per-layer solve, so the two share cache entries
    return projections.cached_u_and_lambda(open_store(STATE.cache), "lu-cpu", V, W, solve)


@functools.wraps(PEFT_TUNER_INIT)
def tuner_init(self, *args: Any, **kwargs: Any):
    # BaseTuner.__init__ builds the projections (its pre-injection hook), then injects the layers: each weight, and
    # each category's V, is hashed once for the category's cache entries and its layers'
    with projection_cache.digest_scope():
        return PEFT_TUNER_INIT(self, *args, **kwargs)


@functools.wraps(PEFT_INJECT)
def inject_adapter(self, *args: Any, **kwargs: Any):
    STATE.injecting = self in STATE.accelerated
    try:
        with projection_cache.digest_scope():  # a later add_adapter/load_adapter injects outside _tuner_init
            return PEFT_INJECT(self, *args, **kwargs)
    finally:
        STATE.injecting = False
        _SOLVERS.clear()
