// Global -> shared memory copy of one GEMM operand tile, shared by the CUDA-core and tensor-core
// kernels. The tile is ROWS x BK: ROWS along M (operand A) or N (operand B), BK along the reduction.
// Element (r, k) of the tile at (r0, k0) is base[(r0 + r) * r_stride + (k0 + k) * k_stride];
// elements outside [0, r_lim) x [0, k_lim) read as 0 (so partial tiles add nothing).
//
// K_CONTIG says which tile dimension is contiguous in memory (k_stride == 1, else r_stride == 1
// for coalescing; any strides are still correct). Consecutive threads take consecutive elements
// along that dimension: thread t keeps one fixed index f = t % FAST along it, and visits the other
// dimension at s = t / FAST, s + STEP, s + 2*STEP, ... (STEP = NT / FAST), so a warp's loads are
// runs of consecutive addresses and the address math is one base plus a constant stride.
#pragma once

#include "common.cuh"

namespace fastmlp::cuda {

template <typename T, int ROWS, int BK, int NT, bool K_CONTIG>
struct TileLoader {
  static constexpr int FAST = K_CONTIG ? BK : ROWS;
  static constexpr int STEP = NT / FAST;
  static constexpr int LOADS = ROWS * BK / NT;
  static_assert(NT % FAST == 0, "threads must cover whole runs of the contiguous dimension");
  static_assert((ROWS * BK) % NT == 0, "every thread loads the same number of elements");

  int f, s;
  __device__ __forceinline__ explicit TileLoader(int tid) : f(tid % FAST), s(tid / FAST) {}

  // Calls store(r, k, value) for each of this thread's LOADS elements.
  template <typename Store>
  __device__ __forceinline__ void load(const T* __restrict__ base, int64_t r_stride, int64_t k_stride,
                                       int64_t r0, int64_t r_lim, int64_t k0, int64_t k_lim,
                                       Store&& store) const {
    if constexpr (K_CONTIG) {
      const int k = f;
      const bool k_ok = k0 + k < k_lim;
      const int64_t off = (r0 + s) * r_stride + (k0 + k) * k_stride;
#pragma unroll
      for (int t = 0; t < LOADS; ++t) {
        const int r = s + t * STEP;
        const bool ok = k_ok && r0 + r < r_lim;
        store(r, k, ok ? base[off + int64_t(t * STEP) * r_stride] : zero<T>());
      }
    } else {
      const int r = f;
      const bool r_ok = r0 + r < r_lim;
      const int64_t off = (r0 + r) * r_stride + (k0 + s) * k_stride;
#pragma unroll
      for (int t = 0; t < LOADS; ++t) {
        const int k = s + t * STEP;
        const bool ok = r_ok && k0 + k < k_lim;
        store(r, k, ok ? base[off + int64_t(t * STEP) * k_stride] : zero<T>());
      }
    }
  }
};

}  // namespace fastmlp::cuda
