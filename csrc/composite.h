// Ops composed of other fastmlp ops (composite.cpp), for devices or shapes without a kernel of their own.
#pragma once

#include <ATen/ATen.h>

namespace fastmlp {

// mlp_forward as the layer ops one after another (their masks dropped); each op checks its arguments.
at::Tensor mlp_forward_layers(const at::Tensor& x, at::TensorList weights, at::TensorList biases, bool relu_last);

}  // namespace fastmlp
