// A CPU stand-in for the little of CUDA that csrc/*.cu uses, so that their kernels and launchers run unchanged on a
// machine without a GPU: tests/backends/test_cuda_backend.py compiles them with the host C++ compiler,
//
//     g++ -std=c++17 -x c++ -include csrc/simt_host.h -I$CUDA_HOME/include -shared -fPIC csrc/*.cu
//
// and calls the launchers on CPU tensors. Each warp's 32 lanes run as coroutines (ucontext) on one thread, switched
// at every warp shuffle, so a shuffle sees the values all 32 lanes brought to it, as on a GPU. It checks what a GPU
// would not forgive: every lane of a warp must reach the same shuffle (or all leave the kernel), with a full mask.
// Blocks and warps run one after another; the kernels share nothing between warps, so order cannot matter.
#pragma once

#include <ucontext.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>

#include <cuda_runtime.h>

#define __launch_bounds__(...)
#define FROD_LAUNCH(grid, block, stream, ...) ::frod_sim::Launch((grid), (block), __VA_ARGS__)
// Nothing is queued on a device, so nothing can fail after the launch.
#define cudaGetLastError() cudaSuccess

namespace frod_sim {

inline uint3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "simt_host: %s (block %u,%u thread %u)\n", what, blockIdx.x, blockIdx.y, threadIdx.x);
  std::abort();
}

// One warp in flight: its lanes' coroutines and the values they exchange.
struct Warp {
  static constexpr int kLanes = 32;
  static constexpr size_t kStack = 256 * 1024;
  enum State { kRunning, kAtShuffle, kDone };

  ucontext_t scheduler{};
  ucontext_t lane_ctx[kLanes]{};
  std::vector<char> stacks = std::vector<char>(kLanes * kStack);
  State state[kLanes]{};
  int lane = 0;       // the lane running now
  int offset[kLanes]{};
  // Double-buffered by round: a lane that is through round t cannot write round t + 1's slot before every lane has
  // read round t's (round t + 1 completes only once all lanes reach it).
  unsigned char slot[2][kLanes][8]{};
  unsigned round[kLanes]{};
  std::function<void()> body;

  static void entry();
  void run(unsigned warp_in_block) {
    for (int i = 0; i < kLanes; ++i) {
      state[i] = kRunning;
      round[i] = 0;
      getcontext(&lane_ctx[i]);
      lane_ctx[i].uc_stack.ss_sp = stacks.data() + i * kStack;
      lane_ctx[i].uc_stack.ss_size = kStack;
      lane_ctx[i].uc_link = &scheduler;
      makecontext(&lane_ctx[i], entry, 0);
    }
    for (;;) {
      for (int i = 0; i < kLanes; ++i) {
        if (state[i] == kDone) continue;
        lane = i;
        threadIdx = make_uint3(warp_in_block * kLanes + i, 0, 0);
        swapcontext(&scheduler, &lane_ctx[i]);
      }
      int done = 0, at = 0;
      for (int i = 0; i < kLanes; ++i) {
        done += state[i] == kDone;
        at += state[i] == kAtShuffle;
      }
      if (done == kLanes) return;
      if (at != kLanes) fail("a shuffle that not all lanes of the warp reach");
      for (int i = 1; i < kLanes; ++i)
        if (offset[i] != offset[0] || round[i] != round[0]) fail("lanes of a warp at different shuffles");
      for (int i = 0; i < kLanes; ++i) state[i] = kRunning;
    }
  }
};

inline Warp* current = nullptr;

inline void Warp::entry() {
  current->body();
  current->state[current->lane] = kDone;  // uc_link returns to the scheduler
}

template <typename T> T shfl_xor(unsigned mask, T v, int lane_mask) {
  static_assert(sizeof(T) <= 8, "shuffles move up to 8 bytes");
  if (mask != 0xffffffffu) fail("shuffle without a full mask");
  Warp& w = *current;
  const int me = w.lane;
  const unsigned t = w.round[me] & 1u;
  std::memcpy(w.slot[t][me], &v, sizeof(T));
  w.offset[me] = lane_mask;
  w.state[me] = Warp::kAtShuffle;
  swapcontext(&w.lane_ctx[me], &w.scheduler);
  T out;
  std::memcpy(&out, w.slot[t][me ^ lane_mask], sizeof(T));
  ++w.round[me];
  return out;
}

// Runs kernel(args...) on every thread of grid x block (block.x a multiple of 32).
template <typename Kernel> struct Launch {
  dim3 grid, block;
  Kernel* kernel;
  Launch(dim3 g, dim3 b, Kernel* k) : grid(g), block(b), kernel(k) {}

  template <typename... Args> void operator()(Args... args) const {
    if (block.x % Warp::kLanes != 0 || block.y != 1 || block.z != 1) fail("blocks must be whole warps along x");
    Warp w;
    Warp* outer = current;
    current = &w;
    w.body = [&] { kernel(args...); };
    gridDim = grid;
    blockDim = block;
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x)
        for (unsigned warp = 0; warp < block.x / Warp::kLanes; ++warp) {
          blockIdx = make_uint3(x, y, 0);
          w.run(warp);
        }
    current = outer;
  }
};

}  // namespace frod_sim

using frod_sim::blockDim;
using frod_sim::blockIdx;
using frod_sim::gridDim;
using frod_sim::threadIdx;

template <typename T> T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
  return frod_sim::shfl_xor(mask, v, lane_mask);
}
