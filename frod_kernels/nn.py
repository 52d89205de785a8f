"""``FrodLinear``: a drop-in FRoD replacement for ``nn.Linear`` (and GPT-2's ``Conv1D``), and ``replace_linears``."""

from __future__ import annotations

import re
from typing import Iterable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import cache as projection_cache
from . import projections
from ._validation import (
    check_base_weight,
    check_finite,
    check_layer_options,
    check_tensor,
    finite_mode,
)
from .layout import build_layout, check_pattern
from .ops import frod_linear
from .ops.api import layer_call

try:  # GPT-2 style layers store their weight as (in, out)
    from transformers.pytorch_utils import Conv1D
except ImportError:  # transformers is a dependency, but keep the layer usable without it
    Conv1D = None

SUPPORTED = (nn.Linear,) + ((Conv1D,) if Conv1D is not None else ())


class FrodBasis(nn.Module):
    """What all layers of one category share: the basis ``V`` and the sparse pattern ``s_indices``.

    One instance is referenced by every ``FrodLinear`` of its category, so ``model.to(...)`` moves ``V`` once and
    the layers never hold copies. ``V`` is a frozen parameter rather than a buffer so that data-parallel wrappers
    do not broadcast it every step. The packed pattern layout is derived state: not saved, rebuilt on load.
    """

    def __init__(self, V: torch.Tensor, s_indices: torch.Tensor):
        super().__init__()
        if V.dim() != 2 or V.shape[0] != V.shape[1]:
            raise ValueError(f"V: expected a square (in, in) basis, got shape {tuple(V.shape)}")
        # contiguous: FSDP2 (fully_shard) shards only contiguous parameters, and a decomposition often yields a
        # transposed view
        self.V = nn.Parameter(V.contiguous(), requires_grad=False)
        self.register_buffer("s_indices", s_indices.to(device=V.device, dtype=torch.long))
        self.register_buffer("layout", build_layout(self.s_indices, V.shape[0]).packed, persistent=False)
        self.register_load_state_dict_post_hook(FrodBasis._rebuild_layout)

    @property
    def nnz(self) -> int:
        return self.s_indices.shape[1]

    @staticmethod
    def _rebuild_layout(module: "FrodBasis", _incompatible) -> None:
        module.layout = build_layout(module.s_indices, module.V.shape[0]).packed

    def extra_repr(self) -> str:
        return f"in_features={self.V.shape[0]}, nnz={self.nnz}"


class FrodLinear(nn.Module):
    """``y = x W'^T + bias`` with ``W' = U (diag(lambda_l) + S) V^T``; only ``lambda_l`` and ``s_values`` train.

    Build it with :meth:`from_linear` (or :func:`replace_linears` for a whole model). A fresh layer reproduces its
    base layer's output (``S = 0`` and ``U diag(lambda_l) V^T = W``). With ``dropout > 0`` in training it computes
    what PEFT's FRoD layer does: ``x W^T + (W' - W) dropout(x) + bias``, so it keeps the base weight for that case.
    """

    def __init__(
        self,
        basis: FrodBasis,
        U: torch.Tensor,
        lambda_l: torch.Tensor,
        s_values: Optional[torch.Tensor] = None,
        bias: Optional[torch.Tensor] = None,
        *,
        dropout: float = 0.0,
        base_weight: Optional[torch.Tensor] = None,
        fan_in_fan_out: bool = False,
        train_bias: bool = False,
    ):
        super().__init__()
        n_in = basis.V.shape[0]
        if U.dim() != 2 or U.shape[1] != n_in:
            raise ValueError(f"U: expected shape (out, {n_in}) to match the basis, got {tuple(U.shape)}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout: expected a probability in [0, 1), got {dropout}")
        if dropout > 0 and base_weight is None:
            raise ValueError("base_weight: required when dropout > 0 (the dropped input only reaches the delta)")
        self.in_features, self.out_features = n_in, U.shape[0]
        self.fan_in_fan_out = fan_in_fan_out
        self.basis = basis
        # U is kept as its transpose, contiguous: every row the sparse steps gather from U^T is then contiguous
        # (U itself is the column-major view U_t.t(): the same memory), and FSDP2, which shards only contiguous
        # parameters, shards it. The state dict still holds "U" in nn.Linear's (out, in) orientation.
        self.U_t = nn.Parameter(U.t().contiguous(), requires_grad=False)
        self.lambda_l = nn.Parameter(lambda_l)
        if s_values is None:
            s_values = torch.zeros(basis.nnz, dtype=lambda_l.dtype, device=lambda_l.device)
        if s_values.shape != (basis.nnz,):
            raise ValueError(f"s_values: expected shape ({basis.nnz},) to match the pattern, got {tuple(s_values.shape)}")
        self.s_values = nn.Parameter(s_values)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=train_bias)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if base_weight is not None:
            self.register_buffer("base_weight", base_weight)
        else:
            self.base_weight = None
        self.register_state_dict_post_hook(FrodLinear._save_u)
        self.register_load_state_dict_pre_hook(FrodLinear._load_u)

    V = property(lambda self: self.basis.V)
    U = property(lambda self: self.U_t.t(), doc="(out, in), column-major: a view of ``U_t``")

    @staticmethod
    def _save_u(module, state_dict, prefix, local_metadata) -> None:
        if prefix + "U_t" in state_dict:
            state_dict[prefix + "U"] = state_dict.pop(prefix + "U_t").t()

    @staticmethod
    def _load_u(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        U = state_dict.pop(prefix + "U", None)
        if U is not None:
            state_dict[prefix + "U_t"] = U.t()
    s_indices = property(lambda self: self.basis.s_indices)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Module,
        V: Union[torch.Tensor, FrodBasis, None] = None,
        sparse_rate: float = 0.01,
        seed: int = 0,
        dropout: float = 0.0,
        *,
        s_indices: Optional[torch.Tensor] = None,
        regularization_alpha: float = 1e-3,
        train_bias: bool = False,
        adapter_dtype: Optional[torch.dtype] = torch.float32,
        projection_method: str = "exact",
        cache: projection_cache.CacheArg = None,
    ) -> "FrodLinear":
        """FRoD layer starting exactly at ``linear`` (an ``nn.Linear`` or GPT-2 ``Conv1D``); ``linear`` is not changed.

        Args:
            V: the category's shared basis: a :class:`FrodBasis` (shared by reference with the layers already using
                it), an (in, in) tensor, or ``None`` to compute it from this layer's weight alone, as PEFT does for
                a category of one layer.
            sparse_rate: fraction of the in x in off-diagonal positions that train (PEFT's ``sparse_rate``).
            seed: seeds the pattern's generator (PEFT's ``projection_prng_key``); ignored with a ``FrodBasis``.
            dropout: PEFT's ``frod_dropout``.
            s_indices: use this (2, nnz) pattern instead of drawing one; ignored with a ``FrodBasis``.
            train_bias: let the (copied) bias train.
            adapter_dtype: dtype of ``lambda_l`` and ``s_values`` (float32, as PEFT's adapter autocast keeps them);
                ``None`` keeps the base weight's dtype.
            projection_method: how ``V=None`` is computed: ``"exact"`` (PEFT's V bitwise) or ``"fast"``
                (:func:`frod_kernels.projections.fast_basis`; see :func:`replace_linears`).
            cache: the projection cache for V, the pattern, U and lambda_l
                (:func:`frod_kernels.cache.cache_dir`): None (default: on unless ``FROD_CACHE=0``), True, False
                (off) or a directory.
        """
        weight = _weight_out_in(linear)
        check_layer_options(sparse_rate=sparse_rate, seed=seed, dropout=dropout, adapter_dtype=adapter_dtype,
                            regularization_alpha=regularization_alpha, projection_method=projection_method)
        check_base_weight("linear.weight", weight)
        projection_cache.cache_dir(cache)  # a bad argument fails before any computation
        fan_in_fan_out = Conv1D is not None and isinstance(linear, Conv1D)
        if isinstance(V, FrodBasis):
            basis = V
        else:
            if V is not None:
                check_tensor("V", V, dim=2)
                if finite_mode() is not False:
                    check_finite("V", V)
            if s_indices is not None:
                # before FrodBasis casts it to int64, which would truncate float indices silently
                check_pattern(s_indices, weight.shape[1])
            if V is None:
                # a category of one layer; its pattern is the first (and only) draw of the seed's generator, and
                # with a pattern given none is drawn (sparse_rate 0)
                proj, = projections.build_projections(
                    {"weight": weight}, sparse_rate=sparse_rate if s_indices is None else 0.0,
                    projection_prng_key=seed, progressbar=False,
                    regularization_alpha=regularization_alpha, with_layers=False, method=projection_method,
                    cache=cache).values()
                V = proj.V
                s_indices = proj.s_indices if s_indices is None else s_indices
            elif s_indices is None:
                s_indices = projections.cached_pattern(V.shape[0], sparse_rate, seed, cache)
            basis = FrodBasis(V.detach().to(device=weight.device, dtype=weight.dtype), s_indices)
        if basis.V.shape[0] != weight.shape[1]:
            raise ValueError(f"V: basis is {basis.V.shape[0]}-dimensional but the layer has in_features="
                             f"{weight.shape[1]}")
        U, lam = projections.u_and_lambda(basis.V, weight, cache=cache)
        return cls._from_parts(linear, weight, basis, U, lam, dropout, train_bias, adapter_dtype, fan_in_fan_out)

    @classmethod
    def _from_parts(cls, linear, weight, basis, U, lam, dropout, train_bias, adapter_dtype, fan_in_fan_out):
        dev, dt = weight.device, weight.dtype
        adapter_dtype = adapter_dtype or dt
        bias = getattr(linear, "bias", None)
        return cls(
            basis,
            U.to(device=dev, dtype=dt),
            lam.to(device=dev, dtype=dt).to(adapter_dtype),  # rounded through the weight dtype, as PEFT does
            bias=None if bias is None else bias.detach().clone(),
            dropout=dropout,
            base_weight=weight.detach().clone() if dropout > 0 else None,
            fan_in_fan_out=fan_in_fan_out,
            train_bias=train_bias,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or isinstance(self._modules["dropout"], nn.Identity):
            # registered tensors read from the modules' dicts: an attribute read of one goes through
            # nn.Module.__getattr__ (about 0.6 µs; a call reads eight)
            basis, params = self._modules["basis"], self._parameters
            bias = params["bias"] if "bias" in params else self.bias
            # U^T as it is stored: the dense path multiplies by it, and no view is made per call
            return layer_call(x, basis._parameters["V"], params["U_t"], True, params["lambda_l"], params["s_values"],
                              basis._buffers["s_indices"], bias, basis._buffers["layout"], None)
        # PEFT's order: the base term sees x, then dropout draws its mask, and only the delta sees h.
        w = self.base_weight.to(x.dtype)
        base = F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))
        h = self.dropout(x)
        adapted = frod_linear(h, self.V, self.U, self.lambda_l, self.s_values, self.s_indices,
                              layout=self.basis.layout)
        return base + adapted - F.linear(h, w)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """``W' = U (diag(lambda_l) + S) V^T`` in the base layer's orientation ((out, in); (in, out) for Conv1D)."""
        M = torch.diag(self.lambda_l.float())
        M[self.s_indices[0], self.s_indices[1]] = self.s_values.float()
        w = (self.U.float() @ M @ self.V.float().t()).to(self.U.dtype)
        return w.t() if self.fan_in_fan_out else w

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, nnz={self.basis.nnz}, "
                f"bias={self.bias is not None}, dropout={getattr(self.dropout, 'p', 0.0)}")


def _weight_out_in(module: nn.Module) -> torch.Tensor:
    if Conv1D is not None and isinstance(module, Conv1D):
        return module.weight.detach().t()
    if isinstance(module, nn.Linear):
        return module.weight.detach()
    names = ", ".join(t.__module__ + "." + t.__name__ for t in SUPPORTED)
    raise TypeError(f"linear: {type(module).__name__} is not supported; expected one of: {names}")


def _matches(key: str, target_modules: Union[str, Iterable[str]]) -> bool:
    # PEFT's rule: a string is a full-match regex; a list matches a key equal to or ending in ".<name>".
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, key) is not None
    return any(key == t or key.endswith("." + t) for t in target_modules)


def replace_linears(
    model: nn.Module,
    target_modules: Union[str, Iterable[str]],
    sparse_rate: float = 0.01,
    seed: int = 0,
    *,
    dropout: float = 0.0,
    regularization_alpha: float = 1e-3,
    train_bias: bool = False,
    adapter_dtype: Optional[torch.dtype] = torch.float32,
    progressbar: bool = True,
    projection_method: str = "exact",
    cache: projection_cache.CacheArg = None,
    freeze_base: bool = True,
) -> nn.Module:
    """Replace the matching ``nn.Linear``/``Conv1D`` modules of ``model`` (in place) with ``FrodLinear`` layers.

    Categories, bases, patterns and the ``seed`` (PEFT's ``projection_prng_key``) follow PEFT's FRoD exactly, so
    the same model gives the same ``V``, ``U``, ``lambda_l`` and ``s_indices`` as ``get_peft_model``. One
    :class:`FrodBasis` per category is shared by its layers.

    ``freeze_base``: as ``get_peft_model`` does, every parameter of ``model`` but the FRoD layers' ``lambda_l`` and
    ``s_values`` (and their biases with ``train_bias``) stops requiring grad. ``False`` leaves the other parameters
    as they were (an embedding or head that should train alongside).

    ``projection_method="fast"`` computes each V by :func:`frod_kernels.projections.fast_basis` (about twice as
    fast on the CPU, see the README): the same eigenbasis as PEFT's to the eigenproblem's own float32 accuracy,
    but with other column signs and other bases inside near-equal eigenvalues, so not PEFT's tensors. V and U are
    parameters of the layers, saved in the model's state dict, so such a model reloads as it was; only code that
    regenerates V from the base weights (PEFT's ``get_peft_model``) would not get it back.

    ``cache``: the projection cache (:func:`frod_kernels.cache.cache_dir`): None (default: on unless
    ``FROD_CACHE=0``), True, False (off) or a directory. A second call on the same weights reads the projections
    the first one computed.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if freeze_base is not True and freeze_base is not False:
        raise TypeError(f"freeze_base: expected True or False, got {freeze_base!r}")
    if isinstance(target_modules, str) is False and not isinstance(target_modules, Iterable):
        raise TypeError(f"target_modules: expected a regex string or a list of names, got {type(target_modules).__name__}")
    if not isinstance(target_modules, str):
        target_modules = list(target_modules)
        odd = [t for t in target_modules if not isinstance(t, str)]
        if odd:
            raise TypeError(f"target_modules: expected module names (str), got {odd!r}")
    check_layer_options(sparse_rate=sparse_rate, seed=seed, dropout=dropout, adapter_dtype=adapter_dtype,
                        regularization_alpha=regularization_alpha, projection_method=projection_method)
    modules = dict(model.named_modules())
    targets = {k: m for k, m in modules.items() if k and _matches(k, target_modules)}
    unsupported = [f"{k} ({type(m).__name__})" for k, m in targets.items()
                   if not isinstance(m, SUPPORTED) and not isinstance(m, FrodLinear)]
    if unsupported:
        names = ", ".join(t.__name__ for t in SUPPORTED)
        raise TypeError(f"target_modules: matched unsupported modules {unsupported}; supported types: {names}")
    targets = {k: m for k, m in targets.items() if isinstance(m, SUPPORTED)}
    if not targets:
        raise ValueError(f"target_modules: {target_modules!r} matched no nn.Linear or Conv1D module of the model")
    weights = {k: _weight_out_in(m) for k, m in targets.items()}
    for k, w in weights.items():
        check_base_weight(f"{k}.weight", w)
    projs = projections.build_projections(
        weights, sparse_rate=sparse_rate, projection_prng_key=seed, regularization_alpha=regularization_alpha,
        progressbar=progressbar, with_layers=True, method=projection_method, cache=cache)
    for cat in projs.values():
        first = weights[cat.keys[0]]
        basis = FrodBasis(cat.V.to(device=first.device, dtype=first.dtype), cat.s_indices)
        for key in cat.keys:
            lin = targets[key]
            layer = FrodLinear._from_parts(
                lin, weights[key], basis, cat.U[key], cat.lambda_l[key], dropout, train_bias, adapter_dtype,
                Conv1D is not None and isinstance(lin, Conv1D))
            parent_name, _, child = key.rpartition(".")
            setattr(modules[parent_name] if parent_name else model, child, layer)
    if freeze_base:
        trained = {id(p) for m in model.modules() if isinstance(m, FrodLinear)
                   for p in (m.lambda_l, m.s_values) + ((m.bias,) if train_bias and m.bias is not None else ())}
        for p in model.parameters():
            if id(p) not in trained:
                p.requires_grad_(False)
    return model
