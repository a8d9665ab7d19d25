// Launchers of the ReLU-backward + bias-gradient kernels (drelu_bias_grad.cuh).
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include "drelu_bias_grad.cuh"
#include "kernels.h"

namespace fastmlp::cuda {

namespace {

template <typename T>
void run(int64_t rows, int64_t cols, const T* gy, const uint8_t* mask, int64_t ldm, T* dz, T* gb,
         acc_t<T>* partial, cudaStream_t stream) {
  const BiasGradPlan plan = bias_grad_plan(rows, cols, dz != nullptr, gb != nullptr);
  TORCH_CHECK(!plan.finish || plan.parts == 0 || partial != nullptr,
              "fastmlp: drelu_bias_grad needs a workspace for its partial sums");
  if (plan.pass1) {
    const int64_t gx = div_up(cols, kCols);
    TORCH_CHECK(gx <= 0x7fffffff && plan.parts <= 65535, "fastmlp: drelu_bias_grad: too large for one launch");
    const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(plan.parts)), block(kCols, kRowLanes);
    drelu_colsum_kernel<T><<<grid, block, 0, stream>>>(rows, cols, plan.chunk, gy, mask, ldm, dz,
                                                       plan.direct ? gb : nullptr,
                                                       plan.finish ? partial : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (plan.finish) {  // parts == 0 (no rows): gb = 0
    const int64_t blocks = div_up(cols, 256);
    TORCH_CHECK(blocks <= 0x7fffffff, "fastmlp: drelu_bias_grad: too many columns");
    bias_grad_finish_kernel<T><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(plan.parts, cols, partial, gb);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace

int64_t bias_grad_partials(int64_t rows) { return bias_grad_plan(rows, 1, false, true).parts; }

void drelu_bias_grad(int64_t rows, int64_t cols, const float* gy, const uint8_t* mask, int64_t ldm,
                     float* dz, float* gb, float* partial, cudaStream_t stream) {
  run(rows, cols, gy, mask, ldm, dz, gb, partial, stream);
}
void drelu_bias_grad(int64_t rows, int64_t cols, const double* gy, const uint8_t* mask, int64_t ldm,
                     double* dz, double* gb, double* partial, cudaStream_t stream) {
  run(rows, cols, gy, mask, ldm, dz, gb, partial, stream);
}
void drelu_bias_grad(int64_t rows, int64_t cols, const __half* gy, const uint8_t* mask, int64_t ldm,
                     __half* dz, __half* gb, float* partial, cudaStream_t stream) {
  run(rows, cols, gy, mask, ldm, dz, gb, partial, stream);
}
void drelu_bias_grad(int64_t rows, int64_t cols, const __nv_bfloat16* gy, const uint8_t* mask,
                     int64_t ldm, __nv_bfloat16* dz, __nv_bfloat16* gb, float* partial,
                     cudaStream_t stream) {
  run(rows, cols, gy, mask, ldm, dz, gb, partial, stream);
}

}  // namespace fastmlp::cuda
