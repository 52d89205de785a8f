"""V as PEFT computes it (``_projection_from_weights``): its own ops, in its order, so bitwise PEFT's on the same
BLAS; and the same construction in float64 on a GPU."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def _float32_cpu(weights: Sequence[Tensor]) -> list[Tensor]:
    """The float32 CPU matrices PEFT decomposes (the weights themselves where they are float32 on the CPU), checked
    to be (out, in) with one in_features."""
    if len(weights) == 0:
        raise ValueError("weights: expected at least one (out, in) weight, got an empty sequence")
    matrices = [w.detach().to(torch.float32).cpu() for w in weights]
    if any(m.dim() != 2 for m in matrices) or len({m.shape[1] for m in matrices}) != 1:
        raise ValueError(f"weights: expected 2-D (out, in) weights with one in_features, got shapes "
                         f"{[tuple(m.shape) for m in matrices]}")
    return matrices

def _peft_basis(matrices: list[Tensor], regularization_alpha: float) -> Tensor:
    """PEFT's ``_projection_from_weights``, its ops in its order, in the matrices' dtype and on their device.
    Empties ``matrices``: from the stacking on, only the stacked copy is held."""
    rows = [m.shape[0] for m in matrices]
    stacked = torch.cat(matrices, dim=0)
    matrices.clear()
    if stacked.shape[0] < stacked.shape[1]:
        _, _, vh = torch.linalg.svd(stacked, full_matrices=True)
        return vh.T
    q_matrix, r_matrix = torch.linalg.qr(stacked)
    del stacked
    dim = r_matrix.shape[1]
    t_pi = torch.zeros((dim, dim), dtype=r_matrix.dtype, device=r_matrix.device)
    ridge = regularization_alpha * torch.eye(dim, dtype=r_matrix.dtype, device=r_matrix.device)
    start = 0
    for n_rows in rows:
        q_slice = q_matrix[start:start + n_rows, :]
        start += n_rows
        t_pi += torch.linalg.inv(q_slice.T @ q_slice + ridge)
    del q_matrix
    t_pi /= len(rows)
    _, eigenvectors = torch.linalg.eigh(t_pi)
    return r_matrix.T @ eigenvectors

def basis_from_weights(weights: Sequence[Tensor], regularization_alpha: float = 1e-3) -> Tensor:
    """V (in x in, float32, CPU) as PEFT's ``_projection_from_weights`` computes it from the float32 CPU copies of
    the layers' weights (each out x in), in the order given.

    The float32 ops are PEFT's own, in its order, so the result is bitwise PEFT's under the same BLAS threads.
    """
    return _peft_basis(_float32_cpu(weights), regularization_alpha)

def _basis_gpu(weights: Sequence[Tensor], regularization_alpha: float, device: torch.device) -> Tensor:
    """PEFT's construction in float64 on the GPU (cuSOLVER): equal to PEFT's V only to the conditioning of the
    eigenproblem (see the module docstring), so for checkpoints that save their projections."""
    matrices = [w.detach().to(device=device, dtype=torch.float64) for w in weights]
    return _peft_basis(matrices, regularization_alpha).float().cpu()
