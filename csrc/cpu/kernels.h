// Interface between the ATen-facing ops (csrc/cpu/*.cpp) and the per-ISA kernels.
//
// The kernels work on raw pointers only and never include ATen, so each ISA translation unit can be
// compiled for its own instruction set (see gemm_avx512.cpp) without leaking wide instructions into
// code shared with the rest of the process.
#pragma once

#include <cstdint>

namespace fastmlp::cpu {

// An optimizer update of a parameter p from its finished gradient g, elementwise, as torch.optim
// makes it (learning rates and bias corrections already folded into the scalars):
//   SGD   g += weight_decay * p; buf = momentum * buf + g (only when momentum != 0); p -= lr * buf
//   Adam  g += weight_decay * p (Adam), or p *= 1 - lr * weight_decay first (AdamW, `decoupled`);
//         buf = lerp(buf, g, 1 - beta1); buf2 = beta2 * buf2 + (1 - beta2) * g * g;
//         p -= step_size * buf / (sqrt(buf2) / bc2_sqrt + eps)
//         with step_size = lr / (1 - beta1^t) and bc2_sqrt = sqrt(1 - beta2^t) at step t.
enum class UpdateKind : uint8_t { kNone, kSgd, kAdam };

template <typename T>
struct Update {
  UpdateKind kind = UpdateKind::kNone;
  T* param = nullptr;
  T* buf = nullptr;   // SGD: momentum buffer (unused when momentum == 0); Adam: exp_avg
  T* buf2 = nullptr;  // Adam: exp_avg_sq
  T lr = 0, weight_decay = 0;
  T momentum = 0;  // SGD
  // Adam. 1 - beta is computed before rounding to T, as torch does (1 - float(0.999) is off by 1e-5).
  T one_minus_beta1 = 0, beta2 = 0, one_minus_beta2 = 0, eps = 0;
  T step_size = 0, bc2_sqrt = 1;  // for this step
  bool decoupled = false;         // AdamW's weight decay: p *= decay_factor (1 - lr * weight_decay)
  T decay_factor = 1;
  // float32 only: the updated parameter is also stored here rounded to bfloat16 (the operand copy the
  // bf16 whole step's next GEMMs read; shaped like param).
  T* shadow = nullptr;
};

// C(i, j) = sum_p A(i, p) * B(p, j), for a rectangular block of C.
//   A(i, p) = a[i * a_rs + p * a_cs]   (any strides: A is only ever broadcast element by element)
//   B(p, j) = b[p * b_rs + j * b_cs]   (packed into cache-sized panels by the kernel itself)
//   C(i, j) = c[i * ldc + j]
// Optional epilogues on the finished sums, in this order:
//   + bias[j];
//   keep only where an input mask bit is set (backward through the previous layer's ReLU);
//   ReLU, writing a 1-bit mask (bit (j % 8) of mask[i * ldm + j / 8] set iff the sum is > 0) when
//   mask is given (inference needs none);
//   or, instead of storing C, an optimizer `update` of a parameter shaped like C (its param / buf /
//   buf2 with leading dimension ldc). When inner <= the K block and B's rows are contiguous
//   (b_cs == 1) the gradient never reaches C (c may be null); otherwise C holds it on the way.
// With round_bf16 (float32 only) the finished sum is rounded to bfloat16 after the bias and the input
// mask, before the ReLU tests it: the result of a bf16 GEMM with float32 accumulation.
template <typename T>
struct Gemm {
  int64_t rows = 0, cols = 0, inner = 0;
  const T* a = nullptr;
  int64_t a_rs = 0, a_cs = 0;
  const T* b = nullptr;
  int64_t b_rs = 0, b_cs = 0;
  T* c = nullptr;
  int64_t ldc = 0;
  const T* bias = nullptr;
  bool relu = false;
  uint8_t* mask = nullptr;  // with relu: where the ReLU bits go (null: not written)
  int64_t ldm = 0;
  const uint8_t* mask_in = nullptr;  // same packing as mask, ld = ldm_in
  int64_t ldm_in = 0;
  bool round_bf16 = false;
  Update<T> update;
  // Rows of B per panel (a multiple of 16), or 0: the kernel's own. Speed only: every element of C is
  // summed in the same order whatever the block. run_gemm names the CPU's (k_block_of).
  int64_t k_block = 0;
};

// The forward GEMM of a layer: y (M x N) = x (M x K) @ w.T + bias, x, w and y contiguous, then ReLU
// when `relu` (writing its bits to mask, ld ceil(N / 8), unless mask is null).
template <typename T>
Gemm<T> layer_forward(int64_t M, int64_t K, int64_t N, const T* x, const T* w, const T* bias, T* y, bool relu,
                      uint8_t* mask) {
  Gemm<T> g;
  g.rows = M, g.cols = N, g.inner = K;
  g.a = x, g.a_rs = K, g.a_cs = 1;
  g.b = w, g.b_rs = 1, g.b_cs = K;  // B = w.T
  g.c = y, g.ldc = N;
  g.bias = bias;
  g.relu = relu;
  g.mask = relu ? mask : nullptr;
  g.ldm = (N + 7) / 8;
  return g;
}

// dX of a layer: gx (M x K) = dz (M x N) @ w (N x K), all contiguous; with mask_in (the layer below's
// ReLU bits, ld ceil(K / 8)) only where its bits are set.
template <typename T>
Gemm<T> layer_grad_input(int64_t M, int64_t K, int64_t N, const T* dz, const T* w, T* gx,
                         const uint8_t* mask_in = nullptr) {
  Gemm<T> g;
  g.rows = M, g.cols = K, g.inner = N;
  g.a = dz, g.a_rs = N, g.a_cs = 1;
  g.b = w, g.b_rs = K, g.b_cs = 1;
  g.c = gx, g.ldc = K;
  g.mask_in = mask_in, g.ldm_in = (K + 7) / 8;
  return g;
}

// dW of a layer: gw (N x K) = dz.T @ x, dz (M x N) and x (M x K) contiguous. gw may be null when an
// update consumes the gradient (see Gemm).
template <typename T>
Gemm<T> layer_grad_weight(int64_t M, int64_t K, int64_t N, const T* dz, const T* x, T* gw) {
  Gemm<T> g;
  g.rows = N, g.cols = K, g.inner = M;
  g.a = dz, g.a_rs = 1, g.a_cs = N;
  g.b = x, g.b_rs = K, g.b_cs = 1;
  g.c = gw, g.ldc = K;
  return g;
}

// One instruction set's kernels. Column ranges handed to gemm_block must start at a multiple of
// `col_align` so that no two threads ever write the same mask byte.
template <typename T>
struct KernelTable {
  // Computes C rows [r0, r1) x cols [c0, c1) of the problem.
  void (*gemm_block)(const Gemm<T>& g, int64_t r0, int64_t r1, int64_t c0, int64_t c1);
  // dz = gy where the mask bit is set, else 0; gb[j] = sum_i dz(i, j) over rows [0, rows) for
  // cols [c0, c1). Either of dz / gb may be null. mask == nullptr means "no ReLU" (dz = gy).
  void (*drelu_bias_grad)(int64_t rows, int64_t c0, int64_t c1, const T* gy, int64_t ldg,
                          const uint8_t* mask, int64_t ldm, T* dz, T* gb);
  // g's epilogue (bias, ReLU, mask; no input mask) over rows [r0, r1) of a C that already holds the
  // sums (the vendor GEMM's result, gemm_choice.h).
  void (*finish_rows)(const Gemm<T>& g, int64_t r0, int64_t r1);
  // Applies `u` to n contiguous elements of its param / buf / buf2 from the gradient g.
  void (*apply_update)(const Update<T>& u, int64_t n, const T* g);
  // dst[i] = src[i] rounded to bfloat16 for i < n (src == dst allowed); null in the float64 table.
  void (*round_bf16)(const T* src, T* dst, int64_t n);
  int64_t panel_cols;     // width of one packed B panel (columns a micro-kernel produces at once)
  int64_t rows_per_tile;  // rows of C a micro-kernel produces at once
  int64_t inner_block;    // K block on this CPU; longer sums park partial results in C
  int64_t col_align;   // alignment of column ranges (a multiple of 8)
};

struct AmxKernels;  // amx.h

struct Kernels {
  const char* isa;
  KernelTable<float> f32;
  KernelTable<double> f64;
  // bfloat16 GEMMs on AMX tiles or AVX512-BF16 (amx.h), or null: bf16 then runs on the float32
  // kernels (operands widened).
  const AmxKernels* amx = nullptr;
};

// Defined by each ISA translation unit. The avx512/avx2 ones exist only on x86-64.
const Kernels& kernels_generic();
#if defined(__x86_64__) || defined(_M_X64)
const Kernels& kernels_avx2();
const Kernels& kernels_avx512();
#endif

// The K block of the avx512 float32 GEMM measured best on this kind of CPU (BENCHMARKS.md), or 0 where
// the kernel's own serves.
int64_t avx512_float_k_block();

// A K block for every CPU GEMM instead of each table's inner_block, or 0 for none: a tuning aid (any
// multiple of 16 from 16 to 1024; results are the same bits whatever the block). Starts as
// $FASTMLP_CPU_KBLOCK when that is such a number (0 otherwise: fastmlp/_ops.py warns about a set
// variable it ignored). set_k_block_override returns false for another value.
int64_t k_block_override();
bool set_k_block_override(int64_t k_block);

// The K block a GEMM on table k uses.
template <typename T>
int64_t k_block_of(const KernelTable<T>& k) {
  const int64_t o = k_block_override();
  return o > 0 ? o : k.inner_block;
}

// The table in use: the best the CPU supports, or the one named by $FASTMLP_CPU_ISA / set_isa().
// "amx" is the avx512 tables with the AMX bf16 GEMM; "amx-emulated" the best other tables with the
// same AMX code on an emulator (a testing aid, never chosen by "auto" nor listed as supported).
const Kernels& active_kernels();
// Returns false if `isa` is unknown or not supported by this CPU.
bool set_isa(const char* isa);
// The instruction sets this CPU can run, best first (e.g. "avx512,avx2,generic").
const char* supported_isas();

}  // namespace fastmlp::cpu
