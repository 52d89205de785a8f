"""Which engine path a layer call takes where nothing is measured: the cheapest by a model of each path's work
(docs/DESIGN.md section 3), in multiply-adds of a large dense GEMM on the same device, plus, where it was
measured, the host's time per call of each path in the same unit (section 9)."""

from __future__ import annotations

from .engine import DENSE, FACTORED, MATERIALIZED, SPARSE

# Cost of one multiply-add of a sparse step, in multiply-adds of a large dense GEMM on the same device. Measured
# with the torch backend: CPU (MKL CSR SpMM/SDDMM vs sgemm, 2 cores) about 12-20. GPU: from the roofline
# (frod_kernels.roofline), a sparse multiply-add loads one element of a gathered row through L2, e / l2_bw seconds,
# against 2 / peak for a GEMM's: e * peak / (2 * l2_bw) = 2 * 790e12 / (2 * 5.5e12) = 144 for bf16 on an H200
# (float32 without TF32: about 24; bf16 is what GPU training runs). With it the cost model picks the roofline's
# best path at all 91 points of a sweep over 7 shapes and 1-32,768 tokens. On a GPU "auto" measures the paths
# anyway (frod_kernels.autotune); this is the choice where it does not.
SPARSE_COST = {"cpu": 16.0, "cuda": 144.0}

# Keep W' between forward and backward (out x in per layer) instead of rebuilding it, only where memory is
# plentiful and compute is scarce. On a GPU the rebuild costs in/b of a GEMM and keeps peak memory at LoRA's.
KEEP_MATERIALIZED_WEIGHT = {"cpu": True}

# Host time of one call per path, microseconds (forward without autograd, forward + backward), where the arithmetic
# is negligible (64 x 64, 8 tokens, one thread: frod-bench --suite overhead's frod_linear rows, and the same calls
# without autograd), and the rate of a large GEMM that turns it into multiply-adds (1024^3 float32, 2 threads).
# Measured on the project's CPU (2 cores, torch 2.13, 2026-12-03), medians of 60 interleaved rounds. Only devices
# listed here take the dense path by the model: on a GPU the host's time overlaps the kernels' instead of adding
# to it, and nothing has been measured there.
HOST_US = {"cpu": {SPARSE: (63, 215), FACTORED: (73, 250), MATERIALIZED: (78, 232), DENSE: (37, 136)}}
GEMM_MACS_PER_US = {"cpu": 84_000}
# (multiply-adds per element, fewest rows) of a product with the dense in x in core, fitted on the same CPU to the
# dense path's time against the sparse path's at 128-512 features and 8-64 tokens (2 threads): MKL runs these
# skinny products well below its large-GEMM rate, and reads the whole matrix whatever the token count.
DENSE_PASS = (2, 32)

_chosen: dict[tuple, tuple[int, int]] = {}


def path_costs(b: int, n_in: int, n_out: int, nnz: int, device_type: str, training: bool) -> dict[int, float]:
    """Estimated multiply-adds (GEMM-equivalent) of one forward (+ backward if ``training``) per path, host time
    included where :data:`HOST_US` has the device."""
    k = SPARSE_COST.get(device_type, SPARSE_COST["cuda"])
    c_build = k * n_out * (n_in + nnz)
    apply = k * b * (n_in + nnz)
    x_v, t_u, w_build = b * n_in * n_in, b * n_in * n_out, n_in * n_in * n_out
    # the dense path's product with M^T, and each of its two in backward: a stream over the in x in matrix for few
    # tokens; fitted to the CPU, the one device that takes the path (DENSE_PASS)
    z_m = DENSE_PASS[0] * max(b, DENSE_PASS[1]) * n_in * n_in
    fwd = {
        SPARSE: x_v + apply + t_u,
        FACTORED: c_build + x_v + t_u,
        MATERIALIZED: c_build + w_build + t_u,
        DENSE: x_v + z_m + t_u,
    }
    if training:
        keep = KEEP_MATERIALIZED_WEIGHT.get(device_type, False)
        bwd = {
            SPARSE: t_u + apply + apply + x_v,
            FACTORED: c_build + 2 * t_u + apply + x_v,
            MATERIALIZED: (0 if keep else c_build + w_build) + 2 * t_u + w_build + k * n_out * (n_in + nnz),
            DENSE: t_u + 2 * z_m + x_v,
        }
        fwd = {p: fwd[p] + bwd[p] for p in fwd}
    host = HOST_US.get(device_type)
    if host is None:
        del fwd[DENSE]
        return fwd
    rate = GEMM_MACS_PER_US[device_type]
    return {p: c + rate * host[p][1 if training else 0] for p, c in fwd.items()}  # an int: dynamo indexes no bool


def choose_path(b: int, n_in: int, n_out: int, nnz: int, device_type: str, training: bool,
                kernels_only: bool = False) -> int:
    """The cheapest path by :func:`path_costs`; remembered per shape, since a training loop asks every step.
    ``kernels_only``: among the paths that run the kernel families. Both choices are remembered under one key, so
    that a call traced by torch.compile finds what an eager call of the shape stored (a miss would be a guard)."""
    key = (b, n_in, n_out, nnz, device_type, training)
    both = _chosen.get(key)
    if both is None:
        costs = path_costs(b, n_in, n_out, nnz, device_type, training)
        best = min(costs, key=costs.__getitem__)
        costs.pop(DENSE, None)
        both = _chosen[key] = (best, min(costs, key=costs.__getitem__))
    return both[1 if kernels_only else 0]
