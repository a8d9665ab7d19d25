// The kernels of the whole training step that are not GEMMs or the ReLU backward: the softmax
// cross-entropy with its gradient, and the multi-tensor SGD and Adam updates (interfaces: kernels.h).
//
// Both are deterministic: every sum has one fixed order that depends on the shapes alone.
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>

#include "common.cuh"
#include "kernels.h"
#include "step_kernels.cuh"

namespace fastmlp::cuda {

namespace {

// ---- softmax cross-entropy ---------------------------------------------------------------------

// One block does the whole batch: the step's batches are small (64 rows of 10 logits in the
// project's models), and one block can sum the loss and the bias gradient in a fixed order without
// a second launch. Warp w takes rows w, w + kWarps, ...; its lanes split the columns.
constexpr int kXentThreads = 512;
constexpr int kXentWarps = kXentThreads / 32;

__device__ __forceinline__ float exp_(float v) { return expf(v); }
__device__ __forceinline__ double exp_(double v) { return exp(v); }
__device__ __forceinline__ float log_(float v) { return logf(v); }
__device__ __forceinline__ double log_(double v) { return log(v); }

// max that propagates NaN (like torch.max), so a NaN logit gives a NaN loss rather than vanishing.
template <typename T>
__device__ __forceinline__ T nan_max(T a, T b) {
  return (b > a || b != b) ? b : a;
}

template <typename T>
__global__ void __launch_bounds__(kXentThreads)
    softmax_xent_kernel(int64_t rows, int64_t cols, const T* __restrict__ logits,
                        const int64_t* __restrict__ target, T* __restrict__ dz, T* __restrict__ gb,
                        T* __restrict__ loss, int32_t* __restrict__ bad) {
  __shared__ T warp_loss[kXentWarps];
  __shared__ int any_bad;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (threadIdx.x == 0) any_bad = 0;
  __syncthreads();

  const T inv_rows = T(1) / T(rows);
  T row_sum = 0;  // lane 0: this warp's row losses, added in row order
  for (int64_t i = warp; i < rows; i += kXentWarps) {
    const T* z = logits + i * cols;
    T* d = dz + i * cols;
    const int64_t t = target[i];
    T mx = -INFINITY;
    for (int64_t j = lane; j < cols; j += 32) mx = nan_max(mx, z[j]);
    for (int o = 16; o > 0; o /= 2) mx = nan_max(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    T sum = 0;
    for (int64_t j = lane; j < cols; j += 32) sum += (d[j] = exp_(z[j] - mx));
    for (int o = 16; o > 0; o /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, o);  // same on all lanes
    const T inv_sum = T(1) / sum;
    for (int64_t j = lane; j < cols; j += 32) d[j] = (d[j] * inv_sum - T(j == t ? 1 : 0)) * inv_rows;
    if (lane == 0) {
      if (t >= 0 && t < cols) row_sum += mx + log_(sum) - z[t];
      else any_bad = 1;
    }
  }
  if (lane == 0) warp_loss[warp] = row_sum;
  __syncthreads();  // also makes every thread's dz writes visible to the whole block

  if (threadIdx.x == 0) {
    T total = 0;
    for (int w = 0; w < kXentWarps; ++w) total += warp_loss[w];
    *loss = any_bad ? T(NAN) : total * inv_rows;
    *bad = any_bad;
  }
  if (gb != nullptr) {
    for (int64_t j = threadIdx.x; j < cols; j += kXentThreads) {
      T s = 0;
      for (int64_t i = 0; i < rows; ++i) s += dz[i * cols + j];
      gb[j] = s;
    }
  }
}

template <typename T>
void run_xent(int64_t rows, int64_t cols, const T* logits, const int64_t* target, T* dz, T* gb, T* loss,
              int32_t* bad, cudaStream_t stream) {
  TORCH_CHECK(rows > 0 && cols > 0, "fastmlp: softmax_xent needs a non-empty batch and at least one class");
  softmax_xent_kernel<T><<<1, kXentThreads, 0, stream>>>(rows, cols, logits, target, dz, gb, loss, bad);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Cuts `tensors` into batches of up to kMax and calls launch(batch, blocks) for each non-empty one,
// with a grid of at most 8 blocks of kUpdateThreads per SM (the kernels loop over the rest).
constexpr int kUpdateThreads = 256;

template <class Batch, int kMax, class Tensor, class Launch>
void for_each_batch(const Tensor* tensors, int count, int num_sms, Launch launch) {
  for (int first = 0; first < count; first += kMax) {
    const auto b = make_batch<Batch>(tensors + first, std::min(kMax, count - first));
    const int64_t total = b.start[b.count];
    if (total == 0) continue;
    const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(div_up(total, kUpdateThreads), 8LL * num_sms));
    launch(b, static_cast<unsigned>(blocks));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename T>
void run_sgd(const SgdTensor<T>* tensors, int count, T lr, const T* lr_scale, T momentum, T weight_decay,
             const int32_t* skip, int num_sms, cudaStream_t stream) {
  for_each_batch<SgdBatch<T>, kMaxSgdTensors>(tensors, count, num_sms, [&](const SgdBatch<T>& b, unsigned blocks) {
    sgd_kernel<T><<<blocks, kUpdateThreads, 0, stream>>>(b, lr, lr_scale, momentum, weight_decay, skip);
  });
}

template <typename T>
void run_adam(const AdamTensor<T>* tensors, int count, const AdamHyper<T>& hyper, const T* lr_scale,
              const int32_t* skip, int num_sms, cudaStream_t stream) {
  for_each_batch<AdamBatch<T>, kMaxAdamTensors>(tensors, count, num_sms, [&](const AdamBatch<T>& b, unsigned blocks) {
    adam_kernel<T><<<blocks, kUpdateThreads, 0, stream>>>(b, hyper, lr_scale, skip);
  });
}

// Adam(capturable=True)'s step counts, advanced on the device before the update reads them.
constexpr int kMaxCounts = 64;
struct CountBatch {
  StepCount c[kMaxCounts];
  int count;
};

__global__ void advance_kernel(const CountBatch b, const int32_t* skip) {
  if (skip != nullptr && *skip != 0) return;
  const int i = threadIdx.x;
  if (i >= b.count) return;
  if (b.c[i].is_double) *static_cast<double*>(b.c[i].p) += 1.0;
  else *static_cast<float*>(b.c[i].p) += 1.0f;
}

}  // namespace

void adam_update(const AdamTensor<float>* tensors, int count, const AdamHyper<float>& hyper, const float* lr_scale,
                 const int32_t* skip, int num_sms, cudaStream_t stream) {
  run_adam(tensors, count, hyper, lr_scale, skip, num_sms, stream);
}
void adam_update(const AdamTensor<double>* tensors, int count, const AdamHyper<double>& hyper,
                 const double* lr_scale, const int32_t* skip, int num_sms, cudaStream_t stream) {
  run_adam(tensors, count, hyper, lr_scale, skip, num_sms, stream);
}

void advance_steps(const StepCount* counts, int count, const int32_t* skip, cudaStream_t stream) {
  for (int first = 0; first < count; first += kMaxCounts) {
    CountBatch b{};
    b.count = std::min(kMaxCounts, count - first);
    for (int i = 0; i < b.count; ++i) b.c[i] = counts[first + i];
    advance_kernel<<<1, kMaxCounts, 0, stream>>>(b, skip);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

void softmax_xent(int64_t rows, int64_t cols, const float* logits, const int64_t* target, float* dz,
                  float* gb, float* loss, int32_t* bad, cudaStream_t stream) {
  run_xent(rows, cols, logits, target, dz, gb, loss, bad, stream);
}
void softmax_xent(int64_t rows, int64_t cols, const double* logits, const int64_t* target, double* dz,
                  double* gb, double* loss, int32_t* bad, cudaStream_t stream) {
  run_xent(rows, cols, logits, target, dz, gb, loss, bad, stream);
}

void sgd_update(const SgdTensor<float>* tensors, int count, float lr, const float* lr_scale, float momentum,
                float weight_decay, const int32_t* skip, int num_sms, cudaStream_t stream) {
  run_sgd(tensors, count, lr, lr_scale, momentum, weight_decay, skip, num_sms, stream);
}
void sgd_update(const SgdTensor<double>* tensors, int count, double lr, const double* lr_scale, double momentum,
                double weight_decay, const int32_t* skip, int num_sms, cudaStream_t stream) {
  run_sgd(tensors, count, lr, lr_scale, momentum, weight_decay, skip, num_sms, stream);
}

}  // namespace fastmlp::cuda
