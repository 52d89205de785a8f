// Shared device helpers: accumulation types, 16-byte slots of a row (loads at any alignment, stores, element
// conversions) and the warp layout of both kernels.
#pragma once

#include <cstdint>
#include <cstring>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "frod_cuda.h"

// Every launch goes through this macro so that csrc/simt_host.h can run the same kernels and launchers on the CPU
// (tests/backends/test_cuda_backend.py), which defines it first.
#ifndef FROD_LAUNCH
#define FROD_LAUNCH(grid, block, stream, ...) __VA_ARGS__<<<(grid), (block), 0, (stream)>>>
#endif

namespace frod_cuda {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 4;
constexpr int kThreads = kWarp * kWarpsPerBlock;
// 16-byte slots each lane keeps in registers per row segment: enough independent loads in flight per lane.
constexpr int kR = 4;
constexpr int kMaxGridY = 65535;
constexpr unsigned kFullMask = 0xffffffffu;

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

// Operand rows a lane loads at once in the nonzero loops, kR slots each: 2 x 4 x 16 bytes a lane, 4 KB a warp (twice
// that requested where rows are realigned from two chunks a slot, the second mostly an L1 hit). At the 96-190
// registers this takes (2-5 blocks of 4 warps an SM), that keeps 32-80 KB an SM in flight, above the 15-25 KB an
// H100/H200 SM needs to cover L2 latency at L2 bandwidth (about 25 bytes a clock for 600-800 clocks).
constexpr int kRows = 2;

// Elements of T in one 16-byte slot.
template <typename T> constexpr int kVec = 16 / static_cast<int>(sizeof(T));

template <typename To, typename From> __host__ __device__ __forceinline__ To bit_cast(const From& x) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast between types of one size");
  To y;
  memcpy(&y, &x, sizeof(To));
  return y;
}

// ---------------------------------------------------------------------------------------------------- 16-byte slots
// Slot indices and row lengths are 32-bit (the launchers refuse rows of 2^31 elements or more): half the registers
// and instructions of 64-bit ones in the loops that matter.
// A row of m elements is read as ceil(m / kVec) slots of 16 bytes. Slot c holds elements [c kVec, c kVec + kVec),
// the last one fewer when kVec does not divide m. Every slot is loaded with 16-byte loads, whatever the row's
// alignment: a slot that starts on a 16-byte boundary is one load; otherwise it is the two aligned 16-byte chunks
// that hold its first and last byte, shifted into place. Either chunk holds a byte of the row, so neither can touch
// a page the row does not (16-byte chunks never cross a page). Bytes past the row's end are zeroed, which every
// float format reads as +0.

__host__ __device__ __forceinline__ uint32_t word(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

__host__ __device__ __forceinline__ uint4 load16(uintptr_t aligned_address) {
#ifdef __CUDA_ARCH__
  return __ldg(reinterpret_cast<const uint4*>(aligned_address));  // operands are read-only for the whole kernel
#else
  return *reinterpret_cast<const uint4*>(aligned_address);
#endif
}

// Bytes [s, s + 16) of the 32 bytes lo:hi (s < 16), as two selects on whole words and a funnel shift: no
// register array indexed at run time (that would live in local memory).
__host__ __device__ __forceinline__ uint4 realign(const uint4& lo, const uint4& hi, unsigned s) {
  const uint32_t w[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
  const unsigned q = s >> 2, bits = (s & 3u) * 8u;
  uint32_t t[7], u[5];
#pragma unroll
  for (int i = 0; i < 7; ++i) t[i] = (q & 1u) ? w[i + 1] : w[i];
#pragma unroll
  for (int i = 0; i < 5; ++i) u[i] = (q & 2u) ? t[i + 2] : t[i];
  uint32_t o[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) o[i] = static_cast<uint32_t>(((static_cast<uint64_t>(u[i + 1]) << 32) | u[i]) >> bits);
  return make_uint4(o[0], o[1], o[2], o[3]);
}

// v with bytes [nbytes, 16) zeroed.
__host__ __device__ __forceinline__ uint4 keep_bytes(const uint4& v, unsigned nbytes) {
  uint32_t o[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int keep = static_cast<int>(nbytes) - 4 * i;
    const uint32_t mask = keep >= 4 ? 0xffffffffu : keep <= 0 ? 0u : (1u << (8 * keep)) - 1u;
    o[i] = word(v, i) & mask;
  }
  return make_uint4(o[0], o[1], o[2], o[3]);
}

// The loads of one slot, issued apart from their use so that a lane can have many in flight. kAligned: the caller
// knows every row it reads starts on a 16-byte boundary, so one load suffices.
template <typename T, bool kAligned> struct Slot {
  uint4 lo, hi;

  // The slot starting at address a with nbytes of it inside the row (16, but for a row's last slot).
  __host__ __device__ __forceinline__ void load(uintptr_t a, unsigned nbytes) {
    if (kAligned) {
      lo = load16(a);
    } else {
      lo = load16(a & ~uintptr_t{15});
      hi = load16((a + nbytes - 1) & ~uintptr_t{15});
    }
  }

  // The slot's 16 bytes once they have arrived, zero past the row's end; `shift` is the row's address mod 16
  // (every slot of a row has the same).
  __host__ __device__ __forceinline__ uint4 value(int c, int m, unsigned shift) const {
    const uint4 v = kAligned ? lo : realign(lo, hi, shift);
    return m - c * kVec<T> < kVec<T> ? keep_bytes(v, bytes(c, m)) : v;  // (c + 1) kVec could overflow int
  }

  static __host__ __device__ __forceinline__ unsigned bytes(int c, int m) {
    const int left = m - c * kVec<T>;
    return static_cast<unsigned>(left < kVec<T> ? left : kVec<T>) * static_cast<unsigned>(sizeof(T));
  }
};

__host__ __device__ __forceinline__ unsigned shift_of(const void* row) {
  return static_cast<unsigned>(reinterpret_cast<uintptr_t>(row) & 15u);
}

// Issues the loads of a lane's kR slots c0, c0 + L, ... of a row (no use yet), skipping those past its end.
template <typename T, bool kAligned>
__host__ __device__ __forceinline__ void load_row(Slot<T, kAligned> (&x)[kR], const T* row, int c0, int L, int m,
                                                  int slots) {
  // One 64-bit address a lane, then 32-bit steps: ptxas otherwise rebuilds row + c * 16 for every slot.
  const uintptr_t base = reinterpret_cast<uintptr_t>(row + c0 * kVec<T>);
#pragma unroll
  for (int j = 0; j < kR; ++j) {
    const int c = c0 + j * L;
    if (c < slots) x[j].load(base + static_cast<unsigned>(j * L * 16), Slot<T, kAligned>::bytes(c, m));
  }
}

// Element i (a compile-time constant once unrolled) of a slot, in the accumulation type. Explicit intrinsics: torch
// builds with __CUDA_NO_HALF_CONVERSIONS__ / __CUDA_NO_BFLOAT16_CONVERSIONS__.
template <typename T> __host__ __device__ __forceinline__ typename Acc<T>::type element(const uint4& v, int i);
template <> __host__ __device__ __forceinline__ float element<float>(const uint4& v, int i) {
  return bit_cast<float>(word(v, i));
}
template <> __host__ __device__ __forceinline__ double element<double>(const uint4& v, int i) {
  return bit_cast<double>((static_cast<uint64_t>(word(v, 2 * i + 1)) << 32) | word(v, 2 * i));
}
template <> __host__ __device__ __forceinline__ float element<__nv_bfloat16>(const uint4& v, int i) {
  const uint32_t w = word(v, i / 2);
  return bit_cast<float>(i % 2 ? (w & 0xffff0000u) : (w << 16));  // bfloat16 is float32's upper half
}
template <> __host__ __device__ __forceinline__ float element<__half>(const uint4& v, int i) {
  const uint32_t w = word(v, i / 2);
  return __half2float(__ushort_as_half(static_cast<unsigned short>(i % 2 ? w >> 16 : w & 0xffffu)));
}

// kVec values rounded to T (nearest even), packed as one slot.
template <typename T> __host__ __device__ __forceinline__ uint4 pack(const typename Acc<T>::type (&x)[kVec<T>]);
template <> __host__ __device__ __forceinline__ uint4 pack<float>(const float (&x)[4]) {
  return make_uint4(bit_cast<uint32_t>(x[0]), bit_cast<uint32_t>(x[1]), bit_cast<uint32_t>(x[2]),
                    bit_cast<uint32_t>(x[3]));
}
template <> __host__ __device__ __forceinline__ uint4 pack<double>(const double (&x)[2]) {
  const uint64_t a = bit_cast<uint64_t>(x[0]), b = bit_cast<uint64_t>(x[1]);
  return make_uint4(static_cast<uint32_t>(a), static_cast<uint32_t>(a >> 32), static_cast<uint32_t>(b),
                    static_cast<uint32_t>(b >> 32));
}
__host__ __device__ __forceinline__ uint32_t halves(unsigned short lo, unsigned short hi) {
  return static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
}
template <> __host__ __device__ __forceinline__ uint4 pack<__nv_bfloat16>(const float (&x)[8]) {
  uint32_t w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
    w[i] = halves(__bfloat16_as_ushort(__float2bfloat16_rn(x[2 * i])),
                  __bfloat16_as_ushort(__float2bfloat16_rn(x[2 * i + 1])));
  return make_uint4(w[0], w[1], w[2], w[3]);
}
template <> __host__ __device__ __forceinline__ uint4 pack<__half>(const float (&x)[8]) {
  uint32_t w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
    w[i] = halves(__half_as_ushort(__float2half_rn(x[2 * i])), __half_as_ushort(__float2half_rn(x[2 * i + 1])));
  return make_uint4(w[0], w[1], w[2], w[3]);
}

// Writes the first nbytes of v at p, with the widest stores p's alignment allows (a whole slot is one 16-byte store
// where the output row is aligned; a row's tail, fewer than 16 bytes, goes element by element).
template <typename T> __host__ __device__ __forceinline__ void store_slot(T* p, const uint4& v, unsigned nbytes) {
  char* c = reinterpret_cast<char*>(p);
  const unsigned mis = static_cast<unsigned>(reinterpret_cast<uintptr_t>(p) & 15u);
  if (nbytes == 16 && mis == 0) {
    *reinterpret_cast<uint4*>(c) = v;
  } else if (nbytes == 16 && mis % 8 == 0) {
    reinterpret_cast<uint2*>(c)[0] = make_uint2(v.x, v.y);
    reinterpret_cast<uint2*>(c)[1] = make_uint2(v.z, v.w);
  } else if (nbytes == 16 && mis % 4 == 0) {
    reinterpret_cast<uint32_t*>(c)[0] = v.x;
    reinterpret_cast<uint32_t*>(c)[1] = v.y;
    reinterpret_cast<uint32_t*>(c)[2] = v.z;
    reinterpret_cast<uint32_t*>(c)[3] = v.w;
  } else {
#pragma unroll
    for (int i = 0; i < kVec<T>; ++i) {
      if (static_cast<unsigned>(i) * sizeof(T) < nbytes) {
        if (sizeof(T) == 2) {
          reinterpret_cast<unsigned short*>(c)[i] = static_cast<unsigned short>(word(v, i / 2) >> (16 * (i % 2)));
        } else if (sizeof(T) == 4) {
          reinterpret_cast<uint32_t*>(c)[i] = word(v, i);
        } else {
          reinterpret_cast<uint2*>(c)[i] = make_uint2(word(v, 2 * i), word(v, 2 * i + 1));
        }
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------------ warp layout
// A warp owns one row r; its 32 lanes form G = 32 / L groups of L lanes. The L lanes of a group split the row's
// slots (lane l takes slots l, l + L, ..., kR of them per segment); the G groups split the row's nonzeros. Short
// rows (few tokens) thus still keep every lane busy, long rows are cut into segments of L * kR slots spread over
// gridDim.y.
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
  bool aligned;  // every row read starts on a 16-byte boundary: one load a slot, no realignment
  int log_l;     // log2 L
  int slots;     // 16-byte slots a row
  int n_seg;     // segments a row
};

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Every row of an operand at p with row stride ld (elements) starts on a 16-byte boundary.
inline bool rows_aligned(int elem_size, const void* p, int64_t ld) {
  return aligned16(p) && (ld * elem_size) % 16 == 0;
}

// Rows at least this long (elements) are refused: the kernels index a row's slots with 32-bit integers.
constexpr int64_t kMaxRowLength = int64_t{1} << 31;

// m < kMaxRowLength.
inline Plan make_plan(int elem_size, bool aligned, int64_t m) {
  Plan p;
  p.aligned = aligned;
  const int vec = 16 / elem_size;
  p.slots = static_cast<int>((m + vec - 1) / vec);
  const int lanes_wanted = (p.slots + kR - 1) / kR;
  p.log_l = 0;
  while ((1 << p.log_l) < kWarp && (1 << p.log_l) < lanes_wanted) ++p.log_l;
  const int seg = (1 << p.log_l) * kR;
  p.n_seg = (p.slots + seg - 1) / seg;
  return p;
}

inline dim3 grid_for(int64_t n, int n_seg) {
  const int y = n_seg < kMaxGridY ? n_seg : kMaxGridY;
  return dim3(static_cast<unsigned>((n + kWarpsPerBlock - 1) / kWarpsPerBlock), static_cast<unsigned>(y > 0 ? y : 1));
}

}  // namespace frod_cuda
