// CPU implementations of the fastmlp ops: argument checks, output allocation and the split of each
// GEMM over ATen's intra-op threads. The arithmetic itself is in gemm_impl.h.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>

#include "checks.h"
#include "gemm_choice.h"
#include "kernels.h"
#include "layer_ops.h"
#include "runner.h"

namespace fastmlp::cpu {

namespace {

using at::Tensor;

Tensor unused(const Tensor& like) { return at::empty({0}, like.options()); }

template <typename T>
std::tuple<Tensor, Tensor> forward(const Tensor& x_, const Tensor& w_, const std::optional<Tensor>& b_,
                                   bool relu) {
  const Tensor x = x_.contiguous(), w = w_.contiguous();
  const Tensor b = b_.has_value() ? b_->contiguous() : Tensor();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  Tensor y = at::empty({M, N}, x.options());
  Tensor mask = relu ? at::empty({M, div_up(N, 8)}, x.options().dtype(at::kByte)) : Tensor();
  if (M == 0 || N == 0) return {y, mask};
  run_layer_gemm(table<T>(),
                 layer_forward<T>(M, K, N, x.const_data_ptr<T>(), w.const_data_ptr<T>(),
                                  b.defined() ? b.const_data_ptr<T>() : nullptr, y.mutable_data_ptr<T>(), relu,
                                  relu ? mask.mutable_data_ptr<uint8_t>() : nullptr),
                 GemmKind::kForward);
  return {y, mask};
}

template <typename T>
std::tuple<Tensor, Tensor, Tensor> backward(const Tensor& gy_, const Tensor& x_, const Tensor& w_,
                                            const Tensor* mask_, std::array<bool, 3> needs) {
  const Tensor gy = gy_.contiguous(), x = x_.contiguous(), w = w_.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  const auto& k = table<T>();
  Tensor gx = needs[0] ? at::empty({M, K}, x.options()) : unused(x);
  Tensor gw = needs[1] ? at::empty({N, K}, x.options()) : unused(x);
  Tensor gb = needs[2] ? at::empty({N}, x.options()) : unused(x);

  // dz: the gradient at the pre-activation. Without a ReLU it is gy itself.
  Tensor dz = gy;
  if (mask_ != nullptr && (needs[0] || needs[1])) dz = at::empty({M, N}, x.options());
  if (needs[2] || mask_ != nullptr) {
    const uint8_t* mask = mask_ ? mask_->const_data_ptr<uint8_t>() : nullptr;
    T* dz_out = (mask_ != nullptr && (needs[0] || needs[1])) ? dz.mutable_data_ptr<T>() : nullptr;
    if (dz_out || needs[2])
      run_drelu_bias_grad<T>(k, M, N, gy.const_data_ptr<T>(), mask, div_up(N, 8), dz_out,
                             needs[2] ? gb.mutable_data_ptr<T>() : nullptr);
  }
  if (needs[0] && M > 0 && K > 0)  // gx = dz @ w
    run_layer_gemm(k, layer_grad_input<T>(M, K, N, dz.const_data_ptr<T>(), w.const_data_ptr<T>(), gx.mutable_data_ptr<T>()),
                   GemmKind::kGradInput);
  if (needs[1] && N > 0 && K > 0)  // gw = dz.T @ x  (zeros for an empty batch)
    run_layer_gemm(k, layer_grad_weight<T>(M, K, N, dz.const_data_ptr<T>(), x.const_data_ptr<T>(), gw.mutable_data_ptr<T>()),
                   GemmKind::kGradWeight);
  return {gx, gw, gb};
}

bool low_precision(const Tensor& t) { return t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf; }

std::tuple<Tensor, Tensor> any_forward(const Tensor& x, const Tensor& w, const std::optional<Tensor>& b, bool relu) {
  return low_precision(x) ? low_precision_forward(x, w, b, relu) : float_forward(x, w, b, relu);
}

std::tuple<Tensor, Tensor, Tensor> any_backward(const Tensor& gy, const Tensor& x, const Tensor& w,
                                                const Tensor* mask, std::array<bool, 3> needs) {
  return low_precision(x) ? low_precision_backward(gy, x, w, mask, needs) : float_backward(gy, x, w, mask, needs);
}

std::tuple<Tensor, Tensor> linear_relu_fwd(const Tensor& x, const Tensor& w, const std::optional<Tensor>& b) {
  check_linear_args("fastmlp::linear_relu_fwd", x, w, b, kCpuDtypes);
  return any_forward(x, w, b, true);
}

Tensor linear_fwd(const Tensor& x, const Tensor& w, const std::optional<Tensor>& b) {
  check_linear_args("fastmlp::linear_fwd", x, w, b, kCpuDtypes);
  return std::get<0>(any_forward(x, w, b, false));
}

std::tuple<Tensor, Tensor, Tensor> linear_relu_bwd(const Tensor& gy, const Tensor& x, const Tensor& w,
                                                   const Tensor& mask, std::array<bool, 3> needs) {
  constexpr const char* op = "fastmlp::linear_relu_bwd";
  check_grad_args(op, gy, x, w, kCpuDtypes);
  check_mask(op, mask, x, w);
  const Tensor m = mask.contiguous();
  return any_backward(gy, x, w, &m, needs);
}

std::tuple<Tensor, Tensor, Tensor> linear_bwd(const Tensor& gy, const Tensor& x, const Tensor& w,
                                              std::array<bool, 3> needs) {
  check_grad_args("fastmlp::linear_bwd", gy, x, w, kCpuDtypes);
  return any_backward(gy, x, w, nullptr, needs);
}

}  // namespace

std::tuple<Tensor, Tensor> float_forward(const Tensor& x, const Tensor& w, const std::optional<Tensor>& b, bool relu) {
  return x.scalar_type() == at::kDouble ? forward<double>(x, w, b, relu) : forward<float>(x, w, b, relu);
}

std::tuple<Tensor, Tensor, Tensor> float_backward(const Tensor& gy, const Tensor& x, const Tensor& w,
                                                  const Tensor* mask, std::array<bool, 3> needs) {
  return x.scalar_type() == at::kDouble ? backward<double>(gy, x, w, mask, needs)
                                        : backward<float>(gy, x, w, mask, needs);
}

TORCH_LIBRARY_IMPL(fastmlp, CPU, m) {
  m.impl("linear_relu_fwd", &linear_relu_fwd);
  m.impl("linear_relu_bwd", &linear_relu_bwd);
  m.impl("linear_fwd", &linear_fwd);
  m.impl("linear_bwd", &linear_bwd);
}

}  // namespace fastmlp::cpu
