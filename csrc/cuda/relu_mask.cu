// Launchers of relu_mask_kernel (relu_mask.cuh).
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include "kernels.h"
#include "relu_mask.cuh"

namespace fastmlp::cuda {

namespace {

template <typename T>
void run(int64_t rows, int64_t cols, T* y, uint8_t* mask, cudaStream_t stream) {
  const int64_t threads = rows * div_up(cols, 8);
  if (threads == 0) return;
  const int64_t blocks = div_up(threads, 256);
  TORCH_CHECK(blocks <= 0x7fffffff, "fastmlp: relu_mask: too large for one launch");
  relu_mask_kernel<T><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(rows, cols, y, mask);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void relu_mask(int64_t rows, int64_t cols, float* y, uint8_t* mask, cudaStream_t s) { run(rows, cols, y, mask, s); }
void relu_mask(int64_t rows, int64_t cols, double* y, uint8_t* mask, cudaStream_t s) { run(rows, cols, y, mask, s); }
void relu_mask(int64_t rows, int64_t cols, __half* y, uint8_t* mask, cudaStream_t s) { run(rows, cols, y, mask, s); }
void relu_mask(int64_t rows, int64_t cols, __nv_bfloat16* y, uint8_t* mask, cudaStream_t s) {
  run(rows, cols, y, mask, s);
}

}  // namespace fastmlp::cuda
