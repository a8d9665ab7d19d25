// Argument checks shared by the CPU ops (csrc/cpu) and the CUDA ops (csrc/cuda/ops_cuda.cpp). Each
// throws a c10::Error naming the op and the argument. Compiled by the host compiler only: see
// csrc/cuda/ops_impl.h for why no check may run inside nvcc-compiled code.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace fastmlp {

// The floating dtypes a backend's layer ops accept: `ok` decides, `allowed` names them in messages
// ("float32 or float64 on the CPU").
struct DtypeRule {
  bool (*ok)(at::ScalarType);
  const char* allowed;
};

// The (x, w, b) triple of every layer op: 2-D x (M, K) and w (N, K), b (N,) or none, one dtype
// (accepted by `rule`) and one device.
void check_linear_args(const char* op, const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b,
                       DtypeRule rule);
// The above for (x, w), plus gy (M, N) of the same dtype and device.
void check_grad_args(const char* op, const at::Tensor& gy, const at::Tensor& x, const at::Tensor& w, DtypeRule rule);
// A packed ReLU mask for the output of x @ w.T: uint8 (M, ceil(N / 8)) on x's device.
void check_mask(const char* op, const at::Tensor& mask, const at::Tensor& x, const at::Tensor& w);
// Every argument of mlp_sgd_step (float32 or float64 on either backend); x, the parameters and their
// buffers must not share memory (fake tensors have none to compare: fastmlp/_checks.py skips this).
void check_step_args(const char* op, const at::Tensor& x, const at::Tensor& target, at::TensorList weights,
                     at::TensorList biases, at::TensorList wbufs, at::TensorList bbufs, double momentum,
                     const std::optional<at::Tensor>& lr_scale);
// Every argument of mlp_adam_step: the above without momentum buffers, plus one exp_avg, exp_avg_sq
// and step per parameter (weights, then biases), none sharing memory with another or with x.
void check_adam_args(const char* op, const at::Tensor& x, const at::Tensor& target, at::TensorList weights,
                     at::TensorList biases, at::TensorList exp_avgs, at::TensorList exp_avg_sqs, at::TensorList steps,
                     double beta1, double beta2, double eps, const std::optional<at::Tensor>& lr_scale);

// Every argument of mlp_forward: x (..., in_features) of a dtype `rule` accepts, weights chaining from
// its in_features (weights[l] has shape (*, width of layer l - 1)), biases empty or one (N,) per
// layer, all of x's dtype and device.
void check_mlp_forward_args(const char* op, const at::Tensor& x, at::TensorList weights, at::TensorList biases,
                            DtypeRule rule);

// batch_size and lrs of the many-step ops (mlp_sgd_steps, mlp_adam_steps): batch_size >= 1 and one
// learning rate per batch of x. Returns the number of steps.
int64_t check_batches(const char* op, const at::Tensor& x, int64_t batch_size, at::ArrayRef<double> lrs);

}  // namespace fastmlp
