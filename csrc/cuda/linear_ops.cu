// CUDA implementations of the fastmlp layer ops (schemas and semantics: csrc/ops.cpp): output
// allocation and the kernel sequence of each op; the arguments are checked before, in
// csrc/cuda/ops_cuda.cpp. The arithmetic is in gemm_simt.cu,
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

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <array>
#include <type_traits>

#include "kernels.h"
#include "launch.h"
#include "ops_impl.h"

namespace fastmlp::cuda {

namespace {

using at::Tensor;

// Calls f(T{}) with T the kernels' storage type for dtype t, one of the four ops_cuda.cpp admits.
template <typename F>
decltype(auto) dispatch_dtype(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat:
      return f(float{});
    case at::kDouble:
      return f(double{});
    case at::kHalf:
      return f(__half{});
    default:  // at::kBFloat16
      return f(__nv_bfloat16{});
  }
}

Tensor unused(const Tensor& like) { return at::empty({0}, like.options()); }

template <typename T>
std::tuple<Tensor, Tensor> forward(const Tensor& x_, const Tensor& w_, const std::optional<Tensor>& b_,
                                   bool relu) {
  const c10::cuda::CUDAGuard guard(x_.device());
  const Launch l = launch_config(x_.scalar_type());
  const Tensor x = x_.contiguous(), w = w_.contiguous();
  const Tensor b = b_.has_value() ? b_->contiguous() : Tensor();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  Tensor y = at::empty({M, N}, x.options());
  Tensor mask = relu ? at::empty({M, div_up(N, 8)}, x.options().dtype(at::kByte)) : Tensor();
  if (M == 0 || N == 0) return {y, mask};
  if (vendor_gemm(M, N, K)) {  // cuBLAS (bias in its epilogue), then fastmlp's ReLU + mask
    if (b.defined()) at::addmm_out(y, b, x, w.t());
    else at::mm_out(y, x, w.t());
    if (relu) relu_mask(M, N, mptr<T>(y), mptr<uint8_t>(mask), l.stream);
    return {y, mask};
  }
  gemm<T>(forward_gemm<T>(M, N, K, cptr<T>(x), cptr<T>(w), b.defined() ? cptr<T>(b) : nullptr, mptr<T>(y),
                          relu ? mptr<uint8_t>(mask) : nullptr),
          l);
  return {y, mask};
}

template <typename T>
std::tuple<Tensor, Tensor, Tensor> backward(const Tensor& gy_, const Tensor& x_, const Tensor& w_,
                                            const Tensor* mask_, std::array<bool, 3> needs) {
  using Acc = std::conditional_t<std::is_same_v<T, double>, double, float>;
  const c10::cuda::CUDAGuard guard(x_.device());
  const Launch l = launch_config(x_.scalar_type());
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
  if (needs[0] && M > 0 && K > 0) {  // gx = dz @ w  (zeros when N == 0)
    if (vendor_gemm(M, K, N)) at::mm_out(gx, dz, w);
    else gemm<T>(grad_input_gemm<T>(M, N, K, cptr<T>(dz), cptr<T>(w), mptr<T>(gx)), l);
  }
  if (needs[1] && N > 0 && K > 0) {  // gw = dz.T @ x  (zeros for an empty batch)
    if (vendor_gemm(N, K, M)) at::mm_out(gw, dz.t(), x);
    else gemm<T>(grad_weight_gemm<T>(M, N, K, cptr<T>(dz), cptr<T>(x), mptr<T>(gw)), l);
  }
  return {gx, gw, gb};
}

}  // namespace

// Entry points (ops_impl.h): the arguments were validated by csrc/cuda/ops_cuda.cpp.
std::tuple<Tensor, Tensor> linear_fwd_impl(const Tensor& x, const Tensor& w, const std::optional<Tensor>& b,
                                           bool relu) {
  return dispatch_dtype(x.scalar_type(), [&](auto tag) { return forward<decltype(tag)>(x, w, b, relu); });
}

std::tuple<Tensor, Tensor, Tensor> linear_bwd_impl(const Tensor& gy, const Tensor& x, const Tensor& w,
                                                   const std::optional<Tensor>& mask, std::array<bool, 3> needs) {
  return dispatch_dtype(x.scalar_type(), [&](auto tag) {
    return backward<decltype(tag)>(gy, x, w, mask.has_value() ? &*mask : nullptr, needs);
  });
}


}  // namespace fastmlp::cuda
