// CUDA implementation of fastmlp::mlp_sgd_step (schema and semantics: csrc/ops.cpp; the CPU twin is
// csrc/cpu/mlp_step.cpp): one whole SGD training step of an MLP as a fixed sequence of launches on
// the current stream, with no host synchronisation anywhere, so that the step can be captured in a
// CUDA graph (fastmlp.CUDAGraphStep) and replayed with one launch. For L layers:
//   forward   L GEMMs, each writing its activation and ReLU mask (bias + ReLU in the epilogue);
//   loss      1 kernel: softmax cross-entropy, its gradient and the last layer's bias gradient;
//   backward  per layer a dW GEMM and, below the top layer, a dX GEMM followed by the fused
//             ReLU-backward + bias-gradient pass;
//   update    1 multi-tensor kernel applies torch.optim.SGD's update to every parameter, after all
//             gradients exist (the dX GEMMs need the weights as they were in the forward pass); with
//             lr_scale the learning rate is read from the device, so a captured graph can follow an
//             LR schedule without being captured again.
// That is 4L launches (a bias gradient over more than 128 rows adds one): 12 for 784-128-64-10, 8
// for 784-256-10.
//
// A target outside [0, classes) cannot raise an exception without a host synchronisation; instead
// the loss comes back NaN and the update kernel leaves every parameter and momentum buffer as it was.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>

#include <vector>

#include "launch.h"
#include "ops_impl.h"

namespace fastmlp::cuda {

namespace {

using at::Tensor;

template <typename T>
Tensor step(const Tensor& x_, const Tensor& target_, at::TensorList weights, at::TensorList biases,
            at::TensorList wbufs, at::TensorList bbufs, T lr, T momentum, T weight_decay, const Tensor& lr_scale) {
  const Launch lc = launch_config(x_.scalar_type());
  const Tensor x = x_.contiguous(), target = target_.contiguous();
  const int64_t M = x.size(0);
  const size_t L = weights.size();
  const bool has_bias = !biases.empty();
  const bool with_momentum = momentum != T(0);
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
  Tensor loss = at::empty({}, opts);
  Tensor bad = at::empty({1}, opts.dtype(at::kInt));
  std::vector<Tensor> gw(L), gb(L);
  if (has_bias) gb[L - 1] = at::empty({C}, opts);
  softmax_xent(M, C, cptr<T>(h[L]), cptr<int64_t>(target), mptr<T>(dz), has_bias ? mptr<T>(gb[L - 1]) : nullptr,
               mptr<T>(loss), mptr<int32_t>(bad), lc.stream);

  // Backward, top layer first. Weights are not touched until every gradient exists.
  const int64_t parts = bias_grad_partials(M);
  Tensor partial;
  for (size_t l = L; l-- > 0;) {
    const Tensor& w = weights[l];
    const int64_t N = w.size(0), K = w.size(1);
    gw[l] = at::empty({N, K}, opts);
    gemm<T>(grad_weight_gemm<T>(M, N, K, cptr<T>(dz), cptr<T>(h[l]), mptr<T>(gw[l])), lc);
    if (l == 0) break;
    // dz of the layer below: (dz @ w) through that layer's ReLU, and its bias gradient.
    Tensor dh = at::empty({M, K}, opts), dz_prev = at::empty({M, K}, opts);
    gemm<T>(grad_input_gemm<T>(M, N, K, cptr<T>(dz), cptr<T>(w), mptr<T>(dh)), lc);
    if (has_bias) {
      gb[l - 1] = at::empty({K}, opts);
      if (parts > 1 && !partial.defined()) {
        int64_t widest = 0;
        for (const Tensor& v : weights) widest = std::max<int64_t>(widest, v.size(0));
        partial = at::empty({parts * widest}, opts);
      }
    }
    drelu_bias_grad(M, K, cptr<T>(dh), cptr<uint8_t>(masks[l - 1]), div_up(K, 8), mptr<T>(dz_prev),
                    has_bias ? mptr<T>(gb[l - 1]) : nullptr, partial.defined() ? mptr<T>(partial) : nullptr,
                    lc.stream);
    dz = dz_prev;
  }

  // Update every parameter in one launch, unless a target was out of range.
  std::vector<SgdTensor<T>> tensors;
  auto add = [&](const Tensor& p, const Tensor* buf, const Tensor& g) {
    tensors.push_back({static_cast<T*>(p.mutable_data_ptr()),
                       buf != nullptr ? static_cast<T*>(buf->mutable_data_ptr()) : nullptr, cptr<T>(g), p.numel()});
  };
  for (size_t l = 0; l < L; ++l) {
    add(weights[l], with_momentum ? &wbufs[l] : nullptr, gw[l]);
    if (has_bias) add(biases[l], with_momentum ? &bbufs[l] : nullptr, gb[l]);
  }
  sgd_update(tensors.data(), static_cast<int>(tensors.size()), lr, lr_scale.defined() ? cptr<T>(lr_scale) : nullptr,
             momentum, weight_decay, cptr<int32_t>(bad), lc.num_sms, lc.stream);
  return loss;
}

}  // namespace

Tensor mlp_sgd_step_impl(const Tensor& x, const Tensor& target, at::TensorList weights, at::TensorList biases,
                         at::TensorList wbufs, at::TensorList bbufs, double lr, double momentum, double weight_decay,
                         const Tensor& lr_scale) {
  const c10::cuda::CUDAGuard guard(x.device());
  if (x.scalar_type() == at::kDouble)
    return step<double>(x, target, weights, biases, wbufs, bbufs, lr, momentum, weight_decay, lr_scale);
  return step<float>(x, target, weights, biases, wbufs, bbufs, float(lr), float(momentum), float(weight_decay),
                     lr_scale);
}

}  // namespace fastmlp::cuda
