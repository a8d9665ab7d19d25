// Autograd for the layer ops and for their backward ops (double backward), in C++ so a fused layer
// costs no Python on the way forward or back (the Python registration in fastmlp/_ops.py serves the
// pure-PyTorch fallback). Works for every
// device: the ops are re-dispatched below autograd to whatever kernel serves the tensors.
#include <torch/autograd.h>
#include <torch/library.h>

namespace fastmlp {

namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using Needs = std::array<bool, 3>;

template <typename Sig>
c10::TypedOperatorHandle<Sig> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

using FwdReLU = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const std::optional<Tensor>&);
using BwdReLU = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&, Needs);
using Fwd = Tensor(const Tensor&, const Tensor&, const std::optional<Tensor>&);
using Bwd = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, Needs);

Needs needs(AutogradContext* ctx) {
  return {ctx->needs_input_grad(0), ctx->needs_input_grad(1),
          ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(2)};
}

variable_list grads_or_undefined(const std::tuple<Tensor, Tensor, Tensor>& g, Needs n) {
  return {n[0] ? std::get<0>(g) : Tensor(), n[1] ? std::get<1>(g) : Tensor(), n[2] ? std::get<2>(g) : Tensor()};
}

struct LinearReLU : public torch::autograd::Function<LinearReLU> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& w, const std::optional<Tensor>& b) {
    static auto fwd = op<FwdReLU>("fastmlp::linear_relu_fwd");
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, mask] = fwd.call(x, w, b);
    ctx->saved_data["has_bias"] = b.has_value();
    ctx->save_for_backward({x, w, mask});
    ctx->mark_non_differentiable({mask});
    return {y, mask};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto bwd = op<BwdReLU>("fastmlp::linear_relu_bwd");
    const auto saved = ctx->get_saved_variables();
    const Needs n = needs(ctx);
    return grads_or_undefined(bwd.call(grads[0], saved[0], saved[1], saved[2], n), n);
  }
};

struct Linear : public torch::autograd::Function<Linear> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& w, const std::optional<Tensor>& b) {
    static auto fwd = op<Fwd>("fastmlp::linear_fwd");
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->saved_data["has_bias"] = b.has_value();
    ctx->save_for_backward({x, w});
    return fwd.call(x, w, b);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto bwd = op<Bwd>("fastmlp::linear_bwd");
    const auto saved = ctx->get_saved_variables();
    const Needs n = needs(ctx);
    return grads_or_undefined(bwd.call(grads[0], saved[0], saved[1], n), n);
  }
};

// Double backward. With the ReLU mask held fixed, a layer's backward (dz = gy where the mask is
// set; gx = dz @ w, gw = dz.T @ x, gb = dz.sum(0)) is bilinear in (gy, x, w), so its derivatives
// are again GEMMs of the layer ops: given the gradients ggx, ggw, ggb of its outputs,
//   d gy = mask * (ggx @ w.T + x @ ggw.T + ggb)     (linear_fwd(ggx, w) + linear_fwd(x, ggw, ggb))
//   d x  = dz @ ggw                                   (linear_fwd(dz, ggw.T))
//   d w  = dz.T @ ggx                                 (linear_fwd(dz.T, ggx.T))
// The mask is a constant (it is flat almost everywhere, and PyTorch's ReLU does the same). The
// layer ops used are differentiable themselves, so higher orders compose.
Tensor apply_mask(const Tensor& g, const Tensor& mask, int64_t n) {
  const Tensor shifts = at::arange(8, mask.options());
  Tensor on = mask.unsqueeze(-1).bitwise_right_shift(shifts).bitwise_and(1).to(at::kBool);
  on = on.reshape({mask.size(0), mask.size(1) * 8}).narrow(1, 0, n);
  return at::where(on, g, at::zeros({}, g.options()));
}

template <bool kReLU>
variable_list backward_of_backward(AutogradContext* ctx, const variable_list& gg) {
  static auto linear = op<Fwd>("fastmlp::linear_fwd");
  const auto saved = ctx->get_saved_variables();
  const Tensor &gy = saved[0], &x = saved[1], &w = saved[2];
  const int64_t n = w.size(0);
  const auto computed = ctx->saved_data["needs"].toBoolList();  // which of gx, gw, gb the backward made
  auto given = [&](size_t i) { return computed.get(i) && gg[i].defined(); };
  const Tensor dz = kReLU ? apply_mask(gy, saved[3], n) : gy;
  Tensor d_gy, d_x, d_w;
  if (ctx->needs_input_grad(0)) {
    Tensor s = at::zeros_like(gy);
    if (given(0)) s = s.add(linear.call(gg[0], w, std::nullopt));
    if (given(1)) s = s.add(linear.call(x, gg[1], std::nullopt));
    if (given(2)) s = s.add(gg[2]);
    d_gy = kReLU ? apply_mask(s, saved[3], n) : s;
  }
  if (ctx->needs_input_grad(1) && given(1)) d_x = linear.call(dz, gg[1].t(), std::nullopt);
  if (ctx->needs_input_grad(2) && given(0)) d_w = linear.call(dz.t(), gg[0].t(), std::nullopt);
  variable_list out{d_gy, d_x, d_w};
  if (kReLU) out.emplace_back();  // mask
  out.emplace_back();             // needs
  return out;
}

struct LinearReLUBackward : public torch::autograd::Function<LinearReLUBackward> {
  static variable_list forward(AutogradContext* ctx, const Tensor& gy, const Tensor& x, const Tensor& w,
                               const Tensor& mask, Needs n) {
    static auto bwd = op<BwdReLU>("fastmlp::linear_relu_bwd");
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({gy, x, w, mask});
    ctx->saved_data["needs"] = c10::List<bool>({n[0], n[1], n[2]});
    auto [gx, gw, gb] = bwd.call(gy, x, w, mask, n);
    return {gx, gw, gb};
  }
  static variable_list backward(AutogradContext* ctx, variable_list gg) { return backward_of_backward<true>(ctx, gg); }
};

struct LinearBackward : public torch::autograd::Function<LinearBackward> {
  static variable_list forward(AutogradContext* ctx, const Tensor& gy, const Tensor& x, const Tensor& w, Needs n) {
    static auto bwd = op<Bwd>("fastmlp::linear_bwd");
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({gy, x, w});
    ctx->saved_data["needs"] = c10::List<bool>({n[0], n[1], n[2]});
    auto [gx, gw, gb] = bwd.call(gy, x, w, n);
    return {gx, gw, gb};
  }
  static variable_list backward(AutogradContext* ctx, variable_list gg) { return backward_of_backward<false>(ctx, gg); }
};

std::tuple<Tensor, Tensor, Tensor> linear_relu_bwd_autograd(const Tensor& gy, const Tensor& x, const Tensor& w,
                                                            const Tensor& mask, Needs n) {
  auto g = LinearReLUBackward::apply(gy, x, w, mask, n);
  return {g[0], g[1], g[2]};
}

std::tuple<Tensor, Tensor, Tensor> linear_bwd_autograd(const Tensor& gy, const Tensor& x, const Tensor& w, Needs n) {
  auto g = LinearBackward::apply(gy, x, w, n);
  return {g[0], g[1], g[2]};
}

std::tuple<Tensor, Tensor> linear_relu_fwd_autograd(const Tensor& x, const Tensor& w, const std::optional<Tensor>& b) {
  auto out = LinearReLU::apply(x, w, b);
  return {out[0], out[1]};
}

Tensor linear_fwd_autograd(const Tensor& x, const Tensor& w, const std::optional<Tensor>& b) {
  return Linear::apply(x, w, b);
}

// mlp_forward is inference only: with grad mode on and any input requiring grad it refuses, rather
// than return a result autograd cannot differentiate.
Tensor mlp_forward_autograd(const Tensor& x, at::TensorList weights, at::TensorList biases, bool relu_last) {
  static auto fwd = op<Tensor(const Tensor&, at::TensorList, at::TensorList, bool)>("fastmlp::mlp_forward");
  if (at::GradMode::is_enabled()) {
    bool wants_grad = x.requires_grad();
    for (const Tensor& t : weights) wants_grad = wants_grad || t.requires_grad();
    for (const Tensor& t : biases) wants_grad = wants_grad || t.requires_grad();
    TORCH_CHECK(!wants_grad, "fastmlp::mlp_forward is inference only (no backward), but an input requires "
                "grad; call it under torch.no_grad() / torch.inference_mode(), or use the layer ops "
                "(FusedMLP does this choice itself)");
  }
  at::AutoDispatchBelowADInplaceOrView guard;
  return fwd.call(x, weights, biases, relu_last);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmlp, Autograd, m) {
  m.impl("mlp_forward", &mlp_forward_autograd);
  m.impl("linear_relu_fwd", &linear_relu_fwd_autograd);
  m.impl("linear_fwd", &linear_fwd_autograd);
  m.impl("linear_relu_bwd", &linear_relu_bwd_autograd);
  m.impl("linear_bwd", &linear_bwd_autograd);
  // The step ops are optimizer steps: their loss is a number to report, not a function to
  // differentiate, and they update their tensors in place as torch.optim does under no_grad. Falling
  // through autograd, a call in grad mode returns a loss without a graph (backward says so) instead
  // of one whose backward only warns that it is not implemented.
  for (const char* name : {"mlp_sgd_step", "mlp_adam_step", "mlp_sgd_steps", "mlp_adam_steps"})
    m.impl(name, torch::CppFunction::makeFallthrough());
}

}  // namespace fastmlp
