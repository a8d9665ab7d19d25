// Inference through a whole small MLP in one kernel (mlp_forward for a few rows): each block takes
// kMlpRows<T> rows of x through every layer with the activations kept in shared memory, so a batch
// of a handful of rows costs one launch and no global-memory round trip between layers.
//
// Work split: one warp per output column at a time. Its 32 lanes stride along the column's weight
// row (coalesced reads, each weight element used for all the block's rows), then a butterfly of
// __shfl_xor_sync gives every lane the same sum. Arithmetic per element: the layer GEMM's epilogue
// (epilogue.cuh) on an acc_t<T> sum: + bias, one down-cast to T, ReLU with torch's NaN rule. The
// summation order differs from the layer GEMM's, so results agree with the layer-by-layer forward
// to rounding, not bit for bit.
#pragma once

#include "common.cuh"
#include "kernels.h"

namespace fastmlp::cuda {

template <typename T>
__global__ void __launch_bounds__(kMlpThreads) mlp_forward_kernel(MlpForwardArgs<T> a) {
  using A = acc_t<T>;
  constexpr int R = kMlpRows<T>, W = kMlpMaxWidth;
  __shared__ A act[2][R * W];  // this block's rows of the layer input and output, row stride W
  const int64_t row0 = int64_t(blockIdx.x) * R;
  const int rows = int(a.rows - row0 < R ? a.rows - row0 : R);
  const int tid = int(threadIdx.x), lane = tid % 32, warp = tid / 32, warps = int(blockDim.x) / 32;

  // Rows past the batch are zeros: computed like the others, never stored.
  const int K0 = a.dims[0];
  for (int i = tid; i < R * K0; i += int(blockDim.x)) {
    const int r = i / K0, k = i % K0;
    act[0][r * W + k] = r < rows ? to_acc(a.x[(row0 + r) * K0 + k]) : A(0);
  }
  __syncthreads();

  for (int l = 0; l < a.layers; ++l) {
    const int K = a.dims[l], N = a.dims[l + 1];
    const bool last = l + 1 == a.layers, relu = !last || a.relu_last;
    const A* in = act[l % 2];
    A* out = act[(l + 1) % 2];
    for (int j = warp; j < N; j += warps) {
      const T* wj = a.w[l] + int64_t(j) * K;
      A sum[R];
#pragma unroll
      for (int r = 0; r < R; ++r) sum[r] = A(0);
      for (int k = lane; k < K; k += 32) {
        const A wv = to_acc(wj[k]);
#pragma unroll
        for (int r = 0; r < R; ++r) sum[r] = fma_acc(wv, in[r * W + k], sum[r]);
      }
#pragma unroll
      for (int r = 0; r < R; ++r)
        for (int s = 16; s > 0; s /= 2) sum[r] += __shfl_xor_sync(0xffffffffu, sum[r], s);
      // Every lane holds every row's sum; lane r finishes row r.
#pragma unroll
      for (int r = 0; r < R; ++r) {
        if (lane != r) continue;
        A z = sum[r];
        if (a.b[l] != nullptr) z += to_acc(a.b[l][j]);
        T y = from_acc<T>(z);
        if (relu && !(to_acc(y) > A(0)) && !(to_acc(y) != to_acc(y))) y = zero<T>();  // NaN stays
        if (!last) out[r * W + j] = to_acc(y);
        else if (r < rows) a.y[(row0 + r) * N + j] = y;
      }
    }
    __syncthreads();
  }
}

}  // namespace fastmlp::cuda
