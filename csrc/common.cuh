// Shared device helpers: accumulation types, conversions, vector loads and the warp layout of both kernels.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "frod_cuda.h"

namespace frod_cuda {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 4;
constexpr int kThreads = kWarp * kWarpsPerBlock;
// Vectors each lane keeps in registers per row segment: enough independent 16-byte loads in flight per lane.
constexpr int kR = 4;
constexpr int kMaxGridY = 65535;
constexpr unsigned kFullMask = 0xffffffffu;

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

// Explicit intrinsics: torch builds with __CUDA_NO_HALF_CONVERSIONS__ / __CUDA_NO_BFLOAT16_CONVERSIONS__.
__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_acc(typename Acc<T>::type x);
template <> __device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <> __device__ __forceinline__ double from_acc<double>(double x) { return x; }
template <> __device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

template <typename T, int VEC> struct alignas(sizeof(T) * VEC) Vec { T v[VEC]; };

// Work layout shared by both kernels. A warp owns one row r; its 32 lanes form G = 32 / L groups of L lanes. The
// L lanes of a group split the columns (lane l takes vectors l, l + L, ..., kR of them per segment); the G groups
// split the row's nonzeros. Short rows (few tokens) thus still keep every lane busy, long rows are cut into
// segments of L * kR vectors spread over gridDim.y.
// One thread's place in that layout: the output row its warp owns, and its group g (of G) and lane l (of L).
struct WarpLanes {
  int64_t r;
  int L, G, g, l;
  __device__ explicit WarpLanes(int log_l)
      : r(static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x / kWarp)),
        L(1 << log_l),
        G(kWarp >> log_l),
        g(static_cast<int>(threadIdx.x % kWarp) >> log_l),
        l(static_cast<int>(threadIdx.x % kWarp) & ((1 << log_l) - 1)) {}
};

struct Plan {
  int vec;        // elements per vector load: 16 bytes, or 1 where alignment does not allow it
  int log_l;      // log2 L
  int64_t m_vec;  // row length in vectors
  int64_t n_seg;  // segments per row
};

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

inline Plan make_plan(int elem_size, bool vec_ok, int64_t m) {
  Plan p;
  p.vec = vec_ok ? 16 / elem_size : 1;
  p.m_vec = m / p.vec;
  const int64_t lanes_wanted = (p.m_vec + kR - 1) / kR;
  p.log_l = 0;
  while ((1 << p.log_l) < kWarp && (int64_t{1} << p.log_l) < lanes_wanted) ++p.log_l;
  const int64_t seg = (int64_t{1} << p.log_l) * kR;
  p.n_seg = (p.m_vec + seg - 1) / seg;
  return p;
}

// 16-byte vectors need 16-byte-aligned rows: base pointer, row stride and row length all in whole vectors.
inline bool rows_vectorizable(int elem_size, const void* p, int64_t ld, int64_t m) {
  const int64_t vec = 16 / elem_size;
  return aligned16(p) && ld % vec == 0 && m % vec == 0;
}

inline dim3 grid_for(int64_t n, int64_t n_seg) {
  const int64_t y = n_seg < kMaxGridY ? n_seg : kMaxGridY;
  return dim3(static_cast<unsigned>((n + kWarpsPerBlock - 1) / kWarpsPerBlock), static_cast<unsigned>(y > 0 ? y : 1));
}

inline int elem_size(DType dt) {
  switch (dt) {
    case DType::kFloat16:
    case DType::kBFloat16: return 2;
    case DType::kFloat64: return 8;
    default: return 4;
  }
}

}  // namespace frod_cuda
