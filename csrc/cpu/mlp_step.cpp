// One whole SGD training step of an MLP (Linear+ReLU ... Linear, softmax cross-entropy) in a single
// op: no autograd graph, no per-layer dispatch, and no pass over memory that a GEMM epilogue can do:
//   forward   each layer's GEMM writes its activation and ReLU mask directly (bias + ReLU fused);
//   loss      softmax cross-entropy and its gradient in one pass over the logits;
//   backward  dX GEMMs apply the previous layer's mask in their epilogue (producing dz directly);
//             dW GEMMs apply the SGD-with-momentum update to each strip of rows as soon as its
//             gradient is summed, so no weight gradient is materialised (batches longer than one
//             K block excepted); bias gradients are column sums followed by the same update.
// The update is the one torch.optim.SGD makes (dampening 0, no Nesterov, optional weight decay).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "checks.h"
#include "kernels.h"
#include "runner.h"

namespace fastmlp::cpu {

namespace {

using at::Tensor;

constexpr const char* kOp = "fastmlp::mlp_sgd_step";

// Mean softmax cross-entropy of logits (M x C); writes its gradient to dz. Returns the loss.
template <typename T>
double cross_entropy(const T* logits, const int64_t* target, int64_t M, int64_t C, T* dz) {
  double total = 0;
  const T inv_m = T(1) / T(M);
  for (int64_t i = 0; i < M; ++i) {
    const T* z = logits + i * C;
    T* d = dz + i * C;
    const int64_t t = target[i];
    TORCH_CHECK(t >= 0 && t < C, kOp, ": target[", i, "] = ", t, " is not a class index in [0, ", C, ")");
    T mx = z[0];
    for (int64_t j = 1; j < C; ++j) mx = z[j] > mx ? z[j] : mx;
    T sum = 0;
    for (int64_t j = 0; j < C; ++j) sum += (d[j] = std::exp(z[j] - mx));
    const T inv_sum = T(1) / sum;
    for (int64_t j = 0; j < C; ++j) d[j] = (d[j] * inv_sum - T(j == t)) * inv_m;
    total += double(mx) + std::log(double(sum)) - double(z[t]);
  }
  return total / double(M);
}

// p -= lr * (buf = momentum * buf + g + weight_decay * p), elementwise.
template <typename T>
void sgd_vector(T* p, T* buf, const T* g, int64_t n, T lr, T momentum, T weight_decay) {
  for (int64_t i = 0; i < n; ++i) {
    T d = g[i] + weight_decay * p[i];
    if (momentum != T(0)) d = buf[i] = momentum * buf[i] + d;
    p[i] -= lr * d;
  }
}

template <typename T>
Tensor step(const Tensor& x_, const Tensor& target_, at::TensorList weights, at::TensorList biases,
            at::TensorList wbufs, at::TensorList bbufs, T lr, T momentum, T weight_decay) {
  const auto& k = table<T>();
  const Tensor x = x_.contiguous(), target = target_.contiguous();
  const int64_t M = x.size(0);
  const size_t L = weights.size();
  const bool has_bias = !biases.empty();
  const auto opts = x.options();

  // Forward: h[l] is the input of layer l; masks[l] the ReLU mask of its output.
  std::vector<Tensor> h(L + 1), masks(L);
  h[0] = x;
  for (size_t l = 0; l < L; ++l) {
    const Tensor& w = weights[l];
    const int64_t N = w.size(0), K = w.size(1);
    const bool relu = l + 1 < L;
    h[l + 1] = at::empty({M, N}, opts);
    Gemm<T> g;
    g.rows = M, g.cols = N, g.inner = K;
    g.a = h[l].const_data_ptr<T>(), g.a_rs = K, g.a_cs = 1;
    g.b = w.const_data_ptr<T>(), g.b_rs = 1, g.b_cs = K;
    g.c = h[l + 1].mutable_data_ptr<T>(), g.ldc = N;
    g.bias = has_bias ? biases[l].const_data_ptr<T>() : nullptr;
    if (relu) {
      masks[l] = at::empty({M, div_up(N, 8)}, opts.dtype(at::kByte));
      g.relu = true, g.mask = masks[l].mutable_data_ptr<uint8_t>(), g.ldm = div_up(N, 8);
    }
    run_gemm(k, g);
  }

  const int64_t C = weights[L - 1].size(0);
  Tensor dz = at::empty({M, C}, opts);
  const double loss = cross_entropy<T>(h[L].const_data_ptr<T>(), target.const_data_ptr<int64_t>(), M, C,
                                       dz.mutable_data_ptr<T>());

  Tensor gb, partial;
  for (size_t l = L; l-- > 0;) {
    const Tensor& w = weights[l];
    const int64_t N = w.size(0), K = w.size(1);
    if (has_bias) {
      gb = at::empty({N}, opts);
      run_drelu_bias_grad<T>(k, M, N, dz.const_data_ptr<T>(), nullptr, 0, nullptr, gb.mutable_data_ptr<T>());
      sgd_vector<T>(biases[l].mutable_data_ptr<T>(), momentum != T(0) ? bbufs[l].mutable_data_ptr<T>() : nullptr,
                    gb.const_data_ptr<T>(), N, lr, momentum, weight_decay);
    }
    Tensor dz_prev;
    if (l > 0) {  // dz of the layer below = (dz @ w) masked by that layer's ReLU; uses w before its update
      dz_prev = at::empty({M, K}, opts);
      Gemm<T> g;
      g.rows = M, g.cols = K, g.inner = N;
      g.a = dz.const_data_ptr<T>(), g.a_rs = N, g.a_cs = 1;
      g.b = w.const_data_ptr<T>(), g.b_rs = K, g.b_cs = 1;
      g.c = dz_prev.mutable_data_ptr<T>(), g.ldc = K;
      g.mask_in = masks[l - 1].const_data_ptr<uint8_t>(), g.ldm_in = div_up(K, 8);
      run_gemm(k, g);
    }
    {  // w -= lr * momentum-update(dz.T @ h[l]) without materialising the gradient
      Gemm<T> g;
      g.rows = N, g.cols = K, g.inner = M;
      g.a = dz.const_data_ptr<T>(), g.a_rs = 1, g.a_cs = N;
      g.b = h[l].const_data_ptr<T>(), g.b_rs = K, g.b_cs = 1;
      if (M > k.inner_block) {  // partial sums need somewhere to live between K blocks
        partial = at::empty({N, K}, opts);
        g.c = partial.mutable_data_ptr<T>();
      }
      g.ldc = K;
      g.sgd_param = weights[l].mutable_data_ptr<T>();
      g.sgd_buf = momentum != T(0) ? wbufs[l].mutable_data_ptr<T>() : nullptr;
      g.lr = lr, g.momentum = momentum, g.weight_decay = weight_decay;
      run_gemm(k, g);
    }
    dz = dz_prev;
  }
  return at::scalar_tensor(loss, opts);
}

Tensor mlp_sgd_step(const Tensor& x, const Tensor& target, at::TensorList weights, at::TensorList biases,
                    at::TensorList wbufs, at::TensorList bbufs, double lr, double momentum, double weight_decay,
                    const std::optional<Tensor>& lr_scale) {
  check_step_args(kOp, x, target, weights, biases, wbufs, bbufs, momentum, lr_scale);
  if (lr_scale.has_value()) lr *= lr_scale->item<double>();
  if (x.scalar_type() == at::kDouble)
    return step<double>(x, target, weights, biases, wbufs, bbufs, lr, momentum, weight_decay);
  return step<float>(x, target, weights, biases, wbufs, bbufs, float(lr), float(momentum), float(weight_decay));
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmlp, CPU, m) { m.impl("mlp_sgd_step", &mlp_sgd_step); }

}  // namespace fastmlp::cpu
