// Plain C++ launchers of the CUDA kernels (no torch types), called by the torch glue in ops.cpp.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace frod_cuda {

// Element type of the dense operands. Accumulation (and diag/weights/outputs of sampled_dot_diag) is float32,
// float64 for kFloat64.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// out[r, :] = diag[r] * A[r, :] + sum_{k in [ptr[r], ptr[r+1])} weights[k] * A[src[k], :]
// A: n x m with unit stride along rows and any row stride lda (16-byte loads whatever the alignment); m < 2^31;
// out: n x m contiguous; diag (n), weights (nnz) in the accumulation type; ptr (n+1), src (nnz) int64 on the device.
cudaError_t launch_row_gather_diag(DType dtype, const void* A, int64_t lda, const void* diag, const void* weights,
                                   const int64_t* ptr, const int64_t* src, void* out, int64_t n, int64_t m,
                                   cudaStream_t stream);

// Accumulation-type elements of scratch that launch_sampled_dot_diag needs for these operands (0: none).
int64_t sampled_dot_diag_workspace(DType dtype, const void* P, int64_t ldp, const void* Q, int64_t ldq, int64_t n,
                                   int64_t nnz, int64_t m);

// vals[k] = <P[a_k, :], Q[src[k], :]> (a_k: the group r with ptr[r] <= k < ptr[r+1]), diag[j] = <P[j, :], Q[j, :]>.
// P, Q: n x m with unit stride along rows, any row strides; m < 2^31; vals (nnz), diag (n) in the accumulation
// type; workspace as sized by sampled_dot_diag_workspace (may be null when that is 0).
cudaError_t launch_sampled_dot_diag(DType dtype, const void* P, int64_t ldp, const void* Q, int64_t ldq,
                                    const int64_t* ptr, const int64_t* src, void* vals, void* diag, void* workspace,
                                    int64_t n, int64_t nnz, int64_t m, cudaStream_t stream);

}  // namespace frod_cuda
