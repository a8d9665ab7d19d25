// CUDA implementation of fastmlp::mlp_sgd_step and mlp_adam_step (schemas and semantics: csrc/ops.cpp;
// the CPU twin is csrc/cpu/mlp_step.cpp): one whole training step of an MLP as a fixed sequence of
// launches on the current stream, with no host synchronisation anywhere, so that the step can be
// captured in a CUDA graph (fastmlp.CUDAGraphStep) and replayed with one launch. For L layers:
//   forward   L GEMMs, each writing its activation and ReLU mask (bias + ReLU in the epilogue);
//   loss      1 kernel: softmax cross-entropy, its gradient and the last layer's bias gradient;
//   backward  per layer a dW GEMM and, below the top layer, a dX GEMM followed by the fused
//             ReLU-backward + bias-gradient pass;
//   update    1 multi-tensor kernel applies torch.optim.SGD's or Adam's update to every parameter,
//             after all gradients exist (the dX GEMMs need the weights as they were in the forward
//             pass); with lr_scale the learning rate is read from the device, so a captured graph
//             can follow an LR schedule without being captured again. Adam with its step counts on
//             the device (capturable) adds 1 launch that advances them.
// That is 4L launches (a bias gradient over more than 128 rows adds one): 12 for 784-128-64-10, 8
// for 784-256-10.
//
// A target outside [0, classes) cannot raise an exception without a host synchronisation; instead
// the loss comes back NaN and the update kernel leaves every parameter and optimizer state as it was
// (Adam step counts kept on the CPU excepted: the host advances them without knowing).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>

#include <vector>

#include "launch.h"
#include "ops_impl.h"

namespace fastmlp::cuda {

namespace {

using at::Tensor;

// The loss, the gradients of every weight and bias, and the flag the update kernels skip on.
struct Grads {
  Tensor loss, bad;
  std::vector<Tensor> gw, gb;
};

template <typename T>
Grads loss_and_grads(const Tensor& x_, const Tensor& target_, at::TensorList weights, at::TensorList biases,
                     const Launch& lc) {
  const Tensor x = x_.contiguous(), target = target_.contiguous();
  const int64_t M = x.size(0);
  const size_t L = weights.size();
  const bool has_bias = !biases.empty();
  const auto opts = x.options();

  // Forward: h[l] is the input of layer l, masks[l] the ReLU mask of its output.
  std::vector<Tensor> h(L + 1), masks(L);
  h[0] = x;
  for (size_t l = 0; l < L; ++l) {
    const Tensor& w = weights[l];
    const int64_t N = w.size(0), K = w.size(1);
    h[l + 1] = at::empty({M, N}, opts);
    const bool relu = l + 1 < L;
    if (relu) masks[l] = at::empty({M, div_up(N, 8)}, opts.dtype(at::kByte));
    gemm<T>(forward_gemm<T>(M, N, K, cptr<T>(h[l]), cptr<T>(w), has_bias ? cptr<T>(biases[l]) : nullptr,
                            mptr<T>(h[l + 1]), relu ? mptr<uint8_t>(masks[l]) : nullptr),
            lc);
  }

  // Loss and the gradient at the logits (plus the top bias gradient).
  const int64_t C = weights[L - 1].size(0);
  Tensor dz = at::empty({M, C}, opts);
  Grads out;
  out.loss = at::empty({}, opts);
  out.bad = at::empty({1}, opts.dtype(at::kInt));
  out.gw.resize(L);
  out.gb.resize(L);
  if (has_bias) out.gb[L - 1] = at::empty({C}, opts);
  softmax_xent(M, C, cptr<T>(h[L]), cptr<int64_t>(target), mptr<T>(dz), has_bias ? mptr<T>(out.gb[L - 1]) : nullptr,
               mptr<T>(out.loss), mptr<int32_t>(out.bad), lc.stream);

  // Backward, top layer first. Weights are not touched until every gradient exists.
  const int64_t parts = bias_grad_partials(M);
  Tensor partial;
  for (size_t l = L; l-- > 0;) {
    const Tensor& w = weights[l];
    const int64_t N = w.size(0), K = w.size(1);
    out.gw[l] = at::empty({N, K}, opts);
    gemm<T>(grad_weight_gemm<T>(M, N, K, cptr<T>(dz), cptr<T>(h[l]), mptr<T>(out.gw[l])), lc);
    if (l == 0) break;
    // dz of the layer below: (dz @ w) through that layer's ReLU, and its bias gradient.
    Tensor dh = at::empty({M, K}, opts), dz_prev = at::empty({M, K}, opts);
    gemm<T>(grad_input_gemm<T>(M, N, K, cptr<T>(dz), cptr<T>(w), mptr<T>(dh)), lc);
    if (has_bias) {
      out.gb[l - 1] = at::empty({K}, opts);
      if (parts > 1 && !partial.defined()) {
        int64_t widest = 0;
        for (const Tensor& v : weights) widest = std::max<int64_t>(widest, v.size(0));
        partial = at::empty({parts * widest}, opts);
      }
    }
    drelu_bias_grad(M, K, cptr<T>(dh), cptr<uint8_t>(masks[l - 1]), div_up(K, 8), mptr<T>(dz_prev),
                    has_bias ? mptr<T>(out.gb[l - 1]) : nullptr, partial.defined() ? mptr<T>(partial) : nullptr,
                    lc.stream);
    dz = dz_prev;
  }
  return out;
}

// A parameter or optimizer-state tensor of a TensorList, which the update writes in place.
template <typename T>
T* ptr_of(const Tensor& t) {
  return static_cast<T*>(t.mutable_data_ptr());
}

template <typename T>
Tensor sgd_step(const Tensor& x, const Tensor& target, at::TensorList weights, at::TensorList biases,
                at::TensorList wbufs, at::TensorList bbufs, T lr, T momentum, T weight_decay, const Tensor& lr_scale) {
  const Launch lc = launch_config(x.scalar_type());
  const Grads gr = loss_and_grads<T>(x, target, weights, biases, lc);
  // Update every parameter in one launch, unless a target was out of range.
  const bool with_momentum = momentum != T(0);
  const size_t L = weights.size();
  std::vector<SgdTensor<T>> tensors;
  for (size_t i = 0; i < L + biases.size(); ++i) {
    const bool w = i < L;
    const size_t l = w ? i : i - L;
    const Tensor& p = w ? weights[l] : biases[l];
    tensors.push_back({ptr_of<T>(p), with_momentum ? ptr_of<T>(w ? wbufs[l] : bbufs[l]) : nullptr,
                       cptr<T>(w ? gr.gw[l] : gr.gb[l]), p.numel()});
  }
  sgd_update(tensors.data(), static_cast<int>(tensors.size()), lr, lr_scale.defined() ? cptr<T>(lr_scale) : nullptr,
             momentum, weight_decay, cptr<int32_t>(gr.bad), lc.num_sms, lc.stream);
  return gr.loss;
}

template <typename T>
Tensor adam_step(const Tensor& x, const Tensor& target, at::TensorList weights, at::TensorList biases,
                 at::TensorList exp_avgs, at::TensorList exp_avg_sqs, at::TensorList steps,
                 const std::vector<double>& host_counts, const AdamHyper<T>& hyper, const Tensor& lr_scale) {
  const Launch lc = launch_config(x.scalar_type());
  const Grads gr = loss_and_grads<T>(x, target, weights, biases, lc);
  const size_t L = weights.size();
  const bool device_steps = host_counts.empty();
  std::vector<AdamTensor<T>> tensors;
  std::vector<StepCount> counts;
  for (size_t i = 0; i < L + biases.size(); ++i) {
    const bool w = i < L;
    const size_t l = w ? i : i - L;
    const Tensor& p = w ? weights[l] : biases[l];
    AdamTensor<T> t;
    t.p = ptr_of<T>(p), t.m = ptr_of<T>(exp_avgs[i]), t.v = ptr_of<T>(exp_avg_sqs[i]);
    t.g = cptr<T>(w ? gr.gw[l] : gr.gb[l]), t.n = p.numel();
    if (device_steps) {
      t.step = {steps[i].mutable_data_ptr(), steps[i].scalar_type() == at::kDouble};
      counts.push_back(t.step);
    } else {
      t.t = host_counts[i];
    }
    tensors.push_back(t);
  }
  // Device counts go up first, so that the update reads this step's count.
  if (device_steps) advance_steps(counts.data(), static_cast<int>(counts.size()), cptr<int32_t>(gr.bad), lc.stream);
  adam_update(tensors.data(), static_cast<int>(tensors.size()), hyper, lr_scale.defined() ? cptr<T>(lr_scale) : nullptr,
              cptr<int32_t>(gr.bad), lc.num_sms, lc.stream);
  return gr.loss;
}

}  // namespace

Tensor mlp_sgd_step_impl(const Tensor& x, const Tensor& target, at::TensorList weights, at::TensorList biases,
                         at::TensorList wbufs, at::TensorList bbufs, double lr, double momentum, double weight_decay,
                         const Tensor& lr_scale) {
  const c10::cuda::CUDAGuard guard(x.device());
  if (x.scalar_type() == at::kDouble)
    return sgd_step<double>(x, target, weights, biases, wbufs, bbufs, lr, momentum, weight_decay, lr_scale);
  return sgd_step<float>(x, target, weights, biases, wbufs, bbufs, float(lr), float(momentum), float(weight_decay),
                         lr_scale);
}

Tensor mlp_adam_step_impl(const Tensor& x, const Tensor& target, at::TensorList weights, at::TensorList biases,
                          at::TensorList exp_avgs, at::TensorList exp_avg_sqs, at::TensorList steps,
                          const std::vector<double>& host_counts, double lr, double beta1, double beta2, double eps,
                          double weight_decay, bool decoupled, const Tensor& lr_scale) {
  const c10::cuda::CUDAGuard guard(x.device());
  auto run = [&](auto zero) {
    using T = decltype(zero);
    const AdamHyper<T> hyper{.lr = T(lr),
                             .beta1 = beta1,
                             .beta2 = beta2,
                             .one_minus_beta1 = T(1 - beta1),
                             .beta2_t = T(beta2),
                             .one_minus_beta2 = T(1 - beta2),
                             .eps = T(eps),
                             .weight_decay = T(weight_decay),
                             .decoupled = decoupled};
    return adam_step<T>(x, target, weights, biases, exp_avgs, exp_avg_sqs, steps, host_counts, hyper, lr_scale);
  };
  return x.scalar_type() == at::kDouble ? run(double(0)) : run(float(0));
}

}  // namespace fastmlp::cuda
