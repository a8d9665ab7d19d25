// One whole training step of an MLP (Linear+ReLU ... Linear, softmax cross-entropy) with an SGD or
// Adam update, in a single op: no autograd graph, no per-layer dispatch, and no pass over memory that
// a GEMM epilogue can do:
//   forward   each layer's GEMM writes its activation and ReLU mask directly (bias + ReLU fused);
//   loss      softmax cross-entropy and its gradient in one pass over the logits;
//   backward  dX GEMMs apply the previous layer's mask in their epilogue (producing dz directly);
//             dW GEMMs apply the optimizer update to each strip of rows as soon as its gradient is
//             summed, so no weight gradient is materialised (batches longer than one K block
//             excepted); bias gradients are column sums followed by the same update.
// The updates are the ones torch.optim.SGD (dampening 0, no Nesterov) and torch.optim.Adam / AdamW
// (no AMSGrad) make; see Update in kernels.h.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "kernels.h"
#include "runner.h"

namespace fastmlp::cpu {

namespace {

using at::Tensor;

constexpr const char* kSgdOp = "fastmlp::mlp_sgd_step";
constexpr const char* kAdamOp = "fastmlp::mlp_adam_step";

// Mean softmax cross-entropy of logits (M x C); writes its gradient to dz. Returns the loss.
template <typename T>
double cross_entropy(const char* op, const T* logits, const int64_t* target, int64_t M, int64_t C, T* dz) {
  double total = 0;
  const T inv_m = T(1) / T(M);
  for (int64_t i = 0; i < M; ++i) {
    const T* z = logits + i * C;
    T* d = dz + i * C;
    const int64_t t = target[i];
    TORCH_CHECK(t >= 0 && t < C, op, ": target[", i, "] = ", t, " is not a class index in [0, ", C, ")");
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

// The step, with updates[i] the optimizer update of parameter i (the weights, then the biases).
template <typename T>
Tensor step(const char* op, const Tensor& x_, const Tensor& target_, at::TensorList weights, at::TensorList biases,
            const std::vector<Update<T>>& updates) {
  const auto& k = table<T>();
  const Tensor x = x_.contiguous(), target = target_.contiguous();
  const int64_t M = x.size(0);
  const size_t L = weights.size();
  const bool has_bias = !biases.empty();
  const auto opts = x.options();
  auto width = [&](size_t l) { return weights[l].size(0); };  // outputs of layer l

  // Every temporary lives in one allocation (a dozen at::empty calls cost ~8 µs of a ~300 µs step):
  // the activations h[1..L], the ReLU masks, two dz buffers used in turn, the bias gradient and,
  // for batches longer than one K block, the weight gradient's partial sums.
  int64_t bytes = 0;
  auto carve = [&](int64_t n) {
    const int64_t at = bytes;
    bytes += div_up(n, 64) * 64;  // keeps every buffer 64-byte aligned
    return at;
  };
  std::vector<int64_t> h_at(L + 1), mask_at(L);
  int64_t widest = 0, largest = 0;
  for (size_t l = 0; l < L; ++l) {
    h_at[l + 1] = carve(M * width(l) * int64_t(sizeof(T)));
    if (l + 1 < L) mask_at[l] = carve(M * div_up(width(l), 8));
    widest = std::max(widest, width(l));
    largest = std::max(largest, weights[l].numel());
  }
  const int64_t dz_at[2] = {carve(M * widest * int64_t(sizeof(T))), carve(M * widest * int64_t(sizeof(T)))};
  const int64_t gb_at = carve(widest * int64_t(sizeof(T)));
  const bool parks = M > k.inner_block;  // partial sums need somewhere to live between K blocks
  const int64_t partial_at = parks ? carve(largest * int64_t(sizeof(T))) : 0;
  const Tensor workspace = at::empty({bytes}, opts.dtype(at::kByte));
  uint8_t* base = workspace.mutable_data_ptr<uint8_t>();
  auto buffer = [&](int64_t at) { return reinterpret_cast<T*>(base + at); };

  // Forward: h[l] is the input of layer l; masks[l] the ReLU mask of its output.
  std::vector<const T*> h(L + 1);
  std::vector<uint8_t*> masks(L, nullptr);
  h[0] = x.const_data_ptr<T>();
  for (size_t l = 0; l < L; ++l) {
    const Tensor& w = weights[l];
    const int64_t N = w.size(0), K = w.size(1);
    T* out = buffer(h_at[l + 1]);
    h[l + 1] = out;
    Gemm<T> g;
    g.rows = M, g.cols = N, g.inner = K;
    g.a = h[l], g.a_rs = K, g.a_cs = 1;
    g.b = w.const_data_ptr<T>(), g.b_rs = 1, g.b_cs = K;
    g.c = out, g.ldc = N;
    g.bias = has_bias ? biases[l].const_data_ptr<T>() : nullptr;
    if (l + 1 < L) {
      masks[l] = base + mask_at[l];
      g.relu = true, g.mask = masks[l], g.ldm = div_up(N, 8);
    }
    run_gemm(k, g);
  }

  int which = 0;
  T* dz = buffer(dz_at[which]);
  const double loss =
      cross_entropy<T>(op, h[L], target.const_data_ptr<int64_t>(), M, width(L - 1), dz);

  T* gb = buffer(gb_at);
  for (size_t l = L; l-- > 0;) {
    const Tensor& w = weights[l];
    const int64_t N = w.size(0), K = w.size(1);
    if (has_bias) {
      run_drelu_bias_grad<T>(k, M, N, dz, nullptr, 0, nullptr, gb);
      k.apply_update(updates[L + l], N, gb);
    }
    T* dz_prev = nullptr;
    if (l > 0) {  // dz of the layer below = (dz @ w) masked by that layer's ReLU; uses w before its update
      which = 1 - which;
      dz_prev = buffer(dz_at[which]);
      Gemm<T> g;
      g.rows = M, g.cols = K, g.inner = N;
      g.a = dz, g.a_rs = N, g.a_cs = 1;
      g.b = w.const_data_ptr<T>(), g.b_rs = K, g.b_cs = 1;
      g.c = dz_prev, g.ldc = K;
      g.mask_in = masks[l - 1], g.ldm_in = div_up(K, 8);
      run_gemm(k, g);
    }
    {  // the update of w from dz.T @ h[l], without materialising the gradient
      Gemm<T> g;
      g.rows = N, g.cols = K, g.inner = M;
      g.a = dz, g.a_rs = 1, g.a_cs = N;
      g.b = h[l], g.b_rs = K, g.b_cs = 1;
      g.c = parks ? buffer(partial_at) : nullptr, g.ldc = K;
      g.update = updates[l];
      run_gemm(k, g);
    }
    dz = dz_prev;
  }
  return at::scalar_tensor(loss, opts);
}

// The step in x's dtype with one update of `kind` per parameter (the weights, then the biases):
// fill(u, i) sets the optimizer's fields of parameter i's update once its kind and param are set.
template <class Fill>
Tensor run_step(const char* op, UpdateKind kind, const Tensor& x, const Tensor& target, at::TensorList weights,
                at::TensorList biases, Fill fill) {
  auto run = [&](auto zero) {
    using T = decltype(zero);
    const size_t L = weights.size();
    std::vector<Update<T>> updates(L + biases.size());
    for (size_t i = 0; i < updates.size(); ++i) {
      updates[i].kind = kind;
      updates[i].param = (i < L ? weights[i] : biases[i - L]).template mutable_data_ptr<T>();
      fill(updates[i], i);
    }
    return step<T>(op, x, target, weights, biases, updates);
  };
  return x.scalar_type() == at::kDouble ? run(double(0)) : run(float(0));
}

Tensor mlp_sgd_step(const Tensor& x, const Tensor& target, at::TensorList weights, at::TensorList biases,
                    at::TensorList wbufs, at::TensorList bbufs, double lr, double momentum, double weight_decay,
                    const std::optional<Tensor>& lr_scale) {
  check_step_args(kSgdOp, x, target, weights, biases, wbufs, bbufs, momentum, lr_scale);
  if (lr_scale.has_value()) lr *= lr_scale->item<double>();
  const size_t L = weights.size();
  return run_step(kSgdOp, UpdateKind::kSgd, x, target, weights, biases, [&](auto& u, size_t i) {
    using T = std::remove_pointer_t<decltype(u.param)>;
    if (momentum != 0) u.buf = (i < L ? wbufs[i] : bbufs[i - L]).template mutable_data_ptr<T>();
    u.lr = T(lr), u.momentum = T(momentum), u.weight_decay = T(weight_decay);
  });
}

Tensor mlp_adam_step(const Tensor& x, const Tensor& target, at::TensorList weights, at::TensorList biases,
                     at::TensorList exp_avgs, at::TensorList exp_avg_sqs, at::TensorList steps, double lr,
                     double beta1, double beta2, double eps, double weight_decay, bool decoupled_weight_decay,
                     const std::optional<Tensor>& lr_scale) {
  check_adam_args(kAdamOp, x, target, weights, biases, exp_avgs, exp_avg_sqs, steps, beta1, beta2, eps, lr_scale);
  if (lr_scale.has_value()) lr *= lr_scale->item<double>();
  // Bias corrections from each parameter's own step count, in double as torch.optim.Adam computes
  // them; the counts are written back only once the step has succeeded (a bad target throws first).
  std::vector<double> t(steps.size());
  for (size_t i = 0; i < steps.size(); ++i) t[i] = steps[i].item<double>() + 1;
  Tensor loss = run_step(kAdamOp, UpdateKind::kAdam, x, target, weights, biases, [&](auto& u, size_t i) {
    using T = std::remove_pointer_t<decltype(u.param)>;
    u.buf = exp_avgs[i].template mutable_data_ptr<T>();
    u.buf2 = exp_avg_sqs[i].template mutable_data_ptr<T>();
    u.lr = T(lr), u.weight_decay = T(weight_decay), u.decoupled = decoupled_weight_decay;
    u.decay_factor = T(1 - lr * weight_decay);
    u.one_minus_beta1 = T(1 - beta1), u.beta2 = T(beta2), u.one_minus_beta2 = T(1 - beta2), u.eps = T(eps);
    u.step_size = T(lr / (1 - std::pow(beta1, t[i])));
    u.bc2_sqrt = T(std::sqrt(1 - std::pow(beta2, t[i])));
  });
  for (size_t i = 0; i < steps.size(); ++i) steps[i].fill_(t[i]);
  return loss;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmlp, CPU, m) {
  m.impl("mlp_sgd_step", &mlp_sgd_step);
  m.impl("mlp_adam_step", &mlp_adam_step);
}

}  // namespace fastmlp::cpu
