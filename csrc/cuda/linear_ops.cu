// CUDA implementations of the fastmlp ops (schemas and semantics: csrc/ops.cpp): argument checks,
// output allocation, and the kernel sequence of each op. The arithmetic is in gemm_simt.cu,
// gemm_tc.cu and drelu_bias_grad.cu.
//
// Precision per dtype:
//   float64            CUDA-core FP64 FMA GEMM.
//   float32            CUDA-core exact FP32 FMA GEMM; TF32 tensor cores instead when the user allows
//                      TF32 for matmuls (torch.backends.cuda.matmul.allow_tf32, i.e.
//                      at::globalContext().allowTF32CuBLAS()) and the GPU has them (sm_80+).
//   float16, bfloat16  tensor cores (WMMA) with FP32 accumulation; bias and ReLU are applied to the
//                      FP32 sum, which is then rounded once. Needs compute capability 8.0+.
// The bias gradient is always accumulated in FP32 (FP64 for float64) in a fixed order.
//
// These kernels are NOT registered at load time: register_cuda_kernels() (exposed to Python as
// fastmlp._C.register_cuda_kernels, called by fastmlp/_ops.py only when FASTMLP_CUDA_KERNELS=1)
// installs them for the CUDA dispatch key. Until then CUDA tensors take the PyTorch reference.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <memory>
#include <mutex>
#include <type_traits>

#include "kernels.h"

namespace fastmlp::cuda {

namespace {

using at::Tensor;

int64_t div_up(int64_t a, int64_t b) { return (a + b - 1) / b; }

bool supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// Calls f(T{}) with T the kernels' storage type for dtype t.
template <typename F>
decltype(auto) dispatch_dtype(at::ScalarType t, const char* op, F&& f) {
  switch (t) {
    case at::kFloat:
      return f(float{});
    case at::kDouble:
      return f(double{});
    case at::kHalf:
      return f(__half{});
    default:
      TORCH_CHECK(t == at::kBFloat16, op, ": unsupported dtype ", t);
      return f(__nv_bfloat16{});
  }
}

template <typename T>
const T* cptr(const Tensor& t) {
  return static_cast<const T*>(t.const_data_ptr());
}
template <typename T>
T* mptr(Tensor& t) {
  return static_cast<T*>(t.mutable_data_ptr());
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

// Where and how to launch, on the current device (set by the caller's CUDAGuard).
struct Launch {
  cudaStream_t stream;
  int num_sms;
  bool tensor_cores;  // sm_80+: WMMA for fp16 / bf16 / tf32
  bool tf32;          // float32 GEMMs on TF32 tensor cores
};

// SM count and compute capability of the current device. Queried with cudaDeviceGetAttribute
// rather than at::cuda::getCurrentDeviceProperties(), whose header (ATen/cuda/CUDAContext.h) needs
// the cuBLAS/cuSPARSE headers, which a bare CUDA toolkit may lack.
struct DeviceInfo {
  int num_sms, major, minor;
};

DeviceInfo device_info() {
  constexpr int kMaxDevices = 64;
  static DeviceInfo cache[kMaxDevices];
  static std::once_flag once[kMaxDevices];
  const int dev = c10::cuda::current_device();
  auto query = [](int d) {
    DeviceInfo info{};
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&info.num_sms, cudaDevAttrMultiProcessorCount, d));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&info.major, cudaDevAttrComputeCapabilityMajor, d));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&info.minor, cudaDevAttrComputeCapabilityMinor, d));
    return info;
  };
  if (dev < 0 || dev >= kMaxDevices) return query(dev);
  std::call_once(once[dev], [&] { cache[dev] = query(dev); });
  return cache[dev];
}

Launch launch_config(const char* op, at::ScalarType dtype) {
  const DeviceInfo dev = device_info();
  Launch l;
  l.stream = c10::cuda::getCurrentCUDAStream().stream();  // == at::cuda::getCurrentCUDAStream()
  l.num_sms = dev.num_sms;
  l.tensor_cores = dev.major >= 8;
  l.tf32 = l.tensor_cores && dtype == at::kFloat && at::globalContext().allowTF32CuBLAS();
  if (dtype == at::kHalf || dtype == at::kBFloat16)
    TORCH_CHECK(l.tensor_cores, op, ": ", dtype, " runs on tensor cores and needs a GPU of compute ",
                "capability 8.0 or newer; this one is ", dev.major, ".", dev.minor);
  return l;
}

template <typename T>
void gemm(const GemmArgs<T>& g, const Launch& l) {
  if constexpr (std::is_same_v<T, double>) {
    gemm_simt(g, l.num_sms, l.stream);
  } else if constexpr (std::is_same_v<T, float>) {
    if (l.tf32) gemm_tensor_core(g, l.num_sms, l.stream);
    else gemm_simt(g, l.num_sms, l.stream);
  } else {
    gemm_tensor_core(g, l.num_sms, l.stream);
  }
}

Tensor unused(const Tensor& like) { return at::empty({0}, like.options()); }

template <typename T>
std::tuple<Tensor, Tensor> forward(const char* op, const Tensor& x_, const Tensor& w_,
                                   const std::optional<Tensor>& b_, bool relu) {
  const c10::cuda::CUDAGuard guard(x_.device());
  const Launch l = launch_config(op, x_.scalar_type());
  const Tensor x = x_.contiguous(), w = w_.contiguous();
  const Tensor b = b_.has_value() ? b_->contiguous() : Tensor();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  Tensor y = at::empty({M, N}, x.options());
  Tensor mask = relu ? at::empty({M, div_up(N, 8)}, x.options().dtype(at::kByte)) : Tensor();
  if (M == 0 || N == 0) return {y, mask};
  gemm<T>(forward_gemm<T>(M, N, K, cptr<T>(x), cptr<T>(w), b.defined() ? cptr<T>(b) : nullptr, mptr<T>(y),
                          relu ? mptr<uint8_t>(mask) : nullptr),
          l);
  return {y, mask};
}

template <typename T>
std::tuple<Tensor, Tensor, Tensor> backward(const char* op, const Tensor& gy_, const Tensor& x_,
                                            const Tensor& w_, const Tensor* mask_,
                                            std::array<bool, 3> needs) {
  using Acc = std::conditional_t<std::is_same_v<T, double>, double, float>;
  const c10::cuda::CUDAGuard guard(x_.device());
  const Launch l = launch_config(op, x_.scalar_type());
  const Tensor gy = gy_.contiguous(), x = x_.contiguous(), w = w_.contiguous();
  const Tensor m = mask_ != nullptr ? mask_->contiguous() : Tensor();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  Tensor gx = needs[0] ? at::empty({M, K}, x.options()) : unused(x);
  Tensor gw = needs[1] ? at::empty({N, K}, x.options()) : unused(x);
  Tensor gb = needs[2] ? at::empty({N}, x.options()) : unused(x);

  // dz: the gradient at the pre-activation. Without a ReLU it is gy itself.
  Tensor dz = gy;
  const bool make_dz = m.defined() && (needs[0] || needs[1]);
  if (make_dz) dz = at::empty({M, N}, x.options());
  if (make_dz || needs[2]) {
    Tensor partial;
    const int64_t parts = bias_grad_partials(M);
    if (needs[2] && parts > 1)
      partial = at::empty({parts * N}, x.options().dtype(c10::CppTypeToScalarType<Acc>::value));
    drelu_bias_grad(M, N, cptr<T>(gy), m.defined() ? cptr<uint8_t>(m) : nullptr, div_up(N, 8),
                    make_dz ? mptr<T>(dz) : nullptr, needs[2] ? mptr<T>(gb) : nullptr,
                    partial.defined() ? mptr<Acc>(partial) : nullptr, l.stream);
  }
  if (needs[0] && M > 0 && K > 0)  // gx = dz @ w  (zeros when N == 0)
    gemm<T>(grad_input_gemm<T>(M, N, K, cptr<T>(dz), cptr<T>(w), mptr<T>(gx)), l);
  if (needs[1] && N > 0 && K > 0)  // gw = dz.T @ x  (zeros for an empty batch)
    gemm<T>(grad_weight_gemm<T>(M, N, K, cptr<T>(dz), cptr<T>(x), mptr<T>(gw)), l);
  return {gx, gw, gb};
}

std::tuple<Tensor, Tensor> linear_relu_fwd(const Tensor& x, const Tensor& w, const std::optional<Tensor>& b) {
  constexpr const char* op = "fastmlp::linear_relu_fwd";
  check_linear_args(op, x, w, b);
  return dispatch_dtype(x.scalar_type(), op, [&](auto tag) {
    return forward<decltype(tag)>(op, x, w, b, true);
  });
}

Tensor linear_fwd(const Tensor& x, const Tensor& w, const std::optional<Tensor>& b) {
  constexpr const char* op = "fastmlp::linear_fwd";
  check_linear_args(op, x, w, b);
  return dispatch_dtype(x.scalar_type(), op, [&](auto tag) {
    return std::get<0>(forward<decltype(tag)>(op, x, w, b, false));
  });
}

std::tuple<Tensor, Tensor, Tensor> linear_relu_bwd(const Tensor& gy, const Tensor& x, const Tensor& w,
                                                   const Tensor& mask, std::array<bool, 3> needs) {
  constexpr const char* op = "fastmlp::linear_relu_bwd";
  check_grad_args(op, gy, x, w);
  TORCH_CHECK(mask.scalar_type() == at::kByte, op, ": mask must be uint8, got ", mask.scalar_type());
  TORCH_CHECK(mask.dim() == 2 && mask.size(0) == x.size(0) && mask.size(1) == div_up(w.size(0), 8), op,
              ": mask must have shape (", x.size(0), ", ", div_up(w.size(0), 8), "), got ", mask.sizes());
  TORCH_CHECK(mask.device() == x.device(), op, ": mask is on ", mask.device(), " but x is on ", x.device());
  return dispatch_dtype(x.scalar_type(), op, [&](auto tag) {
    return backward<decltype(tag)>(op, gy, x, w, &mask, needs);
  });
}

std::tuple<Tensor, Tensor, Tensor> linear_bwd(const Tensor& gy, const Tensor& x, const Tensor& w,
                                              std::array<bool, 3> needs) {
  constexpr const char* op = "fastmlp::linear_bwd";
  check_grad_args(op, gy, x, w);
  return dispatch_dtype(x.scalar_type(), op, [&](auto tag) {
    return backward<decltype(tag)>(op, gy, x, w, nullptr, needs);
  });
}

}  // namespace

// Registers the kernels above for the CUDA dispatch key of the fastmlp ops. Idempotent and
// thread-safe. The Library is heap-allocated and never freed: destroying it would unregister the
// kernels, and at process exit the dispatcher may be torn down first.
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
  lib = l.release();
}

}  // namespace fastmlp::cuda
