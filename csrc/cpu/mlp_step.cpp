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
//
// mlp_{sgd,adam}_steps run many such steps, over consecutive batches of their input, in one call:
// the same arithmetic in the same order, without the Python, dispatch and allocation that each
// separate call costs.
//
// bf16=True is torch.autocast's bfloat16 arithmetic on float32 parameters and optimizer state: every
// GEMM operand rounded to bfloat16 (x, the weights and biases, the activations, dz), float32 sums,
// every GEMM result rounded to bfloat16 (activations, logits, dz of each layer, the weight and bias
// gradients), the loss and the update in float32. A bfloat16 product is exact in float32, so the
// float32 kernels on rounded operands compute what a bf16 GEMM with float32 accumulation does. The
// rounded weights and biases are kept beside the parameters for the whole call (`shadow`): made once
// at its start, then rewritten by each update as it stores the new parameter. Where the active CPU
// kernels have AMX tiles (amx.h: AmxKernels::whole_step), the GEMMs run on them instead: their
// packing rounds the float32 operands itself, so neither x nor the weights need a rounded copy (the
// biases keep theirs).
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
constexpr const char* kSgdStepsOp = "fastmlp::mlp_sgd_steps";
constexpr const char* kAdamStepsOp = "fastmlp::mlp_adam_steps";

// Mean softmax cross-entropy of logits (M x C); writes its gradient to dz. Returns the loss. The
// targets were checked to be class indices before any step ran (check_targets).
template <typename T>
double cross_entropy(const T* logits, const int64_t* target, int64_t M, int64_t C, T* dz) {
  double total = 0;
  const T inv_m = T(1) / T(M);
  for (int64_t i = 0; i < M; ++i) {
    const T* z = logits + i * C;
    T* d = dz + i * C;
    const int64_t t = target[i];
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

// Every target must be a class index: checked for the whole input before the first step, so that a
// bad label fails the call before any parameter has changed.
void check_targets(const char* op, const Tensor& target, int64_t classes) {
  const int64_t* t = target.const_data_ptr<int64_t>();
  for (int64_t i = 0, n = target.numel(); i < n; ++i)
    TORCH_CHECK(t[i] >= 0 && t[i] < classes, op, ": target[", i, "] = ", t[i], " is not a class index in [0, ",
                classes, ")");
}

// The buffers of steps of up to max_rows samples, and the step itself.
template <typename T>
class Stepper {
 public:
  // bf16: see the top of the file; without AMX x is then rounded per step into a buffer of max_rows
  // rows.
  Stepper(at::TensorList weights, at::TensorList biases, int64_t max_rows, const at::TensorOptions& opts, bool bf16)
      : k_(table<T>()), weights_(weights), has_bias_(!biases.empty()), L_(weights.size()), bf16_(bf16),
        amx_(bf16 && std::is_same_v<T, float> && active_kernels().amx && active_kernels().amx->whole_step
                 ? active_kernels().amx
                 : nullptr) {
    // Every temporary lives in one allocation (not a dozen at::empty calls per step):
    // the layers' outputs, the ReLU masks, two dz buffers used in turn, the bias gradient and,
    // for batches longer than one K block, the weight gradient's partial sums.
    int64_t bytes = 0;
    auto carve = [&](int64_t n) {
      const int64_t at = bytes;
      bytes += div_up(n, 64) * 64;  // keeps every buffer 64-byte aligned
      return at;
    };
    const int64_t M = max_rows;
    std::vector<int64_t> out_at(L_), mask_at(L_);
    int64_t widest = 0, largest = 0;
    for (size_t l = 0; l < L_; ++l) {
      out_at[l] = carve(M * width(l) * int64_t(sizeof(T)));
      if (l + 1 < L_) mask_at[l] = carve(M * div_up(width(l), 8));
      widest = std::max(widest, width(l));
      largest = std::max(largest, weights[l].numel());
    }
    const int64_t dz_at[2] = {carve(M * widest * int64_t(sizeof(T))), carve(M * widest * int64_t(sizeof(T)))};
    const int64_t gb_at = carve(widest * int64_t(sizeof(T)));
    // The AMX dW lands in `partial` whatever the batch, and its update follows (update_weight).
    const bool partial = M > k_block_ || amx_;
    const int64_t partial_at = partial ? carve(largest * int64_t(sizeof(T))) : 0;
    const int64_t stage_at = bf16 && !amx_ ? carve(M * fan_in(0) * int64_t(sizeof(T))) : 0;
    std::vector<int64_t> shadow_at;  // bf16: the rounded weights (not with AMX), then the rounded biases
    if (bf16)
      for (size_t i = 0; i < L_ + biases.size(); ++i) {
        const int64_t n = (i < L_ ? weights[i] : biases[i - L_]).numel();
        shadow_at.push_back(i < L_ && amx_ ? -1 : carve(n * int64_t(sizeof(T))));
      }
    workspace_ = at::empty({bytes}, opts.dtype(at::kByte));
    uint8_t* base = workspace_.mutable_data_ptr<uint8_t>();
    auto buffer = [&](int64_t at) { return reinterpret_cast<T*>(base + at); };
    out_.assign(L_, nullptr);
    masks_.assign(L_, nullptr);
    for (size_t l = 0; l < L_; ++l) {
      out_[l] = buffer(out_at[l]);
      if (l + 1 < L_) masks_[l] = base + mask_at[l];
      w_.push_back(weights[l].const_data_ptr<T>());
      b_.push_back(has_bias_ ? biases[l].const_data_ptr<T>() : nullptr);
    }
    dz_[0] = buffer(dz_at[0]), dz_[1] = buffer(dz_at[1]);
    gb_ = buffer(gb_at);
    partial_ = partial ? buffer(partial_at) : nullptr;
    if (bf16 && !amx_) x_stage_ = buffer(stage_at);
    for (size_t i = 0; i < shadow_at.size(); ++i) {
      const Tensor& p = i < L_ ? weights[i] : biases[i - L_];
      shadow_.push_back(shadow_at[i] < 0 ? nullptr : buffer(shadow_at[i]));
      if (shadow_.back()) k_.round_bf16(p.const_data_ptr<T>(), shadow_.back(), p.numel());
    }
  }

  // One step on the M (<= max_rows) samples x (M x in_features, contiguous) with labels target;
  // updates[i] is the update of parameter i (the weights, then the biases). Returns the loss.
  double step(const T* x, const int64_t* target, int64_t M, const std::vector<Update<T>>& updates) {
    const size_t L = L_;
    if (bf16_ && !amx_) {  // x rounded to bfloat16, in a buffer the step's GEMMs then find in cache
      // A pass over memory, split between the threads from 16K elements (a batch of 64 images) on.
      const int64_t n = M * fan_in(0);
      if (threads_for(n, kParallelElems / 4) == 1) {
        k_.round_bf16(x, x_stage_, n);
      } else {
        at::parallel_for(0, n, kParallelElems / 8, [&](int64_t lo, int64_t hi) {
          k_.round_bf16(x + lo, x_stage_ + lo, hi - lo);
        });
      }
      x = x_stage_;
    }
    // The GEMMs' weights and biases: the parameters, or their rounded copies (bf16).
    auto weight = [&](size_t l) { return bf16_ ? shadow_[l] : w_[l]; };
    auto bias = [&](size_t l) { return bf16_ && has_bias_ ? shadow_[L + l] : b_[l]; };
    auto with_shadow = [&](size_t i) {
      Update<T> u = updates[i];
      if (bf16_) u.shadow = shadow_[i];
      return u;
    };
    // Forward: the input of layer l is x or the output of layer l - 1; masks[l] is the ReLU mask
    // of its output.
    auto input = [&](size_t l) -> const T* { return l == 0 ? x : out_[l - 1]; };
    for (size_t l = 0; l < L; ++l) {
      const int64_t N = width(l), K = fan_in(l);
      if (amx_) {
        amx_gemm(M, K, N, input(l), K, 1, w_[l], 1, K, out_[l], bias(l), nullptr, l + 1 < L, masks_[l]);
        continue;
      }
      gemm(layer_forward<T>(M, K, N, input(l), weight(l), bias(l), out_[l], l + 1 < L, masks_[l]));
    }

    int which = 0;
    T* dz = dz_[which];
    const double loss = cross_entropy<T>(out_[L - 1], target, M, width(L - 1), dz);
    if (bf16_) k_.round_bf16(dz, dz, M * width(L - 1));

    for (size_t l = L; l-- > 0;) {
      const int64_t N = width(l), K = fan_in(l);
      if (has_bias_) {
        run_drelu_bias_grad<T>(k_, M, N, dz, nullptr, 0, nullptr, gb_);
        if (bf16_) k_.round_bf16(gb_, gb_, N);
        k_.apply_update(with_shadow(L + l), N, gb_);
      }
      T* dz_prev = nullptr;
      if (l > 0) {  // dz of the layer below = (dz @ w) masked by that layer's ReLU; uses w before its update
        which = 1 - which;
        dz_prev = dz_[which];
        if (amx_) {
          amx_gemm(M, N, K, dz, N, 1, w_[l], K, 1, dz_prev, nullptr, masks_[l - 1], false, nullptr);
        } else {
          gemm(layer_grad_input<T>(M, K, N, dz, weight(l), dz_prev, masks_[l - 1]));
        }
      }
      if (amx_) {  // dW = dz.T @ input(l) on the tiles into `partial`, then the update
        amx_gemm(N, M, K, dz, 1, N, input(l), K, 1, partial_, nullptr, nullptr, false, nullptr);
        update_weight(updates[l], N, K, partial_);
      } else {  // the update of w from dz.T @ input(l), without materialising the gradient
        // Partial sums park in C between K blocks; one block needs no C at all.
        Gemm<T> g = layer_grad_weight<T>(M, K, N, dz, input(l), M > k_block_ ? partial_ : nullptr);
        g.update = with_shadow(l);
        gemm(g);
      }
      dz = dz_prev;
    }
    return loss;
  }

 private:
  // g on the float32 kernels, its result rounded to bfloat16 in a bf16 step.
  void gemm(Gemm<T> g) {
    g.round_bf16 = bf16_;
    g.k_block = k_block_;
    run_gemm(k_, g);
  }

  // C (rows x cols, contiguous, bf16-rounded float32) = A @ B on AMX tiles: A(i, p) = a[i * a_rs + p * a_cs],
  // B(p, j) = b[p * b_rs + j * b_cs], both float32 rounded while packed; then + bias, the input mask,
  // ReLU and its mask (see GemmLow).
  void amx_gemm(int64_t rows, int64_t inner, int64_t cols, const T* a, int64_t a_rs, int64_t a_cs, const T* b,
                int64_t b_rs, int64_t b_cs, T* c, const T* bias, const uint8_t* mask_in, bool relu, uint8_t* mask) {
    if constexpr (std::is_same_v<T, float>) {
      GemmLow g = gemm_low(rows, inner, cols, a, a_rs, a_cs, true, b, b_rs, b_cs, true);
      g.c32 = c, g.ldc = cols, g.round_c32 = true;
      g.bias = bias;
      g.mask_in = mask_in, g.ldm_in = div_up(cols, 8);
      g.relu = relu;
      g.mask = mask, g.ldm = div_up(cols, 8);
      run_gemm_amx(*amx_, g);
    }
  }

  // u applied to the N x K weight from its gradient g, rows split between the threads.
  void update_weight(const Update<T>& u, int64_t N, int64_t K, const T* g) {
    auto rows = [&](int64_t lo, int64_t hi) {
      Update<T> part = u;
      auto at = [&](T* p) { return p ? p + lo * K : nullptr; };
      part.param = at(u.param), part.buf = at(u.buf), part.buf2 = at(u.buf2);
      k_.apply_update(part, (hi - lo) * K, g + lo * K);
    };
    if (threads_for(N * K, kParallelElems) == 1) rows(0, N);
    else at::parallel_for(0, N, div_up(N, at::get_num_threads()), rows);
  }

  int64_t width(size_t l) const { return weights_[l].size(0); }  // outputs of layer l
  int64_t fan_in(size_t l) const { return weights_[l].size(1); }

  const KernelTable<T>& k_;
  // Every GEMM of the call uses this K block: the dW of a batch longer than it parks its partial sums
  // in `partial_`, which exists only if the batch is.
  const int64_t k_block_ = k_block_of(k_);
  at::TensorList weights_;
  bool has_bias_;
  size_t L_;
  bool bf16_;
  const AmxKernels* amx_;  // bf16 on AMX tiles, or null
  Tensor workspace_;
  std::vector<const T*> w_, b_;
  std::vector<T*> out_;  // the layers' outputs (activations; the last one the logits)
  std::vector<uint8_t*> masks_;
  T* dz_[2] = {nullptr, nullptr};
  T* gb_ = nullptr;
  T* partial_ = nullptr;
  T* x_stage_ = nullptr;  // bf16: the step's x, rounded
  std::vector<T*> shadow_;  // bf16: the rounded weights, then the rounded biases
};

// Runs steps over the consecutive batches of `batch` rows of x (the last one shorter when batch does
// not divide them), in x's dtype (bf16: see the top of the file), with one update of `kind` per
// parameter (the weights, then the biases): fill(u, i, s) sets the optimizer's fields of parameter
// i's update for step s once its kind and param are set. Returns each step's loss.
template <class Fill>
std::vector<double> run_steps(const char* op, UpdateKind kind, const Tensor& x_, const Tensor& target_,
                              int64_t batch, bool bf16, at::TensorList weights, at::TensorList biases, Fill fill) {
  const Tensor x = x_.contiguous(), target = target_.contiguous();
  check_targets(op, target, weights.back().size(0));
  const int64_t rows = x.size(0), in = x.size(1), count = div_up(rows, batch);
  std::vector<double> losses(count);
  auto run = [&](auto zero) {
    using T = decltype(zero);
    const size_t L = weights.size();
    std::vector<Update<T>> updates(L + biases.size());
    for (size_t i = 0; i < updates.size(); ++i) {
      updates[i].kind = kind;
      updates[i].param = (i < L ? weights[i] : biases[i - L]).template mutable_data_ptr<T>();
    }
    Stepper<T> stepper(weights, biases, std::min(batch, rows), x.options(), bf16);
    const T* xs = x.const_data_ptr<T>();
    const int64_t* ts = target.const_data_ptr<int64_t>();
    for (int64_t s = 0; s < count; ++s) {
      for (size_t i = 0; i < updates.size(); ++i) fill(updates[i], i, s);
      const int64_t lo = s * batch, M = std::min(batch, rows - lo);
      losses[s] = stepper.step(xs + lo * in, ts + lo, M, updates);
    }
  };
  x.scalar_type() == at::kDouble ? run(double(0)) : run(float(0));
  return losses;
}

// bf16 arithmetic is for float32 parameters (the master weights).
void check_bf16(const char* op, const Tensor& x, bool bf16) {
  TORCH_CHECK(!bf16 || x.scalar_type() == at::kFloat, op, ": bf16=True needs float32 x and parameters, got ",
              x.scalar_type());
}

// The per-step fields of SGD's update of parameter i (of L weights and their biases) at rate lr.
template <typename T>
void fill_sgd(Update<T>& u, size_t i, size_t L, at::TensorList wbufs, at::TensorList bbufs, double lr,
              double momentum, double weight_decay) {
  if (momentum != 0) u.buf = (i < L ? wbufs[i] : bbufs[i - L]).template mutable_data_ptr<T>();
  u.lr = T(lr), u.momentum = T(momentum), u.weight_decay = T(weight_decay);
}

// Adam's fields for parameter i at rate lr and its step t (counting from 1): bias corrections in
// double, as torch.optim.Adam computes them.
template <typename T>
void fill_adam(Update<T>& u, size_t i, at::TensorList exp_avgs, at::TensorList exp_avg_sqs, double t, double lr,
               double beta1, double beta2, double eps, double weight_decay, bool decoupled) {
  u.buf = exp_avgs[i].template mutable_data_ptr<T>();
  u.buf2 = exp_avg_sqs[i].template mutable_data_ptr<T>();
  u.lr = T(lr), u.weight_decay = T(weight_decay), u.decoupled = decoupled;
  u.decay_factor = T(1 - lr * weight_decay);
  u.one_minus_beta1 = T(1 - beta1), u.beta2 = T(beta2), u.one_minus_beta2 = T(1 - beta2), u.eps = T(eps);
  u.step_size = T(lr / (1 - std::pow(beta1, t)));
  u.bc2_sqrt = T(std::sqrt(1 - std::pow(beta2, t)));
}

// Each parameter's Adam step count before the call (the counts are written back only once every
// step has succeeded).
std::vector<double> adam_counts(at::TensorList steps) {
  std::vector<double> t(steps.size());
  for (size_t i = 0; i < steps.size(); ++i) t[i] = steps[i].item<double>();
  return t;
}

// The counts after `taken` more steps, written as an optimizer step writes them: without autograd
// (a step count that requires grad is no error, as for the parameters); inference tensors were
// refused by check_adam_args before any update.
void write_counts(at::TensorList steps, const std::vector<double>& t, double taken) {
  const at::NoGradGuard no_grad;
  for (size_t i = 0; i < steps.size(); ++i) steps[i].fill_(t[i] + taken);
}

// The losses as a tensor of x's dtype, one per step.
Tensor loss_tensor(const std::vector<double>& losses, const Tensor& x) {
  return at::tensor(losses, x.options().dtype(at::kDouble)).to(x.scalar_type());
}

Tensor mlp_sgd_step(const Tensor& x, const Tensor& target, at::TensorList weights, at::TensorList biases,
                    at::TensorList wbufs, at::TensorList bbufs, double lr, double momentum, double weight_decay,
                    const std::optional<Tensor>& lr_scale, bool bf16) {
  check_step_args(kSgdOp, x, target, weights, biases, wbufs, bbufs, momentum, lr_scale);
  check_bf16(kSgdOp, x, bf16);
  if (lr_scale.has_value()) lr *= lr_scale->item<double>();
  const size_t L = weights.size();
  const auto losses =
      run_steps(kSgdOp, UpdateKind::kSgd, x, target, x.size(0), bf16, weights, biases,
                [&](auto& u, size_t i, int64_t) { fill_sgd(u, i, L, wbufs, bbufs, lr, momentum, weight_decay); });
  return at::scalar_tensor(losses[0], x.options());
}

Tensor mlp_adam_step(const Tensor& x, const Tensor& target, at::TensorList weights, at::TensorList biases,
                     at::TensorList exp_avgs, at::TensorList exp_avg_sqs, at::TensorList steps, double lr,
                     double beta1, double beta2, double eps, double weight_decay, bool decoupled_weight_decay,
                     const std::optional<Tensor>& lr_scale, bool bf16) {
  check_adam_args(kAdamOp, x, target, weights, biases, exp_avgs, exp_avg_sqs, steps, beta1, beta2, eps, lr_scale);
  check_bf16(kAdamOp, x, bf16);
  if (lr_scale.has_value()) lr *= lr_scale->item<double>();
  const std::vector<double> t = adam_counts(steps);
  const auto losses = run_steps(kAdamOp, UpdateKind::kAdam, x, target, x.size(0), bf16, weights, biases,
                                [&](auto& u, size_t i, int64_t) {
                                  fill_adam(u, i, exp_avgs, exp_avg_sqs, t[i] + 1, lr, beta1, beta2, eps,
                                            weight_decay, decoupled_weight_decay);
                                });
  write_counts(steps, t, 1);
  return at::scalar_tensor(losses[0], x.options());
}

Tensor mlp_sgd_steps(const Tensor& x, const Tensor& target, int64_t batch_size, at::TensorList weights,
                     at::TensorList biases, at::TensorList wbufs, at::TensorList bbufs, at::ArrayRef<double> lrs,
                     double momentum, double weight_decay, bool bf16) {
  check_step_args(kSgdStepsOp, x, target, weights, biases, wbufs, bbufs, momentum, std::nullopt);
  check_bf16(kSgdStepsOp, x, bf16);
  check_batches(kSgdStepsOp, x, batch_size, lrs);
  const size_t L = weights.size();
  return loss_tensor(run_steps(kSgdStepsOp, UpdateKind::kSgd, x, target, batch_size, bf16, weights, biases,
                               [&](auto& u, size_t i, int64_t s) {
                                 fill_sgd(u, i, L, wbufs, bbufs, lrs[s], momentum, weight_decay);
                               }),
                     x);
}

Tensor mlp_adam_steps(const Tensor& x, const Tensor& target, int64_t batch_size, at::TensorList weights,
                      at::TensorList biases, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                      at::TensorList steps, at::ArrayRef<double> lrs, double beta1, double beta2, double eps,
                      double weight_decay, bool decoupled_weight_decay, bool bf16) {
  check_adam_args(kAdamStepsOp, x, target, weights, biases, exp_avgs, exp_avg_sqs, steps, beta1, beta2, eps,
                  std::nullopt);
  check_bf16(kAdamStepsOp, x, bf16);
  check_batches(kAdamStepsOp, x, batch_size, lrs);
  const std::vector<double> t = adam_counts(steps);
  Tensor losses = loss_tensor(run_steps(kAdamStepsOp, UpdateKind::kAdam, x, target, batch_size, bf16, weights, biases,
                                        [&](auto& u, size_t i, int64_t s) {
                                          fill_adam(u, i, exp_avgs, exp_avg_sqs, t[i] + double(s + 1), lrs[s],
                                                    beta1, beta2, eps, weight_decay, decoupled_weight_decay);
                                        }),
                              x);
  write_counts(steps, t, double(lrs.size()));
  return losses;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmlp, CPU, m) {
  m.impl("mlp_sgd_step", &mlp_sgd_step);
  m.impl("mlp_adam_step", &mlp_adam_step);
  m.impl("mlp_sgd_steps", &mlp_sgd_steps);
  m.impl("mlp_adam_steps", &mlp_adam_steps);
}

}  // namespace fastmlp::cpu
