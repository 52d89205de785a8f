"""Input checks for the public entry points: every error names the argument, what it got and what was expected."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name: str, t, *, dim: int | None = None, dtypes=FLOAT_DTYPES) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name}: expected a {dim}-D tensor, got shape {tuple(t.shape)}")


def check_frod_args(x, V, U, lambda_l, s_values, s_indices, bias) -> None:
    check_tensor("x", x)
    if x.dim() < 1:
        raise ValueError(f"x: expected shape (..., in_features), got a 0-D tensor")
    check_tensor("V", V, dim=2)
    check_tensor("U", U, dim=2)
    check_tensor("lambda_l", lambda_l, dim=1)
    check_tensor("s_values", s_values, dim=1)
    check_tensor("s_indices", s_indices, dim=2, dtypes=(torch.int64, torch.int32))
    n = V.shape[0]
    if V.shape[1] != n:
        raise ValueError(f"V: expected a square (in, in) basis, got shape {tuple(V.shape)}")
    if x.shape[-1] != n:
        raise ValueError(f"x: expected last dim in_features={n} (from V), got shape {tuple(x.shape)}")
    if U.shape[1] != n:
        raise ValueError(f"U: expected shape (out, {n}), got {tuple(U.shape)}")
    if lambda_l.shape[0] != n:
        raise ValueError(f"lambda_l: expected shape ({n},), got {tuple(lambda_l.shape)}")
    if s_indices.shape[0] != 2:
        raise ValueError(f"s_indices: expected shape (2, nnz), got {tuple(s_indices.shape)}")
    if s_indices.shape[1] != s_values.shape[0]:
        raise ValueError(f"s_values: expected {s_indices.shape[1]} values (one per column of s_indices), "
                         f"got shape {tuple(s_values.shape)}")
    if bias is not None:
        check_tensor("bias", bias, dim=1)
        if bias.shape[0] != U.shape[0]:
            raise ValueError(f"bias: expected shape ({U.shape[0]},) (out_features, from U), got {tuple(bias.shape)}")
    named = [("x", x), ("V", V), ("U", U), ("lambda_l", lambda_l), ("s_values", s_values), ("s_indices", s_indices)]
    if bias is not None:
        named.append(("bias", bias))
    for name, t in named[1:]:
        if t.device != x.device:
            raise ValueError(f"{name}: expected device {x.device} (the device of x), got {t.device}")
    for name, t in (("V", V), ("U", U)):
        if t.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"{name}: must not require grad (FRoD keeps the basis and projection frozen); "
                             f"call {name}.requires_grad_(False)")
