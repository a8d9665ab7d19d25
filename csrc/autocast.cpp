// Autocast for the layer ops and mlp_forward: under torch.autocast(device, dtype) their floating
// inputs are cast to the autocast dtype exactly where nn.Linear's would be (at::autocast's own
// cached_cast: float32 tensors of that device only, weights cast once per autocast region), then the
// op runs below autocast in that dtype. So fastmlp layers follow autocast as nn.Linear does
// (low-precision outputs; the parameters' gradients come back through the casts in float32) and mix
// with nn.Linear layers. The backward ops need no rule: autograd calls them with the dtypes the
// forward saw.
#include <ATen/autocast_mode.h>
#include <torch/library.h>

#include <vector>

namespace fastmlp {

namespace {

using at::Tensor;

template <typename Sig>
c10::TypedOperatorHandle<Sig> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

template <c10::DeviceType D>
struct Autocast {
  static constexpr c10::DispatchKey kKey = D == c10::DeviceType::CUDA ? c10::DispatchKey::AutocastCUDA
                                                                      : c10::DispatchKey::AutocastCPU;

  static std::tuple<Tensor, Tensor> linear_relu_fwd(const Tensor& x, const Tensor& w, const std::optional<Tensor>& b) {
    static auto f = op<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const std::optional<Tensor>&)>(
        "fastmlp::linear_relu_fwd");
    c10::impl::ExcludeDispatchKeyGuard no_autocast(kKey);
    const auto t = at::autocast::get_autocast_dtype(D);
    return f.call(at::autocast::cached_cast(t, x, D), at::autocast::cached_cast(t, w, D),
                  at::autocast::cached_cast(t, b, D));
  }

  static Tensor linear_fwd(const Tensor& x, const Tensor& w, const std::optional<Tensor>& b) {
    static auto f = op<Tensor(const Tensor&, const Tensor&, const std::optional<Tensor>&)>("fastmlp::linear_fwd");
    c10::impl::ExcludeDispatchKeyGuard no_autocast(kKey);
    const auto t = at::autocast::get_autocast_dtype(D);
    return f.call(at::autocast::cached_cast(t, x, D), at::autocast::cached_cast(t, w, D),
                  at::autocast::cached_cast(t, b, D));
  }

  static Tensor mlp_forward(const Tensor& x, at::TensorList weights, at::TensorList biases, bool relu_last) {
    static auto f = op<Tensor(const Tensor&, at::TensorList, at::TensorList, bool)>("fastmlp::mlp_forward");
    c10::impl::ExcludeDispatchKeyGuard no_autocast(kKey);
    const auto t = at::autocast::get_autocast_dtype(D);
    const std::vector<Tensor> ws = at::autocast::cached_cast(t, weights, D), bs = at::autocast::cached_cast(t, biases, D);
    return f.call(at::autocast::cached_cast(t, x, D), ws, bs, relu_last);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(fastmlp, AutocastCPU, m) {
  using A = Autocast<c10::DeviceType::CPU>;
  m.impl("linear_relu_fwd", &A::linear_relu_fwd);
  m.impl("linear_fwd", &A::linear_fwd);
  m.impl("mlp_forward", &A::mlp_forward);
}

TORCH_LIBRARY_IMPL(fastmlp, AutocastCUDA, m) {
  using A = Autocast<c10::DeviceType::CUDA>;
  m.impl("linear_relu_fwd", &A::linear_relu_fwd);
  m.impl("linear_fwd", &A::linear_fwd);
  m.impl("mlp_forward", &A::mlp_forward);
}

}  // namespace fastmlp
