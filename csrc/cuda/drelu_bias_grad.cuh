// The ReLU backward fused with the bias gradient: dz = gy masked by the 1-bit ReLU mask, and the
// column sums of dz, in one pass over gy. Deterministic: a fixed reduction tree with no atomics.
//
// Pass 1 (drelu_colsum_kernel): block (32, 8) handles 32 columns (one per lane: each warp reads
// 32 consecutive elements of a row, coalesced) of one chunk of chunk_rows(rows) rows; thread
// (x, y) visits rows y, y + 8, ... of the chunk in order, then the 8 row-partial sums are added
// in order y = 0..7. With one chunk the result is the bias gradient; otherwise each chunk writes
// its sums to partial[chunk][col] and pass 2 (bias_grad_finish_kernel) adds the chunks in order.
// The chunking depends only on `rows`, so the result is bitwise reproducible.
#pragma once

#include <algorithm>

#include "common.cuh"

namespace fastmlp::cuda {

inline constexpr int kCols = 32;        // columns per block (one per lane)
inline constexpr int kRowLanes = 8;     // rows visited in parallel per block
inline constexpr int64_t kChunk = 128;  // rows per chunk, at least (grid.y is limited to 65535)

inline int64_t chunk_rows(int64_t rows) { return std::max<int64_t>(kChunk, div_up(rows, 65535)); }

// What the launcher runs for a (rows, cols) gy, given which outputs are wanted.
struct BiasGradPlan {
  int64_t chunk = 0;     // rows per chunk (pass 1 grid.y = parts)
  int64_t parts = 0;     // row chunks; partial sums needed when > 1
  bool pass1 = false;    // drelu_colsum_kernel runs (there are rows, and dz or gb is wanted)
  bool direct = false;   // pass 1 writes gb itself (one chunk)
  bool finish = false;   // bias_grad_finish_kernel runs (gb wanted and parts != 1; parts == 0 -> zeros)
};

inline BiasGradPlan bias_grad_plan(int64_t rows, int64_t cols, bool want_dz, bool want_gb) {
  BiasGradPlan p;
  if (cols <= 0 || !(want_dz || want_gb)) return p;
  p.chunk = chunk_rows(rows);
  p.parts = rows <= 0 ? 0 : div_up(rows, p.chunk);
  p.pass1 = p.parts > 0;
  p.direct = want_gb && p.parts == 1;
  p.finish = want_gb && p.parts != 1;
  return p;
}

template <typename T>
__global__ void __launch_bounds__(kCols* kRowLanes)
    drelu_colsum_kernel(int64_t rows, int64_t cols, int64_t chunk, const T* __restrict__ gy,
                        const uint8_t* __restrict__ mask, int64_t ldm, T* __restrict__ dz,
                        T* __restrict__ gb, acc_t<T>* __restrict__ partial) {
  using Acc = acc_t<T>;
  __shared__ Acc sums[kRowLanes][kCols + 1];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t col = int64_t(blockIdx.x) * kCols + tx;
  const int64_t r0 = int64_t(blockIdx.y) * chunk;
  const int64_t r1 = r0 + chunk < rows ? r0 + chunk : rows;
  Acc sum = Acc(0);
  if (col < cols) {
    for (int64_t i = r0 + ty; i < r1; i += kRowLanes) {
      T v = gy[i * cols + col];
      if (mask != nullptr && ((mask[i * ldm + (col >> 3)] >> (col & 7)) & 1) == 0) v = zero<T>();
      if (dz != nullptr) dz[i * cols + col] = v;
      sum += to_acc(v);
    }
  }
  if (gb == nullptr && partial == nullptr) return;  // kernel arguments: the whole block returns
  sums[ty][tx] = sum;
  __syncthreads();
  if (ty == 0 && col < cols) {
    Acc total = Acc(0);
#pragma unroll
    for (int y = 0; y < kRowLanes; ++y) total += sums[y][tx];
    if (partial != nullptr) {
      partial[int64_t(blockIdx.y) * cols + col] = total;
    } else {
      gb[col] = from_acc<T>(total);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(256)
    bias_grad_finish_kernel(int64_t parts, int64_t cols, const acc_t<T>* __restrict__ partial,
                            T* __restrict__ gb) {
  const int64_t col = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col >= cols) return;
  acc_t<T> total = acc_t<T>(0);
  for (int64_t p = 0; p < parts; ++p) total += partial[p * cols + col];
  gb[col] = from_acc<T>(total);
}

}  // namespace fastmlp::cuda
