// ReLU in place with its 1-bit mask, for an output a vendor GEMM (cuBLAS through ATen) computed:
// the epilogue the hand-written GEMMs fuse (epilogue.cuh), as a pass of its own. One thread per
// mask byte (8 consecutive columns of a row), so no byte is written twice.
#pragma once

#include "common.cuh"

namespace fastmlp::cuda {

// y(i, j) = y(i, j) if > 0 or NaN (like torch.relu), else 0; bit j % 8 of mask[i * ldm + j / 8] set
// iff y(i, j) > 0 (mask may be null). y (rows, cols) row-major contiguous; ldm = ceil(cols / 8).
template <typename T>
__global__ void relu_mask_kernel(int64_t rows, int64_t cols, T* y, uint8_t* mask) {
  const int64_t ldm = (cols + 7) / 8;
  const int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= rows * ldm) return;
  const int64_t i = t / ldm, j0 = (t % ldm) * 8;
  T* row = y + i * cols;
  uint32_t bits = 0;
  for (int c = 0; c < 8 && j0 + c < cols; ++c) {
    const acc_t<T> v = to_acc(row[j0 + c]);
    if (v > acc_t<T>(0)) bits |= 1u << c;
    else if (!(v != v)) row[j0 + c] = zero<T>();
  }
  if (mask != nullptr) mask[t] = uint8_t(bits);
}

}  // namespace fastmlp::cuda
