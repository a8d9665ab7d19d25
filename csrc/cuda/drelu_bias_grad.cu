// The ReLU backward fused with the bias gradient: dz = gy masked by the 1-bit ReLU mask, and the
// column sums of dz, in one pass over gy. Deterministic: a fixed reduction tree with no atomics.
//
// Pass 1 (drelu_colsum_kernel): block (32, 8) handles 32 columns (one per lane: each warp reads
// 32 consecutive elements of a row, coalesced) of one chunk of chunk_rows(rows) rows; thread
// (x, y) visits rows y, y + 8, ... of the chunk in order, then the 8 row-partial sums are added
// in order y = 0..7. With one chunk the result is the bias gradient; otherwise each chunk writes
// its sums to partial[chunk][col] and pass 2 (bias_grad_finish_kernel) adds the chunks in order.
// The chunking depends only on `rows`, so the result is bitwise reproducible.
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include <algorithm>

#include "common.cuh"
#include "kernels.h"

namespace fastmlp::cuda {

namespace {

constexpr int kCols = 32;        // columns per block (one per lane)
constexpr int kRowLanes = 8;     // rows visited in parallel per block
constexpr int64_t kChunk = 128;  // rows per chunk, at least (grid.y is limited to 65535)

int64_t chunk_rows(int64_t rows) { return std::max<int64_t>(kChunk, div_up(rows, 65535)); }

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

template <typename T>
void run(int64_t rows, int64_t cols, const T* gy, const uint8_t* mask, int64_t ldm, T* dz, T* gb,
         acc_t<T>* partial, cudaStream_t stream) {
  if (cols <= 0 || (dz == nullptr && gb == nullptr)) return;
  const int64_t parts = bias_grad_partials(rows);
  if (parts > 0) {
    const bool direct = parts == 1;  // one chunk: pass 1 writes gb itself
    TORCH_CHECK(gb == nullptr || direct || partial != nullptr,
                "fastmlp: drelu_bias_grad needs a workspace of ", parts, " x ", cols, " sums");
    const int64_t gx = div_up(cols, kCols);
    TORCH_CHECK(gx <= 0x7fffffff, "fastmlp: drelu_bias_grad: too many columns (", cols, ")");
    const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(parts)), block(kCols, kRowLanes);
    drelu_colsum_kernel<T><<<grid, block, 0, stream>>>(rows, cols, chunk_rows(rows), gy, mask, ldm, dz,
                                                       direct ? gb : nullptr,
                                                       (gb != nullptr && !direct) ? partial : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (gb != nullptr && parts != 1) {  // parts == 0 (no rows): gb = 0
    const int64_t blocks = div_up(cols, 256);
    TORCH_CHECK(blocks <= 0x7fffffff, "fastmlp: drelu_bias_grad: too many columns (", cols, ")");
    bias_grad_finish_kernel<T><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(parts, cols, partial, gb);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace

int64_t bias_grad_partials(int64_t rows) { return rows <= 0 ? 0 : div_up(rows, chunk_rows(rows)); }

void drelu_bias_grad(int64_t rows, int64_t cols, const float* gy, const uint8_t* mask, int64_t ldm,
                     float* dz, float* gb, float* partial, cudaStream_t stream) {
  run(rows, cols, gy, mask, ldm, dz, gb, partial, stream);
}
void drelu_bias_grad(int64_t rows, int64_t cols, const double* gy, const uint8_t* mask, int64_t ldm,
                     double* dz, double* gb, double* partial, cudaStream_t stream) {
  run(rows, cols, gy, mask, ldm, dz, gb, partial, stream);
}
void drelu_bias_grad(int64_t rows, int64_t cols, const __half* gy, const uint8_t* mask, int64_t ldm,
                     __half* dz, __half* gb, float* partial, cudaStream_t stream) {
  run(rows, cols, gy, mask, ldm, dz, gb, partial, stream);
}
void drelu_bias_grad(int64_t rows, int64_t cols, const __nv_bfloat16* gy, const uint8_t* mask,
                     int64_t ldm, __nv_bfloat16* dz, __nv_bfloat16* gb, float* partial,
                     cudaStream_t stream) {
  run(rows, cols, gy, mask, ldm, dz, gb, partial, stream);
}

}  // namespace fastmlp::cuda
