// The CUDA ops as the dispatcher sees them: argument validation (compiled by the host compiler, see
// ops_impl.h for why), then the implementation in the .cu files; and register_cuda_kernels(), which
// installs them for the CUDA dispatch key.
//
// The kernels are NOT registered at load time: register_cuda_kernels() (exposed to Python as
// fastmlp._C.register_cuda_kernels) is called by fastmlp/_ops.py unless FASTMLP_CUDA_KERNELS=0.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <memory>
#include <mutex>
#include <vector>

#include "checks.h"
#include "ops_impl.h"

namespace fastmlp::cuda {

namespace {

using at::Tensor;

// float16 and bfloat16 run on tensor cores (check_tensor_cores).
constexpr DtypeRule kDtypes{[](at::ScalarType t) {
                              return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
                            },
                            "float32, float64, float16 or bfloat16 on CUDA"};

// The shared checks (csrc/checks.h), after making sure x is a CUDA tensor: the others are then
// checked to be on x's device.
void check_cuda(const char* op, const Tensor& x) {
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor here, got one on ", x.device());
}

// The whole-step ops' bf16 arithmetic is the CPU's; on the GPU, bfloat16 training runs the layers
// under torch.autocast (FusedMLP.train_step(precision="bf16") does so).
void check_no_bf16(const char* op, bool bf16) {
  TORCH_CHECK(!bf16, op, ": bf16=True is implemented for CPU tensors only; on CUDA train under "
              "torch.autocast(\"cuda\", torch.bfloat16) (FusedMLP.train_step(..., precision=\"bf16\"))");
}

// float16 / bfloat16 run on tensor cores (sm_80+).
void check_tensor_cores(const char* op, const Tensor& x) {
  if (x.scalar_type() != at::kHalf && x.scalar_type() != at::kBFloat16) return;
  int major = 0, minor = 0;
  const int dev = x.device().index();
  TORCH_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess &&
                  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) == cudaSuccess,
              op, ": could not query the compute capability of ", x.device());
  TORCH_CHECK(major >= 8, op, ": ", x.scalar_type(), " runs on tensor cores and needs a GPU of compute ",
              "capability 8.0 or newer; ", x.device(), " is ", major, ".", minor);
}

std::tuple<Tensor, Tensor> linear_relu_fwd(const Tensor& x, const Tensor& w, const std::optional<Tensor>& b) {
  constexpr const char* op = "fastmlp::linear_relu_fwd";
  check_cuda(op, x);
  check_linear_args(op, x, w, b, kDtypes);
  check_tensor_cores(op, x);
  return linear_fwd_impl(x, w, b, true);
}

Tensor linear_fwd(const Tensor& x, const Tensor& w, const std::optional<Tensor>& b) {
  constexpr const char* op = "fastmlp::linear_fwd";
  check_cuda(op, x);
  check_linear_args(op, x, w, b, kDtypes);
  check_tensor_cores(op, x);
  return std::get<0>(linear_fwd_impl(x, w, b, false));
}

std::tuple<Tensor, Tensor, Tensor> linear_relu_bwd(const Tensor& gy, const Tensor& x, const Tensor& w,
                                                   const Tensor& mask, std::array<bool, 3> needs) {
  constexpr const char* op = "fastmlp::linear_relu_bwd";
  check_cuda(op, x);
  check_grad_args(op, gy, x, w, kDtypes);
  check_mask(op, mask, x, w);
  check_tensor_cores(op, x);
  return linear_bwd_impl(gy, x, w, mask, needs);
}

std::tuple<Tensor, Tensor, Tensor> linear_bwd(const Tensor& gy, const Tensor& x, const Tensor& w,
                                              std::array<bool, 3> needs) {
  constexpr const char* op = "fastmlp::linear_bwd";
  check_cuda(op, x);
  check_grad_args(op, gy, x, w, kDtypes);
  check_tensor_cores(op, x);
  return linear_bwd_impl(gy, x, w, std::nullopt, needs);
}

Tensor mlp_forward(const Tensor& x, at::TensorList weights, at::TensorList biases, bool relu_last) {
  constexpr const char* op = "fastmlp::mlp_forward";
  check_cuda(op, x);
  check_mlp_forward_args(op, x, weights, biases, kDtypes);
  check_tensor_cores(op, x);
  return mlp_forward_impl(x, weights, biases, relu_last);
}

Tensor mlp_sgd_step(const Tensor& x, const Tensor& target, at::TensorList weights, at::TensorList biases,
                    at::TensorList wbufs, at::TensorList bbufs, double lr, double momentum, double weight_decay,
                    const std::optional<Tensor>& lr_scale, bool bf16) {
  constexpr const char* op = "fastmlp::mlp_sgd_step";
  check_cuda(op, x);
  check_no_bf16(op, bf16);
  check_step_args(op, x, target, weights, biases, wbufs, bbufs, momentum, lr_scale);
  return mlp_sgd_step_impl(x, target, weights, biases, wbufs, bbufs, lr, momentum, weight_decay,
                           lr_scale.has_value() ? lr_scale->contiguous() : Tensor());
}

Tensor mlp_adam_step(const Tensor& x, const Tensor& target, at::TensorList weights, at::TensorList biases,
                     at::TensorList exp_avgs, at::TensorList exp_avg_sqs, at::TensorList steps, double lr,
                     double beta1, double beta2, double eps, double weight_decay, bool decoupled_weight_decay,
                     const std::optional<Tensor>& lr_scale, bool bf16) {
  constexpr const char* op = "fastmlp::mlp_adam_step";
  check_cuda(op, x);
  check_no_bf16(op, bf16);
  check_adam_args(op, x, target, weights, biases, exp_avgs, exp_avg_sqs, steps, beta1, beta2, eps, lr_scale);
  // Counts kept on the CPU (Adam without capturable) are read and written here, on the host.
  std::vector<double> host_counts;
  if (steps[0].is_cpu())
    for (const Tensor& s : steps) host_counts.push_back(s.item<double>() + 1);
  Tensor loss = mlp_adam_step_impl(x, target, weights, biases, exp_avgs, exp_avg_sqs, steps, host_counts, lr, beta1,
                                   beta2, eps, weight_decay, decoupled_weight_decay,
                                   lr_scale.has_value() ? lr_scale->contiguous() : Tensor());
  const at::NoGradGuard no_grad;  // as csrc/cpu/mlp_step.cpp writes the counts
  for (size_t i = 0; i < host_counts.size(); ++i) steps[i].fill_(host_counts[i]);
  return loss;
}

// The *_steps ops: the step above on each batch in turn (a GPU step is launch-bound, not call-bound,
// and the trainer captures it in a CUDA graph instead). The checks come first, so that no bad
// argument or label is found after some steps have run.
// Every label a class index, checked on the device before the first step (one synchronisation).
void check_targets(const char* op, const Tensor& target, int64_t classes) {
  TORCH_CHECK(((target >= 0) & (target < classes)).all().item<bool>(), op,
              ": every target must be a class index in [0, ", classes, ")");
}

// step(x rows, target rows, lr) on each of the `count` consecutive batches of batch_size rows, the
// last one shorter; the losses stacked.
template <typename Step>
Tensor steps_over_batches(const Tensor& x, const Tensor& target, int64_t batch_size, int64_t count,
                          at::ArrayRef<double> lrs, const Step& step) {
  std::vector<Tensor> losses;
  for (int64_t s = 0; s < count; ++s) {
    const int64_t lo = s * batch_size, n = std::min(batch_size, x.size(0) - lo);
    losses.push_back(step(x.narrow(0, lo, n), target.narrow(0, lo, n), lrs[s]));
  }
  return at::stack(losses);
}

Tensor mlp_sgd_steps(const Tensor& x, const Tensor& target, int64_t batch_size, at::TensorList weights,
                     at::TensorList biases, at::TensorList wbufs, at::TensorList bbufs, at::ArrayRef<double> lrs,
                     double momentum, double weight_decay, bool bf16) {
  constexpr const char* op = "fastmlp::mlp_sgd_steps";
  check_cuda(op, x);
  check_no_bf16(op, bf16);
  check_step_args(op, x, target, weights, biases, wbufs, bbufs, momentum, std::nullopt);
  const int64_t count = check_batches(op, x, batch_size, lrs);
  check_targets(op, target, weights.back().size(0));
  return steps_over_batches(x, target, batch_size, count, lrs,
                            [&](const Tensor& xb, const Tensor& tb, double lr) {
                              return mlp_sgd_step(xb, tb, weights, biases, wbufs, bbufs, lr, momentum, weight_decay,
                                                  std::nullopt, false);
                            });
}

Tensor mlp_adam_steps(const Tensor& x, const Tensor& target, int64_t batch_size, at::TensorList weights,
                      at::TensorList biases, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                      at::TensorList steps, at::ArrayRef<double> lrs, double beta1, double beta2, double eps,
                      double weight_decay, bool decoupled_weight_decay, bool bf16) {
  constexpr const char* op = "fastmlp::mlp_adam_steps";
  check_cuda(op, x);
  check_no_bf16(op, bf16);
  check_adam_args(op, x, target, weights, biases, exp_avgs, exp_avg_sqs, steps, beta1, beta2, eps, std::nullopt);
  const int64_t count = check_batches(op, x, batch_size, lrs);
  check_targets(op, target, weights.back().size(0));
  return steps_over_batches(x, target, batch_size, count, lrs,
                            [&](const Tensor& xb, const Tensor& tb, double lr) {
                              return mlp_adam_step(xb, tb, weights, biases, exp_avgs, exp_avg_sqs, steps, lr, beta1,
                                                   beta2, eps, weight_decay, decoupled_weight_decay, std::nullopt,
                                                   false);
                            });
}

}  // namespace

// Registers the ops above for the CUDA dispatch key. Idempotent and thread-safe. The Library is
// heap-allocated and never freed: destroying it would unregister the kernels, and at process exit
// the dispatcher may be torn down first.
void register_cuda_kernels() {
  static std::mutex mu;
  static torch::Library* lib = nullptr;
  const std::lock_guard<std::mutex> lock(mu);
  if (lib != nullptr) return;
  auto l = std::make_unique<torch::Library>(torch::Library::IMPL, "fastmlp", c10::DispatchKey::CUDA,
                                            __FILE__, __LINE__);
  l->impl("linear_relu_fwd", &linear_relu_fwd);
  l->impl("linear_relu_bwd", &linear_relu_bwd);
  l->impl("linear_fwd", &linear_fwd);
  l->impl("linear_bwd", &linear_bwd);
  l->impl("mlp_forward", &mlp_forward);
  l->impl("mlp_sgd_step", &mlp_sgd_step);
  l->impl("mlp_adam_step", &mlp_adam_step);
  l->impl("mlp_sgd_steps", &mlp_sgd_steps);
  l->impl("mlp_adam_steps", &mlp_adam_steps);
  lib = l.release();
}

}  // namespace fastmlp::cuda
