// Small device helpers shared by every fastmlp CUDA kernel: the accumulation type of each storage
// type, conversions to and from it, and ReLU with the same NaN rule as the CPU kernels.
//
// Storage types: float, double, __half, __nv_bfloat16 (the ATen glue hands at::Half / at::BFloat16
// data over as the CUDA types, which have the same layout). Accumulation is in float, or in double
// for double. No ATen in here: the kernel translation units stay quick to compile.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace fastmlp::cuda {

inline int64_t div_up(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccOf<T>::type;

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

// Round-to-nearest-even down-cast of an accumulator to the storage type.
template <typename T>
__device__ __forceinline__ T from_acc(acc_t<T> v);
template <>
__device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <>
__device__ __forceinline__ double from_acc<double>(double v) { return v; }
template <>
__device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T>
__device__ __forceinline__ T zero() {
  return from_acc<T>(acc_t<T>(0));
}

__device__ __forceinline__ float fma_acc(float a, float b, float c) { return __fmaf_rn(a, b, c); }
__device__ __forceinline__ double fma_acc(double a, double b, double c) { return __fma_rn(a, b, c); }

}  // namespace fastmlp::cuda
