// Ops composed of other fastmlp ops (composite.h), registered for devices without a kernel of their
// own: the CPU has one (csrc/cpu/mlp_forward.cpp), CUDA one for small batches (csrc/cuda/mlp_forward.cu)
// that calls mlp_forward_layers for the rest.
#include "composite.h"

#include <torch/library.h>

#include <vector>

namespace fastmlp {

using at::Tensor;

Tensor mlp_forward_layers(const Tensor& x, at::TensorList weights, at::TensorList biases, bool relu_last) {
  static auto relu_op = c10::Dispatcher::singleton().findSchemaOrThrow("fastmlp::linear_relu_fwd", "")
      .typed<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const std::optional<Tensor>&)>();
  static auto linear_op = c10::Dispatcher::singleton().findSchemaOrThrow("fastmlp::linear_fwd", "")
      .typed<Tensor(const Tensor&, const Tensor&, const std::optional<Tensor>&)>();
  TORCH_CHECK(x.dim() >= 1 && !weights.empty(), "fastmlp::mlp_forward: x must have at least 1 dimension and "
              "weights must not be empty");
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end() - 1);
  int64_t M = 1;
  for (int64_t d : out_shape) M *= d;
  out_shape.push_back(weights.back().size(0));
  Tensor h = x.reshape({M, x.size(-1)});
  for (size_t l = 0; l < weights.size(); ++l) {
    const std::optional<Tensor> b = biases.empty() ? std::nullopt : std::optional<Tensor>(biases[l]);
    h = l + 1 < weights.size() || relu_last ? std::get<0>(relu_op.call(h, weights[l], b))
                                            : linear_op.call(h, weights[l], b);
  }
  return h.reshape(out_shape);
}

TORCH_LIBRARY_IMPL(fastmlp, CompositeExplicitAutograd, m) { m.impl("mlp_forward", &mlp_forward_layers); }

}  // namespace fastmlp
