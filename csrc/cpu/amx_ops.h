// The layer GEMMs of bfloat16 on AMX (amx.h), ATen side: what low_precision.cpp runs as fastmlp's
// way when the active CPU kernels have an AMX GEMM. Same semantics as the float32 kernels
// on widened operands (bf16 operands, float32 sums, each output rounded once to bf16), with the
// epilogue applied to the float32 tiles, so no float32 copy of an output is ever written.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "amx.h"
#include "kernels.h"
#include "runner.h"

namespace fastmlp::cpu {

// y = x @ w.T + b, then ReLU (bits to mask, when given); x (M, K), w (N, K) bf16 contiguous.
inline at::Tensor amx_linear(const AmxKernels& k, const at::Tensor& x, const at::Tensor& w,
                             const std::optional<at::Tensor>& b, bool relu, uint8_t* mask) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  const at::Tensor b32 = b.has_value() ? b->to(at::kFloat).contiguous() : at::Tensor();
  GemmLow g = gemm_low(M, K, N, x.const_data_ptr(), K, 1, false, w.const_data_ptr(), 1, K, false);  // B = w.T
  g.c16 = static_cast<bf16_t*>(y.data_ptr()), g.ldc = N;
  g.bias = b32.defined() ? b32.const_data_ptr<float>() : nullptr;
  g.relu = relu;
  g.mask = mask, g.ldm = (N + 7) / 8;
  run_gemm_amx(k, g);
  return y;
}

// The two backward GEMMs of a bf16 layer from dz, the gradient at the pre-activation (M, N)
// contiguous (gy through the mask: low_precision.cpp), bf16 or float32 (rounded to bf16 while packed,
// exact since dz is then gy or 0). x (M, K) and w (N, K) bf16 contiguous.
// gx = dz @ w
inline at::Tensor amx_grad_input(const AmxKernels& k, const at::Tensor& dz, const at::Tensor& w) {
  const int64_t M = dz.size(0), N = w.size(0), K = w.size(1);
  at::Tensor gx = at::empty({M, K}, w.options());
  GemmLow g = gemm_low(M, N, K, dz.const_data_ptr(), N, 1, dz.scalar_type() == at::kFloat, w.const_data_ptr(), K, 1,
                       false);
  g.c16 = static_cast<bf16_t*>(gx.data_ptr()), g.ldc = K;
  run_gemm_amx(k, g);
  return gx;
}

// gw = dz.T @ x (zeros for an empty batch)
inline at::Tensor amx_grad_weight(const AmxKernels& k, const at::Tensor& dz, const at::Tensor& x) {
  const int64_t M = x.size(0), K = x.size(1), N = dz.size(1);
  at::Tensor gw = at::empty({N, K}, x.options());
  GemmLow g = gemm_low(N, M, K, dz.const_data_ptr(), 1, N, dz.scalar_type() == at::kFloat, x.const_data_ptr(), K, 1,
                       false);
  g.c16 = static_cast<bf16_t*>(gw.data_ptr()), g.ldc = K;
  run_gemm_amx(k, g);
  return gw;
}

}  // namespace fastmlp::cpu
