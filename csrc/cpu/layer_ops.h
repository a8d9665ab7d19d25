// The CPU layer ops' implementations, shared by the op entry points (linear_ops.cpp), the
// low-precision paths (low_precision.cpp) and mlp_forward. Arguments are checked by the callers.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <tuple>

#include "checks.h"

namespace fastmlp::cpu {

// The dtypes the CPU layer ops and mlp_forward accept.
inline constexpr DtypeRule kCpuDtypes{[](at::ScalarType t) {
                                        return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 ||
                                               t == at::kHalf;
                                      },
                                      "float32, float64, bfloat16 or float16 on the CPU"};

// float32 / float64 on the hand-written kernels (or the vendor GEMM where gemm_choice.h picks it).
// forward: (relu(x @ w.T + b) or x @ w.T + b, the ReLU mask or undefined); x (M, K), w (N, K).
std::tuple<at::Tensor, at::Tensor> float_forward(const at::Tensor& x, const at::Tensor& w,
                                                 const std::optional<at::Tensor>& b, bool relu);
// backward: (gx, gw, gb) of needs = [gx, gw, gb]; with a mask, through the ReLU first.
std::tuple<at::Tensor, at::Tensor, at::Tensor> float_backward(const at::Tensor& gy, const at::Tensor& x,
                                                              const at::Tensor& w, const at::Tensor* mask,
                                                              std::array<bool, 3> needs);

// bfloat16 / float16 (low_precision.cpp): PyTorch's low-precision linear on the CPU, i.e.
// low-precision operands, float32 sums, each output rounded once. With want_mask false no mask is
// made (inference).
std::tuple<at::Tensor, at::Tensor> low_precision_forward(const at::Tensor& x, const at::Tensor& w,
                                                         const std::optional<at::Tensor>& b, bool relu,
                                                         bool want_mask = true);
std::tuple<at::Tensor, at::Tensor, at::Tensor> low_precision_backward(const at::Tensor& gy, const at::Tensor& x,
                                                                      const at::Tensor& w, const at::Tensor* mask,
                                                                      std::array<bool, 3> needs);

}  // namespace fastmlp::cpu
