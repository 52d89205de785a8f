// Sampled dot with diagonal (docs/DESIGN.md section 6, family 2): dS and dlambda in one pass, no atomics. A warp owns
// one row r of P, keeps its slice of P[r] in registers and dots it with Q[r] (the diagonal) and with Q[src[k]] for
// every nonzero k of the row. Rows longer than one segment are split into segments written as partial sums and
// added up in a second pass in segment order, so the result does not depend on scheduling.
#include "common.cuh"

namespace frod_cuda {
namespace {

// The dot of this lane's kR slots of a Q row with the P slice p (kept in registers), summed in a fixed order.
template <typename T, bool kAligned>
__device__ __forceinline__ typename Acc<T>::type dot(const typename Acc<T>::type (&p)[kR][kVec<T>],
                                                     const Slot<T, kAligned> (&x)[kR], unsigned shift, int c0,
                                                     int L, int m, int slots) {
  using acc_t = typename Acc<T>::type;
  acc_t s[kR];
#pragma unroll
  for (int j = 0; j < kR; ++j) {
    s[j] = acc_t(0);
    const int c = c0 + j * L;
    if (c < slots) {
      const uint4 v = x[j].value(c, m, shift);
#pragma unroll
      for (int e = 0; e < kVec<T>; ++e) s[j] += p[j][e] * element<T>(v, e);
    }
  }
  static_assert(kR == 4, "the pairwise sum below assumes kR == 4");
  return (s[0] + s[1]) + (s[2] + s[3]);
}

template <typename T, bool kAligned>
__global__ void __launch_bounds__(kThreads)
sampled_dot_diag_kernel(const T* __restrict__ P, int64_t ldp, const T* __restrict__ Q, int64_t ldq,
                        const int64_t* __restrict__ ptr, const int64_t* __restrict__ src,
                        typename Acc<T>::type* __restrict__ vals, typename Acc<T>::type* __restrict__ diag, int64_t n,
                        int64_t nnz, int m, int slots, int log_l, int n_seg) {
  using acc_t = typename Acc<T>::type;
  const WarpLanes lanes(log_l);
  const int64_t r = lanes.r;
  if (r >= n) return;  // whole warps only: the shuffles below need all 32 lanes of a live warp
  const int L = lanes.L, G = lanes.G, g = lanes.g, l = lanes.l;
  const int64_t beg = ptr[r];
  // Entry 0 is the diagonal (Q row r), entry e >= 1 the nonzero beg + e - 1.
  const int64_t n_ent = ptr[r + 1] - beg + 1;
  auto q_row = [&](int64_t e) { return e == 0 ? r : src[beg + e - 1]; };
  const T* prow = P + r * ldp;

  for (int seg = blockIdx.y; seg < n_seg; seg += gridDim.y) {
    const int c0 = seg * L * kR + l;
    acc_t p[kR][kVec<T>];
    {
      Slot<T, kAligned> x[kR];
      load_row(x, prow, c0, L, m, slots);
#pragma unroll
      for (int j = 0; j < kR; ++j) {
        const int c = c0 + j * L;
        const uint4 v = c < slots ? x[j].value(c, m, shift_of(prow)) : make_uint4(0, 0, 0, 0);
#pragma unroll
        for (int e = 0; e < kVec<T>; ++e) p[j][e] = element<T>(v, e);
      }
    }
    // Entries e0 + g, e0 + G + g, ... (kRows of them) a step: their Q rows' loads are all in flight together, and
    // the next step's rows are looked up before this step's dots, so a row's loads never wait on its index. The trip
    // count is the same for every lane of the warp: the group reduction shuffles need all of them.
    int64_t q[kRows];
#pragma unroll
    for (int i = 0; i < kRows; ++i) q[i] = g + i * G < n_ent ? q_row(g + i * G) : 0;
    for (int64_t e0 = 0; e0 < n_ent; e0 += kRows * G) {
      const T* rows[kRows];
      Slot<T, kAligned> x[kRows][kR];
#pragma unroll
      for (int i = 0; i < kRows; ++i) {
        rows[i] = Q + q[i] * ldq;
        if (e0 + i * G + g < n_ent) load_row(x[i], rows[i], c0, L, m, slots);
      }
#pragma unroll
      for (int i = 0; i < kRows; ++i) {
        const int64_t en = e0 + (kRows + i) * G + g;
        q[i] = en < n_ent ? q_row(en) : 0;
      }
      acc_t t[kRows];
#pragma unroll
      for (int i = 0; i < kRows; ++i)
        t[i] = e0 + i * G + g < n_ent ? dot(p, x[i], shift_of(rows[i]), c0, L, m, slots) : acc_t(0);
      // Tree over the L lanes of the group (the low lane bits), in a fixed order.
      for (int off = 1; off < L; off <<= 1)
#pragma unroll
        for (int i = 0; i < kRows; ++i) t[i] += __shfl_xor_sync(kFullMask, t[i], off);
#pragma unroll
      for (int i = 0; i < kRows; ++i) {
        const int64_t e = e0 + i * G + g;
        if (l != 0 || e >= n_ent) continue;
        if (e == 0) {
          diag[seg * n + r] = t[i];
        } else {
          vals[seg * nnz + beg + e - 1] = t[i];
        }
      }
    }
  }
}

// out[i] = sum_s part[s * len + i], segments in ascending order.
template <typename acc_t>
__global__ void __launch_bounds__(256)
sum_segments_kernel(const acc_t* __restrict__ part, acc_t* __restrict__ out, int64_t len, int64_t n_seg) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < len; i += stride) {
    acc_t s = part[i];
    for (int64_t k = 1; k < n_seg; ++k) s += part[k * len + i];
    out[i] = s;
  }
}

template <typename acc_t>
void sum_segments(const acc_t* part, acc_t* out, int64_t len, int64_t n_seg, cudaStream_t stream) {
  if (len == 0) return;
  const int64_t blocks = (len + 255) / 256;
  FROD_LAUNCH(static_cast<unsigned>(blocks < 65535 ? blocks : 65535), 256, stream, sum_segments_kernel<acc_t>)(
      part, out, len, n_seg);
}

template <typename T>
Plan plan_for(const void* P, int64_t ldp, const void* Q, int64_t ldq, int64_t m) {
  return make_plan(sizeof(T), rows_aligned(sizeof(T), P, ldp) && rows_aligned(sizeof(T), Q, ldq), m);
}

template <typename T>
int64_t workspace_elems(const void* P, int64_t ldp, const void* Q, int64_t ldq, int64_t n, int64_t nnz, int64_t m) {
  const Plan p = plan_for<T>(P, ldp, Q, ldq, m);
  return p.n_seg > 1 ? p.n_seg * (nnz + n) : 0;
}

template <typename T>
cudaError_t launch(const void* P, int64_t ldp, const void* Q, int64_t ldq, const int64_t* ptr, const int64_t* src,
                   void* vals, void* diag, void* ws, int64_t n, int64_t nnz, int64_t m, cudaStream_t stream) {
  using acc_t = typename Acc<T>::type;
  Plan p = plan_for<T>(P, ldp, Q, ldq, m);
  // m == 0 (no tokens) still runs one segment so that every output is written (as zero).
  if (p.n_seg == 0) p.n_seg = 1;
  auto* v_out = static_cast<acc_t*>(vals);
  auto* d_out = static_cast<acc_t*>(diag);
  acc_t* v_part = v_out;
  acc_t* d_part = d_out;
  if (p.n_seg > 1) {
    v_part = static_cast<acc_t*>(ws);
    d_part = v_part + p.n_seg * nnz;
  }
  const dim3 grid = grid_for(n, p.n_seg);
  const auto* pp = static_cast<const T*>(P);
  const auto* qq = static_cast<const T*>(Q);
  if (p.aligned) {
    FROD_LAUNCH(grid, kThreads, stream, sampled_dot_diag_kernel<T, true>)(pp, ldp, qq, ldq, ptr, src, v_part, d_part,
                                                                          n, nnz, static_cast<int>(m), p.slots,
                                                                          p.log_l, p.n_seg);
  } else {
    FROD_LAUNCH(grid, kThreads, stream, sampled_dot_diag_kernel<T, false>)(pp, ldp, qq, ldq, ptr, src, v_part,
                                                                           d_part, n, nnz, static_cast<int>(m),
                                                                           p.slots, p.log_l, p.n_seg);
  }
  if (p.n_seg > 1) {
    sum_segments<acc_t>(v_part, v_out, nnz, p.n_seg, stream);
    sum_segments<acc_t>(d_part, d_out, n, p.n_seg, stream);
  }
  return cudaGetLastError();
}

}  // namespace

int64_t sampled_dot_diag_workspace(DType dtype, const void* P, int64_t ldp, const void* Q, int64_t ldq, int64_t n,
                                   int64_t nnz, int64_t m) {
  switch (dtype) {
    case DType::kFloat16: return workspace_elems<__half>(P, ldp, Q, ldq, n, nnz, m);
    case DType::kBFloat16: return workspace_elems<__nv_bfloat16>(P, ldp, Q, ldq, n, nnz, m);
    case DType::kFloat64: return workspace_elems<double>(P, ldp, Q, ldq, n, nnz, m);
    case DType::kFloat32: return workspace_elems<float>(P, ldp, Q, ldq, n, nnz, m);
  }
  return 0;
}

cudaError_t launch_sampled_dot_diag(DType dtype, const void* P, int64_t ldp, const void* Q, int64_t ldq,
                                    const int64_t* ptr, const int64_t* src, void* vals, void* diag, void* workspace,
                                    int64_t n, int64_t nnz, int64_t m, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;  // then nnz == 0 too: nothing to write
  if (m >= kMaxRowLength) return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::kFloat16:
      return launch<__half>(P, ldp, Q, ldq, ptr, src, vals, diag, workspace, n, nnz, m, stream);
    case DType::kBFloat16:
      return launch<__nv_bfloat16>(P, ldp, Q, ldq, ptr, src, vals, diag, workspace, n, nnz, m, stream);
    case DType::kFloat64:
      return launch<double>(P, ldp, Q, ldq, ptr, src, vals, diag, workspace, n, nnz, m, stream);
    case DType::kFloat32:
      return launch<float>(P, ldp, Q, ldq, ptr, src, vals, diag, workspace, n, nnz, m, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace frod_cuda
