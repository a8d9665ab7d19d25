// fastmlp::mlp_forward on CUDA (schema: csrc/ops.cpp): a batch of at most kMlpForwardMaxRows rows
// through a network that fits (kernels.h) runs as one kernel (mlp_forward.cuh); anything else is the
// layer ops one after another (csrc/composite.cpp), whose GEMMs reuse weights across rows.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include <vector>

#include "../composite.h"
#include "launch.h"
#include "mlp_forward.cuh"
#include "ops_impl.h"

namespace fastmlp::cuda {

bool mlp_forward_fits(int64_t rows, const int64_t* dims, int layers) {
  if (rows > kMlpForwardMaxRows || layers < 1 || layers > kMlpMaxLayers) return false;
  for (int l = 0; l < layers; ++l)
    if (dims[l] > kMlpMaxWidth) return false;
  return true;
}

namespace {

template <typename T>
void run(const MlpForwardArgs<T>& a, cudaStream_t stream) {
  if (a.rows == 0) return;
  const unsigned blocks = static_cast<unsigned>(div_up(a.rows, kMlpRows<T>));  // <= 32: rows are capped
  mlp_forward_kernel<T><<<blocks, kMlpThreads, 0, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

using at::Tensor;

template <typename T>
Tensor forward(const Tensor& x2, const std::vector<Tensor>& ws, const std::vector<Tensor>& bs, bool relu_last,
               const std::vector<int64_t>& out_shape) {
  MlpForwardArgs<T> a;
  a.layers = int(ws.size());
  a.rows = x2.size(0);
  a.dims[0] = int(x2.size(1));
  a.x = cptr<T>(x2);
  for (int l = 0; l < a.layers; ++l) {
    a.dims[l + 1] = int(ws[l].size(0));
    a.w[l] = cptr<T>(ws[l]);
    a.b[l] = bs.empty() ? nullptr : cptr<T>(bs[l]);
  }
  a.relu_last = relu_last;
  Tensor y = at::empty(out_shape, x2.options());
  a.y = mptr<T>(y);
  mlp_forward(a, c10::cuda::getCurrentCUDAStream().stream());
  return y;
}

}  // namespace

void mlp_forward(const MlpForwardArgs<float>& a, cudaStream_t stream) { run(a, stream); }
void mlp_forward(const MlpForwardArgs<double>& a, cudaStream_t stream) { run(a, stream); }
void mlp_forward(const MlpForwardArgs<__half>& a, cudaStream_t stream) { run(a, stream); }
void mlp_forward(const MlpForwardArgs<__nv_bfloat16>& a, cudaStream_t stream) { run(a, stream); }

Tensor mlp_forward_impl(const Tensor& x, at::TensorList weights, at::TensorList biases, bool relu_last) {
  std::vector<int64_t> dims{x.size(-1)};
  for (const Tensor& w : weights) dims.push_back(w.size(0));
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end() - 1);
  int64_t M = 1;
  for (int64_t d : out_shape) M *= d;  // not x.numel() / K: K may be 0
  if (!mlp_forward_fits(M, dims.data(), int(weights.size())))
    return fastmlp::mlp_forward_layers(x, weights, biases, relu_last);
  out_shape.push_back(dims.back());
  const Tensor x2 = x.reshape({M, dims[0]}).contiguous();
  std::vector<Tensor> ws, bs;
  for (const Tensor& w : weights) ws.push_back(w.contiguous());
  for (const Tensor& b : biases) bs.push_back(b.contiguous());
  switch (x.scalar_type()) {
    case at::kDouble: return forward<double>(x2, ws, bs, relu_last, out_shape);
    case at::kHalf: return forward<__half>(x2, ws, bs, relu_last, out_shape);
    case at::kBFloat16: return forward<__nv_bfloat16>(x2, ws, bs, relu_last, out_shape);
    default: return forward<float>(x2, ws, bs, relu_last, out_shape);
  }
}

}  // namespace fastmlp::cuda
