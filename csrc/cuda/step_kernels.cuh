// The multi-tensor optimizer-update kernels of the whole training step (SGD and Adam; interfaces and
// formulas: kernels.h), in a header so that tests/cuda_emulation can run them, unmodified, on the
// CPU. The launchers are in step_kernels.cu.
//
// Each launch updates up to kMax*Tensors tensors, passed by value as a kernel argument (which must
// stay under 4 KiB); a grid-stride loop runs over their concatenated elements, so every element is
// written by exactly one thread whatever the grid.
#pragma once

#include <cmath>

#include "common.cuh"
#include "kernels.h"

namespace fastmlp::cuda {

// One launch's batch: tensors[0 .. count) (count <= the batch's capacity) with their element offsets.
template <class Batch, class Tensor>
Batch make_batch(const Tensor* tensors, int count) {
  Batch b{};
  b.count = count;
  for (int s = 0; s < count; ++s) {
    b.t[s] = tensors[s];
    b.start[s + 1] = b.start[s] + b.t[s].n;
  }
  return b;
}

// ---- SGD ----------------------------------------------------------------------------------------

inline constexpr int kMaxSgdTensors = 48;

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

// ---- Adam ---------------------------------------------------------------------------------------

inline constexpr int kMaxAdamTensors = 32;

template <typename T>
struct AdamBatch {
  AdamTensor<T> t[kMaxAdamTensors];
  int64_t start[kMaxAdamTensors + 1];
  int count;
};
static_assert(sizeof(AdamBatch<double>) < 4000, "kernel arguments are limited to 4 KiB");

// This step's count of a tensor: from the device, already advanced, or as given by the host.
template <typename T>
__device__ __forceinline__ double read_count(const AdamTensor<T>& t) {
  if (t.step.p == nullptr) return t.t;
  return t.step.is_double ? *static_cast<const double*>(t.step.p) : double(*static_cast<const float*>(t.step.p));
}

__device__ __forceinline__ float sqrt_(float v) { return sqrtf(v); }
__device__ __forceinline__ double sqrt_(double v) { return sqrt(v); }

template <typename T>
__global__ void adam_kernel(const AdamBatch<T> b, AdamHyper<T> h, const T* lr_scale, const int32_t* skip) {
  if (skip != nullptr && *skip != 0) return;
  if (lr_scale != nullptr) h.lr *= *lr_scale;
  const int64_t total = b.start[b.count];
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  int s = -1;
  T step_size = 0, bc2_sqrt = 1;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += stride) {
    int next = s < 0 ? 0 : s;
    while (idx >= b.start[next + 1]) ++next;  // idx only grows, so the tensor index only moves forward
    const AdamTensor<T>& t = b.t[next];
    if (next != s) {  // bias corrections in double, as torch.optim.Adam computes them on the host
      s = next;
      const double count = read_count(t);
      step_size = T(double(h.lr) / (1.0 - pow(h.beta1, count)));
      bc2_sqrt = T(sqrt(1.0 - pow(h.beta2, count)));
    }
    const int64_t k = idx - b.start[s];
    T p = t.p[k], g = t.g[k];
    if (h.weight_decay != T(0)) {
      if (h.decoupled) p *= T(1.0 - double(h.lr) * double(h.weight_decay));
      else g += h.weight_decay * p;
    }
    T m = t.m[k], v = t.v[k];
    m += h.one_minus_beta1 * (g - m);  // torch's lerp for a weight below 0.5
    v = v * h.beta2_t + h.one_minus_beta2 * g * g;
    t.m[k] = m;
    t.v[k] = v;
    t.p[k] = p - step_size * (m / (sqrt_(v) / bc2_sqrt + h.eps));
  }
}

}  // namespace fastmlp::cuda
