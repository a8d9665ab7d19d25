// Interface between the ATen-facing CUDA ops (linear_ops.cu) and the kernels (gemm_*.cu,
// drelu_bias_grad.cu). Raw pointers and a stream only, so the kernel translation units never
// include ATen. Every launcher checks its launch with C10_CUDA_KERNEL_LAUNCH_CHECK().
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace fastmlp::cuda {

// C(i, j) = sum_p A(i, p) * B(p, j) for i < rows, j < cols, p < inner, then the epilogue.
//   A(i, p) = a[i * a_rs + p * a_cs]
//   B(p, j) = b[p * b_rs + j * b_cs]
//   C(i, j) = c[i * ldc + j]
// Any strides are correct; the kernels coalesce their loads when a_cs == 1 or a_rs == 1 and when
// b_rs == 1 or b_cs == 1 (the three layouts the ops use: x @ w.T, dz @ w, dz.T @ x).
// Epilogue on the float (double for double) sums: + bias[j] (if bias), down-cast to T, then with
// relu: keep the value if it is > 0 (or NaN, like torch.relu), else 0, and set bit (j % 8) of
// mask[i * ldm + j / 8] iff the down-cast value is > 0; bits for j >= cols are 0. The mask is
// therefore exactly packbits(y > 0) of the returned y, whatever the dtype.
// inner == 0 is allowed (C = epilogue(0)); rows == 0 or cols == 0 launches nothing.
template <typename T>
struct GemmArgs {
  int64_t rows = 0, cols = 0, inner = 0;
  const T* a = nullptr;
  int64_t a_rs = 0, a_cs = 0;
  const T* b = nullptr;
  int64_t b_rs = 0, b_cs = 0;
  T* c = nullptr;
  int64_t ldc = 0;
  const T* bias = nullptr;
  bool relu = false;
  uint8_t* mask = nullptr;  // required when relu is set
  int64_t ldm = 0;
  // Split-K scratch for gemm_simt (gemm_simt_workspace() accumulators, fp32/fp64): when the output
  // has too few tiles to fill the GPU, slices of `inner` are summed into it by separate blocks and
  // a second kernel adds the slices in order and applies the epilogue. Null: no split.
  void* workspace = nullptr;
  int64_t split_len = 0;  // set by the launcher
};

// The three GEMMs of the ops, for row-major contiguous x (M, K), w (N, K), dz (M, N):
//   forward      y  = x @ w.T (+ bias, ReLU + mask when mask is not null)   rows M, cols N, inner K
//   grad input   gx = dz @ w                                                rows M, cols K, inner N
//   grad weight  gw = dz.T @ x                                              rows N, cols K, inner M
template <typename T>
GemmArgs<T> forward_gemm(int64_t M, int64_t N, int64_t K, const T* x, const T* w, const T* bias, T* y,
                         uint8_t* mask) {
  GemmArgs<T> g;
  g.rows = M, g.cols = N, g.inner = K;
  g.a = x, g.a_rs = K, g.a_cs = 1;
  g.b = w, g.b_rs = 1, g.b_cs = K;  // B(p, j) = w[j, p]
  g.c = y, g.ldc = N;
  g.bias = bias;
  g.relu = mask != nullptr;
  g.mask = mask;
  g.ldm = (N + 7) / 8;
  return g;
}
template <typename T>
GemmArgs<T> grad_input_gemm(int64_t M, int64_t N, int64_t K, const T* dz, const T* w, T* gx) {
  GemmArgs<T> g;
  g.rows = M, g.cols = K, g.inner = N;
  g.a = dz, g.a_rs = N, g.a_cs = 1;
  g.b = w, g.b_rs = K, g.b_cs = 1;
  g.c = gx, g.ldc = K;
  return g;
}
template <typename T>
GemmArgs<T> grad_weight_gemm(int64_t M, int64_t N, int64_t K, const T* dz, const T* x, T* gw) {
  GemmArgs<T> g;
  g.rows = N, g.cols = K, g.inner = M;
  g.a = dz, g.a_rs = 1, g.a_cs = N;  // A(i, p) = dz[p, i]
  g.b = x, g.b_rs = K, g.b_cs = 1;
  g.c = gw, g.ldc = K;
  return g;
}

// FP32/FP64 CUDA-core GEMM: FMA chains in a fixed summation order per element (split-K: one chain
// per slice of `inner`, the slices then added in order), so results are bitwise reproducible.
void gemm_simt(const GemmArgs<float>& g, int num_sms, cudaStream_t stream);
void gemm_simt(const GemmArgs<double>& g, int num_sms, cudaStream_t stream);
// Accumulators g.workspace must hold for gemm_simt to split K (0: it will not split).
int64_t gemm_simt_workspace(const GemmArgs<float>& g, int num_sms);

// Tensor-core GEMM (WMMA, FP32 accumulation): float16 and bfloat16 (compute capability >= 8.0),
// and float32 inputs rounded to TF32 (only used when the caller allows TF32).
void gemm_tensor_core(const GemmArgs<__half>& g, int num_sms, cudaStream_t stream);
void gemm_tensor_core(const GemmArgs<__nv_bfloat16>& g, int num_sms, cudaStream_t stream);
void gemm_tensor_core(const GemmArgs<float>& g, int num_sms, cudaStream_t stream);  // TF32

// The ReLU backward and bias gradient for a (rows, cols) row-major gy:
//   dz(i, j) = gy(i, j) if mask bit (i, j) is set (or mask is null), else 0   -> written if dz
//   gb(j)    = sum_i dz(i, j), accumulated in acc_t<T>, in a fixed order      -> written if gb
// Deterministic (no atomics): row chunks of a fixed height (a function of rows only) are summed
// into `partial`, then the chunks are summed in order. `partial` must hold
// bias_grad_partials(rows) * cols accumulators; it is unused when that count is <= 1.
// rows == 0 gives gb = 0.
int64_t bias_grad_partials(int64_t rows);
void drelu_bias_grad(int64_t rows, int64_t cols, const float* gy, const uint8_t* mask, int64_t ldm,
                     float* dz, float* gb, float* partial, cudaStream_t stream);
void drelu_bias_grad(int64_t rows, int64_t cols, const double* gy, const uint8_t* mask, int64_t ldm,
                     double* dz, double* gb, double* partial, cudaStream_t stream);
void drelu_bias_grad(int64_t rows, int64_t cols, const __half* gy, const uint8_t* mask, int64_t ldm,
                     __half* dz, __half* gb, float* partial, cudaStream_t stream);
void drelu_bias_grad(int64_t rows, int64_t cols, const __nv_bfloat16* gy, const uint8_t* mask,
                     int64_t ldm, __nv_bfloat16* dz, __nv_bfloat16* gb, float* partial,
                     cudaStream_t stream);

// ReLU in place with its mask (bit j % 8 of mask[i * ceil(cols / 8) + j / 8] set iff y(i, j) > 0;
// mask may be null) over a row-major (rows, cols) y: the epilogue of a vendor GEMM (launch.h).
void relu_mask(int64_t rows, int64_t cols, float* y, uint8_t* mask, cudaStream_t stream);
void relu_mask(int64_t rows, int64_t cols, double* y, uint8_t* mask, cudaStream_t stream);
void relu_mask(int64_t rows, int64_t cols, __half* y, uint8_t* mask, cudaStream_t stream);
void relu_mask(int64_t rows, int64_t cols, __nv_bfloat16* y, uint8_t* mask, cudaStream_t stream);

// ---- inference through a whole MLP (mlp_forward.cu) --------------------------------------------

// y = layer_{L-1}(... layer_0(x)) for x (rows, dims[0]) and w[l] (dims[l + 1], dims[l]), all
// row-major contiguous: each layer x @ w.T + b (b[l] may be null), ReLU after every layer but the
// last, and after the last too when relu_last. The sums are acc_t<T>, each layer's output rounded to
// T, as the layer ops do. One kernel for the whole network; it applies only when mlp_forward_fits().
inline constexpr int kMlpMaxLayers = 8;
inline constexpr int kMlpMaxWidth = 1024;  // widest layer input (dims[0 .. L-1]); the output is free
inline constexpr int kMlpThreads = 256;
template <typename T>
inline constexpr int kMlpRows = sizeof(T) == 8 ? 2 : 4;  // rows per block: 32 KiB of shared memory

template <typename T>
struct MlpForwardArgs {
  int layers = 0;
  int64_t rows = 0;
  int dims[kMlpMaxLayers + 1] = {};
  const T* x = nullptr;
  const T* w[kMlpMaxLayers] = {};
  const T* b[kMlpMaxLayers] = {};
  T* y = nullptr;
  bool relu_last = false;
};

// Whether the one-kernel forward takes this network: up to kMlpMaxLayers layers, inputs of every
// layer at most kMlpMaxWidth wide, and a batch of at most kMlpForwardMaxRows rows. Larger batches go
// through the layer GEMMs, which reuse each weight tile across many rows instead of reading the
// whole network once per block of kMlpRows rows.
inline constexpr int64_t kMlpForwardMaxRows = 64;
bool mlp_forward_fits(int64_t rows, const int64_t* dims, int layers);
void mlp_forward(const MlpForwardArgs<float>& a, cudaStream_t stream);
void mlp_forward(const MlpForwardArgs<double>& a, cudaStream_t stream);
void mlp_forward(const MlpForwardArgs<__half>& a, cudaStream_t stream);
void mlp_forward(const MlpForwardArgs<__nv_bfloat16>& a, cudaStream_t stream);

// ---- the whole training step (mlp_step.cu) ----------------------------------------------------

// Mean softmax cross-entropy of logits (rows, cols) against int64 class indices, in one block:
//   dz(i, j) = (softmax(logits(i))_j - [j == target(i)]) / rows      -> written to dz
//   gb(j)    = sum_i dz(i, j), rows in order                           -> written if gb
//   *loss    = mean_i (logsumexp(logits(i)) - logits(i, target(i)))    (fixed summation order)
//   *bad     = 1 if some target is outside [0, cols), else 0; then *loss is NaN.
// The check costs no host synchronisation, so the step stays capturable in a CUDA graph.
void softmax_xent(int64_t rows, int64_t cols, const float* logits, const int64_t* target, float* dz,
                  float* gb, float* loss, int32_t* bad, cudaStream_t stream);
void softmax_xent(int64_t rows, int64_t cols, const double* logits, const int64_t* target, double* dz,
                  double* gb, double* loss, int32_t* bad, cudaStream_t stream);

// torch.optim.SGD's update (dampening 0, no Nesterov) of many tensors in one launch:
//   d = g + weight_decay * p;  if buf: d = buf = momentum * buf + d;  p -= lr * d
// with lr multiplied by *lr_scale when lr_scale is not null. Nothing is written when *skip != 0
// (skip may be null).
template <typename T>
struct SgdTensor {
  T* p = nullptr;
  T* buf = nullptr;  // momentum buffer, or null for momentum 0
  const T* g = nullptr;
  int64_t n = 0;
};
void sgd_update(const SgdTensor<float>* tensors, int count, float lr, const float* lr_scale, float momentum,
                float weight_decay, const int32_t* skip, int num_sms, cudaStream_t stream);
void sgd_update(const SgdTensor<double>* tensors, int count, double lr, const double* lr_scale, double momentum,
                double weight_decay, const int32_t* skip, int num_sms, cudaStream_t stream);

// torch.optim.Adam's update (AdamW's with `decoupled`; no AMSGrad) of many tensors in one launch, with
// lr multiplied by *lr_scale when lr_scale is not null and nothing written when *skip != 0:
//   if weight_decay: decoupled ? p *= 1 - lr * weight_decay : g += weight_decay * p
//   m = lerp(m, g, 1 - beta1);  v = beta2 * v + (1 - beta2) * g * g
//   p -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
// where t, this step's count, is read from the device (`step`, already advanced) or given (`t`).
// 1 - beta is computed in double before rounding to T, as torch does (1 - float(0.999) is off by 1e-5).
template <typename T>
struct AdamHyper {
  T lr;
  double beta1, beta2;  // for the bias corrections
  T one_minus_beta1, beta2_t, one_minus_beta2, eps, weight_decay;
  bool decoupled;
};
struct StepCount {
  void* p = nullptr;  // a float32 or float64 scalar on the device
  bool is_double = false;
};
template <typename T>
struct AdamTensor {
  T* p = nullptr;
  T* m = nullptr;  // exp_avg
  T* v = nullptr;  // exp_avg_sq
  const T* g = nullptr;
  int64_t n = 0;
  StepCount step;  // when step.p is null: t below
  double t = 0;
};
void adam_update(const AdamTensor<float>* tensors, int count, const AdamHyper<float>& hyper, const float* lr_scale,
                 const int32_t* skip, int num_sms, cudaStream_t stream);
void adam_update(const AdamTensor<double>* tensors, int count, const AdamHyper<double>& hyper,
                 const double* lr_scale, const int32_t* skip, int num_sms, cudaStream_t stream);
// Adds one to each count, unless *skip != 0. One launch per 64 counts.
void advance_steps(const StepCount* counts, int count, const int32_t* skip, cudaStream_t stream);

}  // namespace fastmlp::cuda
