// Sampled dot with diagonal (DESIGN.md section 6, family 2): dS and dlambda in one pass, no atomics. A warp owns
// one row r of P, keeps its slice of P[r] in registers and dots it with Q[r] (the diagonal) and with Q[src[k]] for
// every nonzero k of the row. Rows longer than one segment are split into segments written as partial sums and
// added up in a second pass in segment order, so the result does not depend on scheduling.
#include "common.cuh"

namespace frod_cuda {
namespace {

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
sampled_dot_diag_kernel(const T* __restrict__ P, int64_t ldp, const T* __restrict__ Q, int64_t ldq,
                        const int64_t* __restrict__ ptr, const int64_t* __restrict__ src,
                        typename Acc<T>::type* __restrict__ vals, typename Acc<T>::type* __restrict__ diag, int64_t n,
                        int64_t nnz, int64_t m_vec, int log_l, int64_t n_seg) {
  using acc_t = typename Acc<T>::type;
  using V = Vec<T, VEC>;
  const WarpLanes lanes(log_l);
  const int64_t r = lanes.r;
  if (r >= n) return;  // whole warps only: the shuffles below need all 32 lanes of a live warp
  const int L = lanes.L, G = lanes.G, g = lanes.g, l = lanes.l;
  const int64_t beg = ptr[r];
  // Entry 0 is the diagonal (Q row r), entry e >= 1 the nonzero beg + e - 1.
  const int64_t n_ent = ptr[r + 1] - beg + 1;
  const V* prow = reinterpret_cast<const V*>(P + r * ldp);

  for (int64_t seg = blockIdx.y; seg < n_seg; seg += gridDim.y) {
    const int64_t c0 = seg * L * kR + l;
    acc_t p[kR][VEC];
#pragma unroll
    for (int j = 0; j < kR; ++j) {
      const int64_t cv = c0 + static_cast<int64_t>(j) * L;
      if (cv < m_vec) {
        const V x = prow[cv];
#pragma unroll
        for (int v = 0; v < VEC; ++v) p[j][v] = to_acc(x.v[v]);
      } else {
#pragma unroll
        for (int v = 0; v < VEC; ++v) p[j][v] = acc_t(0);
      }
    }
    // The trip count is the same for every lane of the warp: the group reduction shuffles need all of them.
    for (int64_t e0 = 0; e0 < n_ent; e0 += G) {
      const int64_t e = e0 + g;
      acc_t s[kR];
#pragma unroll
      for (int j = 0; j < kR; ++j) s[j] = acc_t(0);
      if (e < n_ent) {
        const int64_t q = e == 0 ? r : src[beg + e - 1];
        const V* qrow = reinterpret_cast<const V*>(Q + q * ldq);
#pragma unroll
        for (int j = 0; j < kR; ++j) {
          const int64_t cv = c0 + static_cast<int64_t>(j) * L;
          if (cv < m_vec) {
            const V x = qrow[cv];
#pragma unroll
            for (int v = 0; v < VEC; ++v) s[j] += p[j][v] * to_acc(x.v[v]);
          }
        }
      }
      acc_t t = (s[0] + s[1]) + (s[2] + s[3]);
      static_assert(kR == 4, "the pairwise sum above assumes kR == 4");
      // Tree over the L lanes of the group (the low lane bits), in a fixed order.
      for (int off = 1; off < L; off <<= 1) t += __shfl_xor_sync(kFullMask, t, off);
      if (l == 0 && e < n_ent) {
        if (e == 0) {
          diag[seg * n + r] = t;
        } else {
          vals[seg * nnz + beg + e - 1] = t;
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
  sum_segments_kernel<acc_t><<<static_cast<unsigned>(blocks < 65535 ? blocks : 65535), 256, 0, stream>>>(
      part, out, len, n_seg);
}

template <typename T>
Plan plan_for(const void* P, int64_t ldp, const void* Q, int64_t ldq, int64_t m) {
  const bool vec_ok = rows_vectorizable(sizeof(T), P, ldp, m) && rows_vectorizable(sizeof(T), Q, ldq, m);
  return make_plan(sizeof(T), vec_ok, m);
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
  constexpr int kVec = 16 / sizeof(T);
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
  if (p.vec == kVec) {
    sampled_dot_diag_kernel<T, kVec><<<grid, kThreads, 0, stream>>>(pp, ldp, qq, ldq, ptr, src, v_part, d_part, n,
                                                                    nnz, p.m_vec, p.log_l, p.n_seg);
  } else {
    sampled_dot_diag_kernel<T, 1><<<grid, kThreads, 0, stream>>>(pp, ldp, qq, ldq, ptr, src, v_part, d_part, n, nnz,
                                                                 p.m_vec, p.log_l, p.n_seg);
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
