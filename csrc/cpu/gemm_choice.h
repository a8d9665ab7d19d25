// The vendor-GEMM safety net of the CPU layer ops (the mode also steers CUDA's: csrc/cuda/launch.h,
// vendor_gemm): a layer GEMM (forward, dX or dW) may be computed by ATen's GEMM (at::mm -> MKL /
// oneDNN / OpenBLAS) with fastmlp's own epilogue (bias, ReLU, 1-bit mask) applied after it, where
// that measures faster than fastmlp's kernel.
//
// Mode, from $FASTMLP_GEMM at the first layer op or from set_gemm_mode():
//   fastmlp  always the hand-written kernels (bitwise reproducible run to run);
//   vendor   ATen's GEMM for every layer GEMM that has one (for comparison and testing);
//   auto     (default) float32/64 GEMMs of at least kTuneFlops at a batch of at least kTuneBatch
//            are timed once per process, both ways, on their own operands; the faster serves that
//            GEMM from then on. Others never leave the hand-written kernels: a training batch (64)
//            must be won on its own (BENCHMARKS.md). bfloat16/float16 GEMMs are timed from a lower
//            size and at any batch (low_precision.cpp).
// Which way won is recorded per (GEMM kind, dtype, batch rounded down to a power of two, the
// layer's two widths, threads, ISA) and listed by gemm_choices() (fastmlp.gemm_choices()); the
// batch is C's rows in the forward and dX GEMMs, the sum's length (inner) in dW. The whole-step
// ops never use the vendor GEMM: their dW carries the fused optimizer update.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "kernels.h"

namespace fastmlp::cpu {

enum class GemmMode : uint8_t { kFastmlp, kVendor, kAuto };

GemmMode gemm_mode();
const char* gemm_mode_name();
bool set_gemm_mode(const char* name);  // false for an unknown name; clears the recorded choices

// Both bounds from measurements (BENCHMARKS.md, 2026-12-02): the narrow layers' gradients at batch
// 1024-8192 (8-134 Mflop) are where the hand-written kernels can lose to the vendor's; batch 64
// never leaves them.
inline constexpr int64_t kTuneFlops = int64_t(1) << 23;  // 2 * rows * cols * inner
inline constexpr int64_t kTuneBatch = 256;

// One tuned GEMM shape and what it measured.
struct GemmChoice {
  std::string kind, dtype, isa;  // isa: the CPU kernels ours() ran on
  int64_t rows, cols, inner;  // of the first problem of its batch bucket [2^k, 2^(k+1))
  int threads;
  double fastmlp_us, vendor_us;  // best of the timed runs
  bool vendor;
};
std::vector<GemmChoice> gemm_choices();

enum class GemmKind : uint8_t { kForward, kGradInput, kGradWeight };

// Computes g (a layer GEMM built by layer_forward / layer_grad_input / layer_grad_weight; one with
// an input mask or an update always runs the hand-written kernel) by the way the mode picks.
// Defined for float and double.
template <typename T>
void run_layer_gemm(const KernelTable<T>& k, const Gemm<T>& g, GemmKind kind);

// The same choice for any pair of ways to compute one layer GEMM (C rows x cols, summed over inner)
// of `dtype` ("float32", "bfloat16", ...): runs ours() or theirs() as the mode and the record say,
// timing both (alternately, on their real operands) the first time "auto" meets a shape of at least
// min_flops. Either must leave the same result (to rounding) in the caller's outputs.
void run_chosen(GemmKind kind, const char* dtype, int64_t rows, int64_t cols, int64_t inner, int64_t min_flops,
                const std::function<void()>& ours, const std::function<void()>& theirs);

}  // namespace fastmlp::cpu
