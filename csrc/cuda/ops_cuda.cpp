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

#include <memory>
#include <mutex>

#include "ops_impl.h"

namespace fastmlp::cuda {

namespace {

using at::Tensor;

int64_t div_up(int64_t a, int64_t b) { return (a + b - 1) / b; }

bool supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

void check_float(const Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(supported_dtype(t.scalar_type()), op, ": ", name,
              " must be float32, float64, float16 or bfloat16 on CUDA, got ", t.scalar_type());
}

// Checks the (x, w, b) triple shared by every op; returns nothing, throws with the argument name.
void check_linear_args(const char* op, const Tensor& x, const Tensor& w, const std::optional<Tensor>& b) {
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor here, got one on ", x.device());
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D (batch, in_features), got shape ", x.sizes());
  TORCH_CHECK(w.dim() == 2, op, ": w must be 2-D (out_features, in_features), got shape ", w.sizes());
  check_float(x, op, "x");
  TORCH_CHECK(w.scalar_type() == x.scalar_type(), op, ": w has dtype ", w.scalar_type(),
              " but x has dtype ", x.scalar_type(), "; they must match");
  TORCH_CHECK(w.device() == x.device(), op, ": w is on ", w.device(), " but x is on ", x.device());
  TORCH_CHECK(x.size(1) == w.size(1), op, ": x has ", x.size(1), " features but w expects ",
              w.size(1), " (w has shape ", w.sizes(), ")");
  if (b.has_value()) {
    TORCH_CHECK(b->dim() == 1 && b->size(0) == w.size(0), op, ": b must have shape (", w.size(0),
                ",), got ", b->sizes());
    TORCH_CHECK(b->scalar_type() == x.scalar_type(), op, ": b has dtype ", b->scalar_type(),
                " but x has dtype ", x.scalar_type(), "; they must match");
    TORCH_CHECK(b->device() == x.device(), op, ": b is on ", b->device(), " but x is on ", x.device());
  }
}

void check_grad_args(const char* op, const Tensor& gy, const Tensor& x, const Tensor& w) {
  check_linear_args(op, x, w, std::nullopt);
  TORCH_CHECK(gy.dim() == 2 && gy.size(0) == x.size(0) && gy.size(1) == w.size(0), op,
              ": gy must have shape (", x.size(0), ", ", w.size(0), "), got ", gy.sizes());
  TORCH_CHECK(gy.scalar_type() == x.scalar_type(), op, ": gy has dtype ", gy.scalar_type(),
              " but x has dtype ", x.scalar_type(), "; they must match");
  TORCH_CHECK(gy.device() == x.device(), op, ": gy is on ", gy.device(), " but x is on ", x.device());
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

void check_mask(const char* op, const Tensor& mask, const Tensor& x, const Tensor& w) {
  TORCH_CHECK(mask.scalar_type() == at::kByte, op, ": mask must be uint8, got ", mask.scalar_type());
  TORCH_CHECK(mask.dim() == 2 && mask.size(0) == x.size(0) && mask.size(1) == div_up(w.size(0), 8), op,
              ": mask must have shape (", x.size(0), ", ", div_up(w.size(0), 8), "), got ", mask.sizes());
  TORCH_CHECK(mask.device() == x.device(), op, ": mask is on ", mask.device(), " but x is on ", x.device());
}

constexpr const char* kStepOp = "fastmlp::mlp_sgd_step";

void check_step_args(const Tensor& x, const Tensor& target, at::TensorList weights, at::TensorList biases,
                     at::TensorList wbufs, at::TensorList bbufs, double momentum) {
  TORCH_CHECK(!weights.empty(), kStepOp, ": weights must not be empty");
  TORCH_CHECK(x.is_cuda(), kStepOp, ": x must be a CUDA tensor here, got one on ", x.device());
  TORCH_CHECK(x.dim() == 2, kStepOp, ": x must be 2-D (batch, in_features), got shape ", x.sizes());
  TORCH_CHECK(x.size(0) > 0, kStepOp, ": x must hold at least one sample");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, kStepOp,
              ": x must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(target.dim() == 1 && target.size(0) == x.size(0), kStepOp, ": target must have shape (", x.size(0),
              ",), got ", target.sizes());
  TORCH_CHECK(target.scalar_type() == at::kLong, kStepOp, ": target must be int64 class indices, got ",
              target.scalar_type());
  TORCH_CHECK(target.device() == x.device(), kStepOp, ": target is on ", target.device(), " but x is on ", x.device());
  TORCH_CHECK(biases.empty() || biases.size() == weights.size(), kStepOp, ": biases must be empty or one per layer (",
              weights.size(), "), got ", biases.size());
  const bool with_momentum = momentum != 0.0;
  TORCH_CHECK(!with_momentum || wbufs.size() == weights.size(), kStepOp,
              ": weight_bufs must hold one momentum buffer per weight when momentum != 0");
  TORCH_CHECK(!with_momentum || bbufs.size() == biases.size(), kStepOp,
              ": bias_bufs must hold one momentum buffer per bias when momentum != 0");
  int64_t fan_in = x.size(1);
  for (size_t l = 0; l < weights.size(); ++l) {
    const Tensor& w = weights[l];
    TORCH_CHECK(w.dim() == 2 && w.size(1) == fan_in, kStepOp, ": weights[", l, "] must have shape (*, ", fan_in,
                "), got ", w.sizes());
    TORCH_CHECK(w.size(0) > 0, kStepOp, ": weights[", l, "] must have at least one output feature");
    TORCH_CHECK(w.scalar_type() == x.scalar_type() && w.device() == x.device(), kStepOp, ": weights[", l,
                "] must match x's dtype and device");
    TORCH_CHECK(w.is_contiguous(), kStepOp, ": weights[", l, "] must be contiguous (it is updated in place)");
    auto check_like = [&](const Tensor& t, const char* what, at::IntArrayRef shape) {
      TORCH_CHECK(t.sizes() == shape && t.scalar_type() == x.scalar_type() && t.device() == x.device() &&
                      t.is_contiguous(),
                  kStepOp, ": ", what, "[", l, "] must be a contiguous ", x.scalar_type(), " tensor of shape ",
                  shape, " on ", x.device(), ", got ", t.scalar_type(), " ", t.sizes(), " on ", t.device());
    };
    if (!biases.empty()) check_like(biases[l], "biases", {w.size(0)});
    if (with_momentum) check_like(wbufs[l], "weight_bufs", w.sizes());
    if (with_momentum && !biases.empty()) check_like(bbufs[l], "bias_bufs", {w.size(0)});
    fan_in = w.size(0);
  }
}

std::tuple<Tensor, Tensor> linear_relu_fwd(const Tensor& x, const Tensor& w, const std::optional<Tensor>& b) {
  constexpr const char* op = "fastmlp::linear_relu_fwd";
  check_linear_args(op, x, w, b);
  check_tensor_cores(op, x);
  return linear_fwd_impl(x, w, b, true);
}

Tensor linear_fwd(const Tensor& x, const Tensor& w, const std::optional<Tensor>& b) {
  constexpr const char* op = "fastmlp::linear_fwd";
  check_linear_args(op, x, w, b);
  check_tensor_cores(op, x);
  return std::get<0>(linear_fwd_impl(x, w, b, false));
}

std::tuple<Tensor, Tensor, Tensor> linear_relu_bwd(const Tensor& gy, const Tensor& x, const Tensor& w,
                                                   const Tensor& mask, std::array<bool, 3> needs) {
  constexpr const char* op = "fastmlp::linear_relu_bwd";
  check_grad_args(op, gy, x, w);
  check_mask(op, mask, x, w);
  check_tensor_cores(op, x);
  return linear_bwd_impl(gy, x, w, mask, needs);
}

std::tuple<Tensor, Tensor, Tensor> linear_bwd(const Tensor& gy, const Tensor& x, const Tensor& w,
                                              std::array<bool, 3> needs) {
  constexpr const char* op = "fastmlp::linear_bwd";
  check_grad_args(op, gy, x, w);
  check_tensor_cores(op, x);
  return linear_bwd_impl(gy, x, w, std::nullopt, needs);
}

Tensor mlp_sgd_step(const Tensor& x, const Tensor& target, at::TensorList weights, at::TensorList biases,
                    at::TensorList wbufs, at::TensorList bbufs, double lr, double momentum, double weight_decay,
                    const std::optional<Tensor>& lr_scale) {
  check_step_args(x, target, weights, biases, wbufs, bbufs, momentum);
  if (lr_scale.has_value())
    TORCH_CHECK(lr_scale->numel() == 1 && lr_scale->scalar_type() == x.scalar_type() &&
                    lr_scale->device() == x.device(),
                kStepOp, ": lr_scale must be a one-element ", x.scalar_type(), " tensor on ", x.device(), ", got ",
                lr_scale->scalar_type(), " of shape ", lr_scale->sizes(), " on ", lr_scale->device());
  return mlp_sgd_step_impl(x, target, weights, biases, wbufs, bbufs, lr, momentum, weight_decay,
                           lr_scale.has_value() ? lr_scale->contiguous() : Tensor());
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
  l->impl("mlp_sgd_step", &mlp_sgd_step);
  lib = l.release();
}

}  // namespace fastmlp::cuda
