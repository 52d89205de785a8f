// Row gather with diagonal (docs/DESIGN.md section 6, family 1): the full-rank update C^T, the few-token forward t^T and
// the backward dz^T. One warp per output row, no atomics: each output element is summed in one fixed order.
#include "common.cuh"

namespace frod_cuda {
namespace {

template <typename T, bool kAligned>
__device__ __forceinline__ void add_row(typename Acc<T>::type (&acc)[kR][kVec<T>], typename Acc<T>::type w,
                                        const Slot<T, kAligned> (&x)[kR], unsigned shift, int c0, int L, int m,
                                        int slots) {
#pragma unroll
  for (int j = 0; j < kR; ++j) {
    const int c = c0 + j * L;
    if (c < slots) {
      const uint4 v = x[j].value(c, m, shift);
#pragma unroll
      for (int e = 0; e < kVec<T>; ++e) acc[j][e] += w * element<T>(v, e);
    }
  }
}

template <typename T, bool kAligned>
__global__ void __launch_bounds__(kThreads)
row_gather_diag_kernel(const T* __restrict__ A, int64_t lda, const typename Acc<T>::type* __restrict__ diag,
                       const typename Acc<T>::type* __restrict__ weights, const int64_t* __restrict__ ptr,
                       const int64_t* __restrict__ src, T* __restrict__ out, int64_t n, int m, int slots,
                       int log_l, int n_seg) {
  using acc_t = typename Acc<T>::type;
  constexpr int kV = kVec<T>;
  const WarpLanes lanes(log_l);
  const int64_t r = lanes.r;
  if (r >= n) return;  // whole warps only: the shuffles below need all 32 lanes of a live warp
  const int L = lanes.L, G = lanes.G, g = lanes.g, l = lanes.l;
  const int64_t beg = ptr[r], end = ptr[r + 1];

  for (int seg = blockIdx.y; seg < n_seg; seg += gridDim.y) {
    const int c0 = seg * L * kR + l;
    acc_t acc[kR][kV];
#pragma unroll
    for (int j = 0; j < kR; ++j)
#pragma unroll
      for (int e = 0; e < kV; ++e) acc[j][e] = acc_t(0);

    // Group g sums nonzeros beg+g, beg+g+G, ... in ascending order, kRows a step: their loads are all in flight
    // together, and the next step's indices are loaded before this step's rows are used, so a row's loads never
    // wait on its index. Trip counts may differ between groups (no shuffles in this loop).
    int64_t s[kRows];
    acc_t w[kRows];
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      const int64_t k = beg + g + static_cast<int64_t>(i) * G;
      s[i] = k < end ? src[k] : 0;
      w[i] = k < end ? weights[k] : acc_t(0);
    }
    for (int64_t k = beg + g; k < end; k += kRows * G) {
      const T* rows[kRows];
      Slot<T, kAligned> x[kRows][kR];
#pragma unroll
      for (int i = 0; i < kRows; ++i) {
        rows[i] = A + s[i] * lda;
        if (k + i * G < end) load_row(x[i], rows[i], c0, L, m, slots);
      }
      acc_t wn[kRows];
#pragma unroll
      for (int i = 0; i < kRows; ++i) {
        const int64_t kn = k + static_cast<int64_t>(kRows + i) * G;
        s[i] = kn < end ? src[kn] : 0;
        wn[i] = kn < end ? weights[kn] : acc_t(0);
      }
#pragma unroll
      for (int i = 0; i < kRows; ++i) {
        if (k + i * G < end) add_row(acc, w[i], x[i], shift_of(rows[i]), c0, L, m, slots);
        w[i] = wn[i];
      }
    }
    // Tree over the groups (the lane bits above log_l): a fixed order, so results are bitwise reproducible.
    for (int off = L; off < kWarp; off <<= 1)
#pragma unroll
      for (int j = 0; j < kR; ++j)
#pragma unroll
        for (int e = 0; e < kV; ++e) acc[j][e] += __shfl_xor_sync(kFullMask, acc[j][e], off);

    if (g == 0) {
      const acc_t d = diag[r];
      const T* arow = A + r * lda;
      T* orow = out + r * static_cast<int64_t>(m);
      Slot<T, kAligned> a[kR];
      load_row(a, arow, c0, L, m, slots);
#pragma unroll
      for (int j = 0; j < kR; ++j) {
        const int c = c0 + j * L;
        if (c < slots) {
          const uint4 v = a[j].value(c, m, shift_of(arow));
          acc_t o[kV];
#pragma unroll
          for (int e = 0; e < kV; ++e) o[e] = acc[j][e] + d * element<T>(v, e);
          store_slot(orow + c * kV, pack<T>(o), Slot<T, kAligned>::bytes(c, m));
        }
      }
    }
  }
}

template <typename T>
cudaError_t launch(const void* A, int64_t lda, const void* diag, const void* weights, const int64_t* ptr,
                   const int64_t* src, void* out, int64_t n, int64_t m, cudaStream_t stream) {
  using acc_t = typename Acc<T>::type;
  // Only A's alignment picks the kernel: the output (a fresh n x m tensor, row stride m) is written with the widest
  // stores each of its rows allows.
  const Plan p = make_plan(sizeof(T), rows_aligned(sizeof(T), A, lda), m);
  const dim3 grid = grid_for(n, p.n_seg);
  const auto* a = static_cast<const T*>(A);
  const auto* dg = static_cast<const acc_t*>(diag);
  const auto* w = static_cast<const acc_t*>(weights);
  auto* o = static_cast<T*>(out);
  const int mm = static_cast<int>(m);
  if (p.aligned) {
    FROD_LAUNCH(grid, kThreads, stream, row_gather_diag_kernel<T, true>)(a, lda, dg, w, ptr, src, o, n, mm, p.slots,
                                                                         p.log_l, p.n_seg);
  } else {
    FROD_LAUNCH(grid, kThreads, stream, row_gather_diag_kernel<T, false>)(a, lda, dg, w, ptr, src, o, n, mm, p.slots,
                                                                          p.log_l, p.n_seg);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_row_gather_diag(DType dtype, const void* A, int64_t lda, const void* diag, const void* weights,
                                   const int64_t* ptr, const int64_t* src, void* out, int64_t n, int64_t m,
                                   cudaStream_t stream) {
  if (n == 0 || m == 0) return cudaSuccess;
  if (m >= kMaxRowLength) return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::kFloat16: return launch<__half>(A, lda, diag, weights, ptr, src, out, n, m, stream);
    case DType::kBFloat16: return launch<__nv_bfloat16>(A, lda, diag, weights, ptr, src, out, n, m, stream);
    case DType::kFloat64: return launch<double>(A, lda, diag, weights, ptr, src, out, n, m, stream);
    case DType::kFloat32: return launch<float>(A, lda, diag, weights, ptr, src, out, n, m, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace frod_cuda
