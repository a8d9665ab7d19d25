// The layer ops' bfloat16 path on AMX (amx.h): what linear_ops.cpp and mlp_forward.cpp run for
// bf16 tensors when the active CPU kernels have an AMX GEMM. Same semantics as the float32 kernels
// on widened operands (bf16 operands, float32 sums, each output rounded once to bf16), with the
// epilogue applied to the float32 tiles, so no float32 copy of an output is ever written.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <tuple>

#include "amx.h"
#include "kernels.h"
#include "runner.h"

namespace fastmlp::cpu {

inline const bf16_t* bf16_ptr(const at::Tensor& t) { return static_cast<const bf16_t*>(t.const_data_ptr()); }

// y = x @ w.T + b, then ReLU (bits to mask, when given); x (M, K), w (N, K) bf16 contiguous.
inline at::Tensor amx_linear(const AmxKernels& k, const at::Tensor& x, const at::Tensor& w,
                             const std::optional<at::Tensor>& b, bool relu, uint8_t* mask) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  const at::Tensor b32 = b.has_value() ? b->to(at::kFloat).contiguous() : at::Tensor();
  GemmLow g;
  g.rows = M, g.cols = N, g.inner = K;
  g.a = x.const_data_ptr(), g.a_rs = K, g.a_cs = 1;
  g.b = w.const_data_ptr(), g.b_rs = 1, g.b_cs = K;  // B = w.T
  g.c16 = static_cast<bf16_t*>(y.data_ptr()), g.ldc = N;
  g.bias = b32.defined() ? b32.const_data_ptr<float>() : nullptr;
  g.relu = relu;
  g.mask = mask, g.ldm = (N + 7) / 8;
  run_gemm_amx(k, g);
  return y;
}

// The backward of a bf16 layer: dz = gy where the mask is set (float32, exact), gb its column sums
// (float32, rounded once); gx = dz @ w and gw = dz.T @ x on the tiles, dz read as float32 and
// rounded to bf16 while packed (exact: it is gy or 0). needs = [gx, gw, gb].
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> amx_linear_backward(const AmxKernels& k, const at::Tensor& gy,
                                                                          const at::Tensor& x, const at::Tensor& w,
                                                                          const at::Tensor* mask,
                                                                          std::array<bool, 3> needs) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  const at::Tensor gy32 = gy.to(at::kFloat).contiguous();
  at::Tensor dz = gy32, gb32 = at::empty({N}, gy32.options());
  if (mask != nullptr) dz = at::empty({M, N}, gy32.options());
  if (mask != nullptr || needs[2])
    run_drelu_bias_grad<float>(table<float>(), M, N, gy32.const_data_ptr<float>(),
                               mask ? mask->const_data_ptr<uint8_t>() : nullptr, div_up(N, 8),
                               mask ? dz.mutable_data_ptr<float>() : nullptr,
                               needs[2] ? gb32.mutable_data_ptr<float>() : nullptr);
  at::Tensor gx = needs[0] ? at::empty({M, K}, x.options()) : at::empty({0}, x.options());
  at::Tensor gw = needs[1] ? at::empty({N, K}, x.options()) : at::empty({0}, x.options());
  if (needs[0]) {  // gx = dz @ w
    GemmLow g;
    g.rows = M, g.cols = K, g.inner = N;
    g.a = dz.const_data_ptr(), g.a_rs = N, g.a_cs = 1, g.a_f32 = true;
    g.b = w.const_data_ptr(), g.b_rs = K, g.b_cs = 1;
    g.c16 = static_cast<bf16_t*>(gx.data_ptr()), g.ldc = K;
    run_gemm_amx(k, g);
  }
  if (needs[1]) {  // gw = dz.T @ x (zeros for an empty batch)
    GemmLow g;
    g.rows = N, g.cols = K, g.inner = M;
    g.a = dz.const_data_ptr(), g.a_rs = 1, g.a_cs = N, g.a_f32 = true;
    g.b = x.const_data_ptr(), g.b_rs = K, g.b_cs = 1;
    g.c16 = static_cast<bf16_t*>(gw.data_ptr()), g.ldc = K;
    run_gemm_amx(k, g);
  }
  return {gx, gw, needs[2] ? gb32.to(x.scalar_type()) : at::empty({0}, x.options())};
}

}  // namespace fastmlp::cpu
