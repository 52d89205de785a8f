"""Every category's projections for a set of weights, as PEFT's ``FrodModel._init_frod_projections`` and each layer's
``update_layer`` compute them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import torch
from torch import Tensor
from tqdm import tqdm

from .. import cache as projection_cache
from .._validation import check_sparse_rate
from .exact import _basis_gpu, basis_from_weights
from .fast import _fast_factors, _FastFactors
from .keys import category_from_key, layer_index_from_key
from .pattern import _Patterns
from .solve import VSolver, _normalize_columns, cached_u_and_lambda
from .store import open_store


@dataclass
class CategoryProjection:
    """The projections of one category: its shared V and pattern, and each layer's U and lambda_l."""

    name: str
    V: Tensor  # float32, CPU, (in, in)
    s_indices: Tensor  # int64 (2, nnz)
    keys: list[str]  # module keys of the category, in layer-index order
    U: dict[str, Tensor] = field(default_factory=dict)  # per key, float32 (out, in); empty if with_layers=False
    lambda_l: dict[str, Tensor] = field(default_factory=dict)  # per key, float32 (in,)

def _group(weights: Mapping[str, Tensor]) -> dict[str, list[tuple[int, str]]]:
    """category -> [(layer index, key)], sorted by layer index as PEFT sorts its per-layer dict. The fallback index
    counts every entry of ``weights`` (PEFT counts every targeted Linear/Conv1D, whether or not it uses it)."""
    groups: dict[str, list[tuple[int, str]]] = {}
    for fallback, key in enumerate(weights):
        groups.setdefault(category_from_key(key), []).append((layer_index_from_key(key, fallback), key))
    for members in groups.values():
        members.sort(key=lambda m: m[0])  # stable: keys of one layer index keep named_modules() order
    return groups

def _resolve_device(device) -> torch.device:
    dev = torch.device("cpu") if device is None else torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: got {device!r} but no CUDA device is available")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device: expected None, 'cpu' or a CUDA device, got {device!r}")
    return dev

def _basis(weights: Sequence[Tensor], regularization_alpha: float, route: str,
           device: torch.device) -> tuple[Tensor, Optional[_FastFactors]]:
    """(V, the fast route's factors or None) by ``route``'s construction ("exact", "fast" or "cuda")."""
    if route == "cuda":
        return _basis_gpu(weights, regularization_alpha, device), None
    if route == "fast" and (factors := _fast_factors(weights, regularization_alpha)) is not None:
        return factors.V, factors
    return basis_from_weights(weights, regularization_alpha), None

def build_projections(weights: Mapping[str, Tensor], *, sparse_rate: float = 0.01, projection_prng_key: int = 0,
                      regularization_alpha: float = 1e-3, progressbar: bool = True, with_layers: bool = True,
                      device=None, method: str = "exact",
                      cache: projection_cache.CacheArg = None) -> dict[str, CategoryProjection]:
    """PEFT's projections for every category of ``weights``, as ``FrodModel._init_frod_projections`` and each
    layer's ``update_layer`` compute them.

    Args:
        weights: module key -> weight (out, in), nn.Linear orientation (pass a Conv1D's weight transposed), in
            ``named_modules()`` order, only the modules FRoD adapts (PEFT's fallback layer index counts them).
        sparse_rate: PEFT's ``sparse_rate``, in [0, 1].
        projection_prng_key: seeds the one generator that draws every category's pattern, categories in sorted
            name order (PEFT's).
        regularization_alpha: PEFT's ``regularization_alpha``.
        progressbar: a tqdm bar per category (name, layers, width).
        with_layers: also compute each layer's U and lambda_l.
        device: ``None``/``"cpu"``: the CPU route. A CUDA device: the decompositions run there in float64 (V
            equal to PEFT's only up to column signs and the eigenproblem's conditioning; ``method`` is ignored).
        method: the CPU route's V. ``"exact"``: PEFT's float32 ops (V bitwise PEFT's under the same BLAS
            threads). ``"fast"``: :func:`fast_basis` (V equal to PEFT's only up to column signs and the
            eigenproblem's conditioning): for projections that are saved with the adapter. U and lambda_l are
            solved against whichever V in float64 either way, so ``U diag(lambda_l) V^T`` reproduces each weight.
        cache: the projection cache (:func:`frod_kernels.cache.cache_dir`): None (default: on unless
            ``FROD_CACHE=0``), True, False (off) or a directory. Every tensor returned is then what the
            computation gave when its entry was written (bitwise, also under another BLAS thread count).

    Returns:
        category name -> :class:`CategoryProjection`, in sorted category order. ``keys`` lists every key of the
        category by layer index; when two keys of one category share a layer index, PEFT's V keeps only the
        last of them (its per-layer dict overwrites), and so does this V, while every key still gets U and
        lambda_l. V and U are float32: PEFT stores them in the weight's dtype (and computes U from V rounded so), so
        cast them to the weight's dtype to get PEFT's buffers. lambda_l is float32 rounded through the weight's
        dtype, as PEFT's parameter is after its adapter autocast (a bfloat16 model's lambda_l holds bfloat16
        values).
    """
    check_sparse_rate(sparse_rate)
    if not isinstance(weights, Mapping) or len(weights) == 0:
        raise ValueError(f"weights: expected a non-empty mapping of module key -> (out, in) weight, got "
                         f"{type(weights).__name__} of length {len(weights) if hasattr(weights, '__len__') else '?'}")
    for key, w in weights.items():
        if not isinstance(w, Tensor) or w.dim() != 2 or not w.is_floating_point():
            raise ValueError(f"weights[{key!r}]: expected a 2-D floating-point (out, in) tensor, got "
                             f"{type(w).__name__}{tuple(w.shape) if isinstance(w, Tensor) else ''}")
    dev = _resolve_device(device)
    if method not in ("exact", "fast"):
        raise ValueError(f"method: expected 'exact' or 'fast', got {method!r}")
    store = open_store(cache)

    groups = _group(weights)
    for name, members in groups.items():
        widths = {weights[k].shape[1] for _, k in members}
        if len(widths) != 1:
            detail = ", ".join(f"{k}: {weights[k].shape[1]}" for _, k in members)
            raise ValueError(f"weights: category {name!r} mixes in_features ({detail}); the layers of one category "
                             f"share V and need one in_features")

    route = "cuda" if dev.type == "cuda" else method
    digest = dict(zip(weights, projection_cache.digests(list(weights.values())))) if store is not None else {}
    patterns = _Patterns(store, projection_prng_key, sparse_rate)
    return {name: _category(name, [k for _, k in groups[name]], list({i: k for i, k in groups[name]}.values()),
                            weights, digest, store, patterns, regularization_alpha, route, dev, with_layers,
                            progressbar)
            for name in sorted(groups)}


def _category(name: str, keys: list[str], basis_keys: list[str], weights: Mapping[str, Tensor], digest: dict,
              store: Optional[projection_cache.Store], patterns: _Patterns, regularization_alpha: float, route: str,
              dev: torch.device, with_layers: bool, progressbar: bool) -> CategoryProjection:
    """One category's projections. ``basis_keys``: the weights V is built from (PEFT keeps one per layer index, the
    last key seen for it)."""
    width = weights[keys[0]].shape[1]
    # PEFT rounds V to the first (insertion-order) weight's dtype for its buffer, then to each layer's dtype
    # before its float64 solve: U is computed from those roundings.
    key_set = set(keys)
    buffer_dtype = weights[next(k for k in weights if k in key_set)].dtype
    # The fast route's float32 layers: B = W V^-T is Q1_l R2^-1 E, one product with factors that are well
    # conditioned, so U diag(lambda_l) V^T reproduces W to float32 rounding without a solve. Those U come from
    # the category's factors, not from V alone, so they are cached with V, in one entry.
    product = with_layers and route == "fast" and buffer_dtype == torch.float32
    basis_fields = {"route": route, "alpha": float(regularization_alpha).hex(), "product_u": product,
                    "weights": [digest[k] for k in basis_keys] if store is not None else None}
    layers = len(basis_keys)
    info = {"category": name, "layers": layers, "width": width, "route": route}
    bar = tqdm(total=1 + (len(keys) if with_layers else 0), disable=not progressbar, unit="step",
               desc=f"FRoD {name} ({layers} layer{'' if layers == 1 else 's'}, width {width})")
    with bar:
        entry = None if store is None else store.get("V", basis_fields, {"V": (torch.float32, (width, width))})
        if entry is None:
            V, factors = _basis([weights[k] for k in basis_keys], regularization_alpha, route, dev)
        else:
            V, factors = entry["V"], None
            bar.set_postfix_str("from cache")
        bar.update(1)
        proj = CategoryProjection(name=name, V=V, s_indices=patterns.draw(width, {"category": name}), keys=keys)
        product_keys: set[str] = set()
        if with_layers:
            fast_b: dict[str, Tensor] = {}
            if factors is not None and product:
                fast_b = {k: q for k, q in zip(basis_keys, factors.q1) if weights[k].dtype == torch.float32}
                factors.q1 = []
            cached_product = {} if entry is None or not product else {
                basis_keys[j]: (entry[f"U.{j}"], entry[f"lambda_l.{j}"]) for j in entry["product_layers"].tolist()}
            product_keys = set(fast_b) | set(cached_product)
            solves = _Solves(V, buffer_dtype, store, dev)
            for key in keys:
                w = weights[key]
                if key in cached_product:
                    proj.U[key], lam = cached_product.pop(key)
                elif key in fast_b:
                    proj.U[key], lam = _normalize_columns(fast_b.pop(key) @ factors.x)
                else:
                    proj.U[key], lam = solves(w, digest.get(key), {"category": name, "layer": key})
                # PEFT makes lambda_l a parameter of the weight's dtype before its adapter autocast to float32.
                proj.lambda_l[key] = lam.to(w.dtype).float()
                bar.update(1)
        if store is not None and entry is None:
            tensors = {"V": V}
            if product:
                # float32 layers: lambda_l is the computed one, unrounded
                js = [j for j, k in enumerate(basis_keys) if k in product_keys]
                tensors["product_layers"] = torch.tensor(js, dtype=torch.long)
                for j in js:
                    key = basis_keys[j]
                    tensors[f"U.{j}"], tensors[f"lambda_l.{j}"] = proj.U[key], proj.lambda_l[key]
            store.put("V", basis_fields, tensors, info)
    return proj


class _Solves:
    """Each layer's U and lambda_l against one category's V, through the cache: V as each weight dtype's solve
    sees it (rounded through the buffer dtype, as PEFT's), factorized once per dtype and only on a cache miss."""

    def __init__(self, V: Tensor, buffer_dtype: torch.dtype, store: Optional[projection_cache.Store],
                 dev: torch.device):
        self.V, self.buffer_dtype, self.store, self.dev = V, buffer_dtype, store, dev
        self.seen: dict[torch.dtype, tuple[Tensor, Optional[str]]] = {}
        self.solvers: dict[torch.dtype, VSolver] = {}

    def __call__(self, w: Tensor, w_digest: Optional[str], info: dict) -> tuple[Tensor, Tensor]:
        if w.dtype not in self.seen:
            v = self.V.to(self.buffer_dtype).to(w.dtype)
            self.seen[w.dtype] = v, None if self.store is None else projection_cache.tensor_digest(v)
        v, v_digest = self.seen[w.dtype]

        def solve():
            if w.dtype not in self.solvers:
                self.solvers[w.dtype] = VSolver(v, self.dev)
            return self.solvers[w.dtype](w)

        return cached_u_and_lambda(self.store, f"lu-{self.dev.type}", v, w, solve, v_digest, w_digest, info)
