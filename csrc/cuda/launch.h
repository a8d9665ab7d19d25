// ATen-facing launch helpers shared by the CUDA ops (linear_ops.cu, mlp_step.cu): where and how to
// launch on the current device, and the GEMM dispatch by dtype and precision mode.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdlib>
#include <mutex>
#include <type_traits>

#include "../cpu/gemm_choice.h"
#include "common.cuh"
#include "kernels.h"

namespace fastmlp::cuda {

template <typename T>
const T* cptr(const at::Tensor& t) {
  return static_cast<const T*>(t.const_data_ptr());
}
template <typename T>
T* mptr(at::Tensor& t) {
  return static_cast<T*>(t.mutable_data_ptr());
}

// Where and how to launch, on the current device (set by the caller's CUDAGuard).
struct Launch {
  cudaStream_t stream;
  int num_sms;
  bool tensor_cores;  // sm_80+: WMMA for fp16 / bf16 / tf32
  bool tf32;          // float32 GEMMs on TF32 tensor cores
};

// SM count and compute capability of the current device. Queried with cudaDeviceGetAttribute
// rather than at::cuda::getCurrentDeviceProperties(), whose header (ATen/cuda/CUDAContext.h) needs
// the cuBLAS/cuSPARSE headers, which a bare CUDA toolkit may lack.
struct DeviceInfo {
  int num_sms, major, minor;
};

inline DeviceInfo device_info() {
  constexpr int kMaxDevices = 64;
  static DeviceInfo cache[kMaxDevices];
  static std::once_flag once[kMaxDevices];
  const int dev = c10::cuda::current_device();
  auto query = [](int d) {
    DeviceInfo info{};
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&info.num_sms, cudaDevAttrMultiProcessorCount, d));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&info.major, cudaDevAttrComputeCapabilityMajor, d));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&info.minor, cudaDevAttrComputeCapabilityMinor, d));
    return info;
  };
  if (dev < 0 || dev >= kMaxDevices) return query(dev);
  std::call_once(once[dev], [&] { cache[dev] = query(dev); });
  return cache[dev];
}

inline Launch launch_config(at::ScalarType dtype) {
  const DeviceInfo dev = device_info();
  Launch l;
  l.stream = c10::cuda::getCurrentCUDAStream().stream();  // == at::cuda::getCurrentCUDAStream()
  l.num_sms = dev.num_sms;
  l.tensor_cores = dev.major >= 8;
  l.tf32 = l.tensor_cores && dtype == at::kFloat && at::globalContext().allowTF32CuBLAS();
  return l;  // float16 / bfloat16 on a GPU without tensor cores were refused by ops_cuda.cpp
}

// Split-K for FP32 GEMMs whose output has too few tiles for the GPU (gemm_simt.cu). Experimental
// (README, CUDA), so off unless FASTMLP_CUDA_SPLITK=1 is set when the first GEMM runs.
inline bool split_k_enabled() {
  static const bool on = [] {
    const char* v = std::getenv("FASTMLP_CUDA_SPLITK");
    return v != nullptr && v[0] == '1' && v[1] == '\0';
  }();
  return on;
}

// The vendor-GEMM safety net on CUDA (the CPU's: csrc/cpu/gemm_choice.h, same FASTMLP_GEMM mode):
// whether a layer GEMM (C rows x cols, summed over inner) goes to cuBLAS through ATen (at::mm_out /
// addmm_out, then fastmlp's ReLU + mask kernel) instead of the hand-written kernels. "auto" is a
// rule from the one H200 run on record (BENCHMARKS.md, 2026-11-28): at 64x784->256 the hand-written
// forward + backward was 1.20-1.26x cuBLAS's, at 8192x784->256 and beyond 0.10-0.48x; the switch
// sits at 2^28 flop (e.g. 784 -> 256 from batch 669) until a GPU run measures the crossover. No
// timing on the GPU: that would need a host synchronisation, which a CUDA graph capture forbids.
inline constexpr int64_t kCudaVendorFlops = int64_t(1) << 28;
inline bool vendor_gemm(int64_t rows, int64_t cols, int64_t inner) {
  switch (cpu::gemm_mode()) {
    case cpu::GemmMode::kFastmlp: return false;
    case cpu::GemmMode::kVendor: return true;
    default: return 2 * rows * cols * inner >= kCudaVendorFlops;
  }
}

template <typename T>
inline void gemm(const GemmArgs<T>& g, const Launch& l) {
  if constexpr (std::is_same_v<T, double>) {
    gemm_simt(g, l.num_sms, l.stream);
  } else if constexpr (std::is_same_v<T, float>) {
    if (l.tf32) {
      gemm_tensor_core(g, l.num_sms, l.stream);
    } else if (const int64_t ws = split_k_enabled() ? gemm_simt_workspace(g, l.num_sms) : 0; ws > 0) {
      // Freed when this returns: the caching allocator reuses it only for later work on this stream.
      const at::Tensor scratch =
          at::empty({ws}, at::TensorOptions().dtype(at::kFloat).device(at::kCUDA, c10::cuda::current_device()));
      GemmArgs<T> split = g;
      split.workspace = scratch.data_ptr();
      gemm_simt(split, l.num_sms, l.stream);
    } else {
      gemm_simt(g, l.num_sms, l.stream);
    }
  } else {
    gemm_tensor_core(g, l.num_sms, l.stream);
  }
}

}  // namespace fastmlp::cuda
