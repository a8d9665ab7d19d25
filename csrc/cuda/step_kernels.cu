// The two kernels of the whole training step that are not GEMMs or the ReLU backward: the softmax
// cross-entropy with its gradient, and the multi-tensor SGD update (interfaces: kernels.h).
//
// Both are deterministic: every sum has one fixed order that depends on the shapes alone.
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>

#include "common.cuh"
#include "kernels.h"

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

// ---- SGD update --------------------------------------------------------------------------------

// Tensors per launch: the batch travels as a kernel argument, which must stay under 4 KiB.
constexpr int kMaxSgdTensors = 48;

template <typename T>
struct SgdBatch {
  SgdTensor<T> t[kMaxSgdTensors];
  int64_t start[kMaxSgdTensors + 1];  // element offsets: tensor s holds [start[s], start[s + 1])
  int count;
};
static_assert(sizeof(SgdBatch<double>) < 4000, "kernel arguments are limited to 4 KiB");

template <typename T>
__global__ void sgd_kernel(const SgdBatch<T> b, T lr, const T* lr_scale, T momentum, T weight_decay,
                           const int32_t* skip) {
  if (skip != nullptr && *skip != 0) return;
  if (lr_scale != nullptr) lr *= *lr_scale;
  const int64_t total = b.start[b.count];
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  int s = 0;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += stride) {
    while (idx >= b.start[s + 1]) ++s;  // idx only grows, so s only moves forward
    const SgdTensor<T>& t = b.t[s];
    const int64_t k = idx - b.start[s];
    const T p = t.p[k];
    T d = t.g[k] + weight_decay * p;
    if (t.buf != nullptr) t.buf[k] = d = momentum * t.buf[k] + d;
    t.p[k] = p - lr * d;
  }
}

template <typename T>
void run_sgd(const SgdTensor<T>* tensors, int count, T lr, const T* lr_scale, T momentum, T weight_decay,
             const int32_t* skip, int num_sms, cudaStream_t stream) {
  for (int first = 0; first < count; first += kMaxSgdTensors) {
    SgdBatch<T> b{};
    b.count = std::min(kMaxSgdTensors, count - first);
    for (int s = 0; s < b.count; ++s) {
      b.t[s] = tensors[first + s];
      b.start[s + 1] = b.start[s] + b.t[s].n;
    }
    const int64_t total = b.start[b.count];
    if (total == 0) continue;
    constexpr int threads = 256;
    const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(div_up(total, threads), 8LL * num_sms));
    sgd_kernel<T><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(b, lr, lr_scale, momentum, weight_decay, skip);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace

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
