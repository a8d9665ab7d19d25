// The fused GEMM epilogue shared by the CUDA-core and tensor-core kernels: bias, down-cast, ReLU
// and the bits of the 1-bit ReLU mask, for NC <= 8 consecutive columns of one row of C.
//
// Mask bytes: the caller guarantees that `col` is a multiple of 8 when NC == 8, or that two
// threads holding columns [col, col + 4) and [col + 4, col + 8) combine their 4-bit results
// before one of them stores the byte (see gemm_simt.cuh). No byte is ever written by two threads
// or two blocks, so there is no read-modify-write and no race.
#pragma once

#include "common.cuh"
#include "kernels.h"

namespace fastmlp::cuda {

// Writes C(row, col + c) for c < NC (columns >= g.cols and rows >= g.rows are skipped) and returns
// the ReLU mask bits of those columns: bit c is set iff the stored value is > 0 (0 without relu
// and for skipped columns).
template <typename T, int NC>
__device__ __forceinline__ uint32_t epilogue_store(const GemmArgs<T>& g, int64_t row, int64_t col,
                                                   const acc_t<T> (&v)[NC]) {
  static_assert(NC >= 1 && NC <= 8, "at most one mask byte per call");
  if (row >= g.rows) return 0;
  uint32_t bits = 0;
  T* out = g.c + row * g.ldc + col;
#pragma unroll
  for (int c = 0; c < NC; ++c) {
    if (col + c >= g.cols) continue;
    acc_t<T> z = v[c];
    if (g.bias != nullptr) z += to_acc(g.bias[col + c]);
    T y = from_acc<T>(z);
    if (g.relu) {
      const acc_t<T> yv = to_acc(y);
      if (yv > acc_t<T>(0)) {
        bits |= 1u << c;
      } else if (!(yv != yv)) {  // keep NaN, like torch.relu; everything else <= 0 becomes +0
        y = zero<T>();
      }
    }
    out[c] = y;
  }
  return bits;
}

}  // namespace fastmlp::cuda
