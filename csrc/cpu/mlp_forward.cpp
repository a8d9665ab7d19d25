// Inference through a whole MLP in one op (mlp_forward, see csrc/ops.cpp): each layer's GEMM with
// its bias and ReLU fused, no masks, the activations ping-ponging between two halves of one
// workspace, so a small batch costs one dispatch and one allocation besides the output, not a
// handful per layer.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "checks.h"
#include "gemm_choice.h"
#include "kernels.h"
#include "layer_ops.h"
#include "runner.h"

namespace fastmlp::cpu {

namespace {

using at::Tensor;

constexpr const char* kOp = "fastmlp::mlp_forward";

template <typename T>
Tensor forward(const Tensor& x2, at::TensorList weights, at::TensorList biases, bool relu_last,
               std::vector<int64_t> out_shape) {
  const int64_t M = x2.size(0), L = int64_t(weights.size());
  std::vector<Tensor> ws, bs;  // contiguous (no copy when they already are)
  int64_t widest = 0;
  for (int64_t l = 0; l < L; ++l) {
    ws.push_back(weights[l].contiguous());
    if (!biases.empty()) bs.push_back(biases[l].contiguous());
    if (l + 1 < L) widest = std::max(widest, weights[l].size(0));
  }
  Tensor y = at::empty(out_shape, x2.options());
  if (M == 0) return y;
  // The hidden activations: on the stack when they fit (a small batch: no allocation at all).
  const int64_t work_size = L > 1 ? std::min<int64_t>(L - 1, 2) * M * widest : 0;
  constexpr int64_t kStackBytes = 16384;
  alignas(64) unsigned char stack[kStackBytes];
  Tensor work;
  T* hidden = reinterpret_cast<T*>(stack);
  if (work_size * int64_t(sizeof(T)) > kStackBytes) {
    work = at::empty({work_size}, x2.options());
    hidden = work.mutable_data_ptr<T>();
  }
  const T* in = x2.const_data_ptr<T>();
  const auto& k = table<T>();
  for (int64_t l = 0; l < L; ++l) {
    const int64_t N = ws[l].size(0), K = ws[l].size(1);
    T* out = l + 1 == L ? y.mutable_data_ptr<T>() : hidden + (l % 2) * M * widest;
    const T* bias = bs.empty() ? nullptr : bs[l].const_data_ptr<T>();
    run_layer_gemm(k, layer_forward<T>(M, K, N, in, ws[l].const_data_ptr<T>(), bias, out, l + 1 < L || relu_last, nullptr),
                   GemmKind::kForward);
    in = out;
  }
  return y;
}

Tensor mlp_forward(const Tensor& x, at::TensorList weights, at::TensorList biases, bool relu_last) {
  check_mlp_forward_args(kOp, x, weights, biases, kCpuDtypes);
  const int64_t K = x.size(-1);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end() - 1);
  int64_t M = 1;
  for (int64_t d : out_shape) M *= d;  // not x.numel() / K: K may be 0
  out_shape.push_back(weights.back().size(0));
  const Tensor x2 = x.reshape({M, K}).contiguous();
  if (x.scalar_type() == at::kDouble) return forward<double>(x2, weights, biases, relu_last, out_shape);
  if (x.scalar_type() == at::kFloat) return forward<float>(x2, weights, biases, relu_last, out_shape);
  // bfloat16 / float16: layer by layer, as the layer ops compute them (low_precision.cpp), each
  // layer's output rounded to x's dtype before the next layer reads it; no masks.
  Tensor h = x2;
  for (size_t l = 0; l < weights.size(); ++l) {
    const std::optional<Tensor> b = biases.empty() ? std::nullopt : std::optional<Tensor>(biases[l]);
    h = std::get<0>(low_precision_forward(h, weights[l], b, l + 1 < weights.size() || relu_last, false));
  }
  return h.reshape(out_shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmlp, CPU, m) { m.impl("mlp_forward", &mlp_forward); }

}  // namespace fastmlp::cpu
