// The CUDA ops' implementations (linear_ops.cu, mlp_step.cu), called by csrc/cuda/ops_cuda.cpp after it
// has validated the arguments. Only ATen types here: ops_cuda.cpp is compiled by the host compiler.
//
// Rule: argument errors are raised on the host-compiler side only, never from a .cu file, and the
// few launch-size checks left in .cu files (shapes beyond a grid's limits) format no numbers: a
// failing TORCH_CHECK that formats shapes in an nvcc-compiled translation unit has crashed the
// process instead of raising (BENCHMARKS.md, the H200 run).
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <tuple>
#include <vector>

namespace fastmlp::cuda {

// relu: returns (relu(x @ w.T + b), mask); else (x @ w.T + b, undefined).
std::tuple<at::Tensor, at::Tensor> linear_fwd_impl(const at::Tensor& x, const at::Tensor& w,
                                                   const std::optional<at::Tensor>& b, bool relu);
// With a mask: the ReLU backward first. needs = [gx, gw, gb].
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_bwd_impl(const at::Tensor& gy, const at::Tensor& x,
                                                               const at::Tensor& w,
                                                               const std::optional<at::Tensor>& mask,
                                                               std::array<bool, 3> needs);
// Inference through the whole MLP: one kernel for a small batch (mlp_forward.cu), else the layer ops.
at::Tensor mlp_forward_impl(const at::Tensor& x, at::TensorList weights, at::TensorList biases, bool relu_last);
// lr_scale: undefined, or a validated one-element tensor of x's dtype on x's device.
at::Tensor mlp_sgd_step_impl(const at::Tensor& x, const at::Tensor& target, at::TensorList weights,
                             at::TensorList biases, at::TensorList wbufs, at::TensorList bbufs, double lr,
                             double momentum, double weight_decay, const at::Tensor& lr_scale);
// steps: on the device, or on the CPU with host_counts holding each count + 1 (the count this step
// uses; the caller writes them back). host_counts is empty for device steps.
at::Tensor mlp_adam_step_impl(const at::Tensor& x, const at::Tensor& target, at::TensorList weights,
                              at::TensorList biases, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                              at::TensorList steps, const std::vector<double>& host_counts, double lr, double beta1,
                              double beta2, double eps, double weight_decay, bool decoupled,
                              const at::Tensor& lr_scale);

}  // namespace fastmlp::cuda
