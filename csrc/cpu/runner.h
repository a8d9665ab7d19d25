// Runs the per-ISA kernels over ATen's intra-op thread pool. Shared by the layer ops and the
// whole-step op.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "amx.h"
#include "kernels.h"

namespace fastmlp::cpu {

// a >= 0, b >= 1; no a + b - 1, which overflows for a batch size near INT64_MAX.
inline int64_t div_up(int64_t a, int64_t b) { return a / b + (a % b != 0); }

// Below this much work a GEMM runs on the calling thread: waking the pool costs more. Work counts
// flops plus kEpilogueFlops per element of C: with a short sum the tile set-up and epilogue, not the
// FMAs, are most of a GEMM's time. Both constants are measured per shape (BENCHMARKS.md, 2026-11-29).
inline constexpr int64_t kParallelFlops = int64_t(1) << 18;
inline constexpr int64_t kEpilogueFlops = 64;
// Elementwise passes (dReLU + bias grad) split only above this many elements.
inline constexpr int64_t kParallelElems = int64_t(1) << 16;

inline int threads_for(int64_t work, int64_t threshold) {
  if (work < threshold || at::in_parallel_region()) return 1;
  return std::max(1, at::get_num_threads());
}

// From this many rows of C on (a batch of 2048 samples in the forward and dX) a GEMM is split along
// rows: each thread then streams only its own rows of A, which at that size come from memory, instead
// of every thread streaming all of them for its share of the columns. Below it the column split wins
// (each thread packs only its own panels of B). Measured per shape (BENCHMARKS.md, 2026-12-02).
inline constexpr int64_t kRowSplitRows = 2048;

// Splits C over threads along columns (whole panels, so packed B is never shared and mask bytes
// never straddle threads) or, when there are too few panels to balance or C is tall (kRowSplitRows),
// along rows. A GEMM that applies an optimizer update, or whose sum has at most 4 terms (one streaming
// pass of stores over C, outer_block in gemm_impl.h), is split along rows whenever it can be: each
// thread then writes whole rows, one contiguous block per thread, which the hardware follows far
// better than a strip of every row (and the parameter and its optimizer state stream through the
// same way).
template <typename T>
void run_gemm(const KernelTable<T>& k, const Gemm<T>& g_) {
  Gemm<T> g = g_;
  if (g.k_block == 0) g.k_block = k_block_of(k);
  // A sum of at most 4 terms is one streaming pass over C (outer_block in gemm_impl.h): per element a
  // store, not a micro-tile's set-up and epilogue.
  const int64_t per_element = 2 * std::max<int64_t>(g.inner, 1) + (g.inner <= 4 ? 4 : kEpilogueFlops);
  const int64_t nt = threads_for(g.rows * g.cols * per_element, kParallelFlops);
  if (nt == 1) {
    k.gemm_block(g, 0, g.rows, 0, g.cols);
    return;
  }
  const int64_t panels = div_up(g.cols, k.panel_cols);
  const int64_t row_tiles = div_up(g.rows, k.rows_per_tile);
  // Imbalance of each split: the busiest thread's share over the mean share.
  const double col_imb = double(div_up(panels, nt)) * nt / double(panels);
  const double row_imb = double(div_up(row_tiles, nt)) * nt / double(row_tiles);
  const bool whole_rows = g.update.kind != UpdateKind::kNone || g.inner <= 4;
  const bool by_cols =
      whole_rows ? row_tiles < nt : g.rows < kRowSplitRows && panels >= nt && col_imb <= row_imb;
  const int64_t parts = by_cols ? std::min(nt, panels) : std::min(nt, row_tiles);
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      if (by_cols) {
        const int64_t p0 = panels * t / parts, p1 = panels * (t + 1) / parts;
        k.gemm_block(g, 0, g.rows, p0 * k.panel_cols, std::min(g.cols, p1 * k.panel_cols));
      } else {
        const int64_t r0 = row_tiles * t / parts, r1 = row_tiles * (t + 1) / parts;
        k.gemm_block(g, r0 * k.rows_per_tile, std::min(g.rows, r1 * k.rows_per_tile), 0, g.cols);
      }
    }
  });
}

// The bias gradient of more than this many rows is summed in blocks of this many rows, top to
// bottom within a block, and the blocks' sums are then added in order. The blocks are fixed by the
// row count alone, so the result does not depend on the thread split; they let the pass split along
// rows at a large batch (a split along columns left a gradient 64 or fewer columns wide on one
// thread), as the dX GEMM after it is split there.
inline constexpr int64_t kBiasSumRows = 256;

// dz = gy masked by the ReLU bits (or gy itself when mask is null); gb = column sums of dz.
template <typename T>
void run_drelu_bias_grad(const KernelTable<T>& k, int64_t rows, int64_t cols, const T* gy,
                         const uint8_t* mask, int64_t ldm, T* dz, T* gb) {
  const int64_t nt = threads_for(rows * cols, kParallelElems);
  if (rows > kBiasSumRows) {
    const int64_t blocks = div_up(rows, kBiasSumRows);
    std::vector<T> sums(gb ? blocks * cols : 0);
    auto run = [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const int64_t r0 = b * kBiasSumRows;
        k.drelu_bias_grad(std::min(kBiasSumRows, rows - r0), 0, cols, gy + r0 * cols, cols,
                          mask ? mask + r0 * ldm : nullptr, ldm, dz ? dz + r0 * cols : nullptr,
                          gb ? sums.data() + b * cols : nullptr);
      }
    };
    if (nt == 1) run(0, blocks);
    else at::parallel_for(0, blocks, div_up(blocks, nt), run);
    if (gb) {
      std::copy(sums.begin(), sums.begin() + cols, gb);
      for (int64_t b = 1; b < blocks; ++b)
        for (int64_t j = 0; j < cols; ++j) gb[j] += sums[b * cols + j];
    }
    return;
  }
  const int64_t chunks = div_up(cols, k.col_align);
  if (nt == 1 || chunks < 2) {
    k.drelu_bias_grad(rows, 0, cols, gy, cols, mask, ldm, dz, gb);
    return;
  }
  at::parallel_for(0, chunks, div_up(chunks, nt), [&](int64_t begin, int64_t end) {
    k.drelu_bias_grad(rows, begin * k.col_align, std::min(cols, end * k.col_align), gy, cols, mask,
                      ldm, dz, gb);
  });
}

// A bf16 GEMM on AMX tiles: A packed once (by the calling thread), then the threads take whole
// 32-column panels, each packing its own B panels.
inline void run_gemm_amx(const AmxKernels& k, const GemmLow& g) {
  if (g.rows == 0 || g.cols == 0) return;
  const at::Tensor a = at::empty({amx_pad(g.rows, kAmxRows) * amx_pad(g.inner, kAmxK)}, at::kBFloat16);
  bf16_t* ap = static_cast<bf16_t*>(a.data_ptr());
  k.pack_a(g, ap);
  const int64_t panels = div_up(g.cols, kAmxCols);
  const int64_t nt = std::min(panels, int64_t(threads_for(2 * g.rows * g.cols * std::max<int64_t>(g.inner, 1),
                                                          kParallelFlops)));
  if (nt <= 1) return k.gemm_cols(g, ap, 0, g.cols);
  at::parallel_for(0, nt, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      k.gemm_cols(g, ap, panels * t / nt * kAmxCols, std::min(g.cols, panels * (t + 1) / nt * kAmxCols));
  });
}

template <typename T>
const KernelTable<T>& table();
template <>
inline const KernelTable<float>& table<float>() {
  return active_kernels().f32;
}
template <>
inline const KernelTable<double>& table<double>() {
  return active_kernels().f64;
}

}  // namespace fastmlp::cpu
