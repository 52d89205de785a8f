// Row gather with diagonal (DESIGN.md section 6, family 1): the full-rank update C^T, the few-token forward t^T and
// the backward dz^T. One warp per output row, no atomics: each output element is summed in one fixed order.
#include "common.cuh"

namespace frod_cuda {
namespace {

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
row_gather_diag_kernel(const T* __restrict__ A, int64_t lda, const typename Acc<T>::type* __restrict__ diag,
                       const typename Acc<T>::type* __restrict__ weights, const int64_t* __restrict__ ptr,
                       const int64_t* __restrict__ src, T* __restrict__ out, int64_t n, int64_t m_vec, int log_l,
                       int64_t n_seg) {
  using acc_t = typename Acc<T>::type;
  using V = Vec<T, VEC>;
  const WarpLanes lanes(log_l);
  const int64_t r = lanes.r;
  if (r >= n) return;  // whole warps only: the shuffles below need all 32 lanes of a live warp
  const int L = lanes.L, G = lanes.G, g = lanes.g, l = lanes.l;
  const int64_t beg = ptr[r], end = ptr[r + 1];
  const acc_t d = diag[r];
  const V* arow = reinterpret_cast<const V*>(A + r * lda);
  V* orow = reinterpret_cast<V*>(out + r * m_vec * VEC);

  for (int64_t seg = blockIdx.y; seg < n_seg; seg += gridDim.y) {
    const int64_t c0 = seg * L * kR + l;
    acc_t acc[kR][VEC];
#pragma unroll
    for (int j = 0; j < kR; ++j)
#pragma unroll
      for (int v = 0; v < VEC; ++v) acc[j][v] = acc_t(0);

    // Group g sums nonzeros beg+g, beg+g+G, ... in ascending order; trip counts may differ between groups.
    for (int64_t k = beg + g; k < end; k += G) {
      const acc_t w = weights[k];
      const V* srow = reinterpret_cast<const V*>(A + src[k] * lda);
#pragma unroll
      for (int j = 0; j < kR; ++j) {
        const int64_t cv = c0 + static_cast<int64_t>(j) * L;
        if (cv < m_vec) {
          const V x = srow[cv];
#pragma unroll
          for (int v = 0; v < VEC; ++v) acc[j][v] += w * to_acc(x.v[v]);
        }
      }
    }
    // Tree over the groups (the lane bits above log_l): a fixed order, so results are bitwise reproducible.
    for (int off = L; off < kWarp; off <<= 1)
#pragma unroll
      for (int j = 0; j < kR; ++j)
#pragma unroll
        for (int v = 0; v < VEC; ++v) acc[j][v] += __shfl_xor_sync(kFullMask, acc[j][v], off);

    if (g == 0) {
#pragma unroll
      for (int j = 0; j < kR; ++j) {
        const int64_t cv = c0 + static_cast<int64_t>(j) * L;
        if (cv < m_vec) {
          const V a = arow[cv];
          V o;
#pragma unroll
          for (int v = 0; v < VEC; ++v) o.v[v] = from_acc<T>(acc[j][v] + d * to_acc(a.v[v]));
          orow[cv] = o;
        }
      }
    }
  }
}

template <typename T>
cudaError_t launch(const void* A, int64_t lda, const void* diag, const void* weights, const int64_t* ptr,
                   const int64_t* src, void* out, int64_t n, int64_t m, cudaStream_t stream) {
  using acc_t = typename Acc<T>::type;
  constexpr int kVec = 16 / sizeof(T);
  // out is a fresh contiguous n x m tensor, so m (its row stride) decides its alignment along with A's.
  const bool vec_ok = rows_vectorizable(sizeof(T), A, lda, m) && aligned16(out);
  const Plan p = make_plan(sizeof(T), vec_ok, m);
  const dim3 grid = grid_for(n, p.n_seg);
  const auto* a = static_cast<const T*>(A);
  const auto* dg = static_cast<const acc_t*>(diag);
  const auto* w = static_cast<const acc_t*>(weights);
  auto* o = static_cast<T*>(out);
  if (p.vec == kVec) {
    row_gather_diag_kernel<T, kVec><<<grid, kThreads, 0, stream>>>(a, lda, dg, w, ptr, src, o, n, p.m_vec, p.log_l,
                                                                   p.n_seg);
  } else {
    row_gather_diag_kernel<T, 1><<<grid, kThreads, 0, stream>>>(a, lda, dg, w, ptr, src, o, n, p.m_vec, p.log_l,
                                                                p.n_seg);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_row_gather_diag(DType dtype, const void* A, int64_t lda, const void* diag, const void* weights,
                                   const int64_t* ptr, const int64_t* src, void* out, int64_t n, int64_t m,
                                   cudaStream_t stream) {
  if (n == 0 || m == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat16: return launch<__half>(A, lda, diag, weights, ptr, src, out, n, m, stream);
    case DType::kBFloat16: return launch<__nv_bfloat16>(A, lda, diag, weights, ptr, src, out, n, m, stream);
    case DType::kFloat64: return launch<double>(A, lda, diag, weights, ptr, src, out, n, m, stream);
    case DType::kFloat32: return launch<float>(A, lda, diag, weights, ptr, src, out, n, m, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace frod_cuda
