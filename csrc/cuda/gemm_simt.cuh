// The CUDA-core GEMM tile kernel (float32 and float64): shared-memory tiles of A and B, a TM x TN
// register tile of C per thread, then the fused epilogue (epilogue.cuh).
//
// Block tile BM x BN, K step BK. Thread t owns rows ty*TM .. +TM and the TN *consecutive* columns
// tx*TN .. +TN of the block tile (tx = t % TX, ty = t / TX, TX = BN / TN), so:
//   - TN == 8: a thread's columns are one whole, 8-aligned mask byte: it stores the byte alone;
//   - TN == 4: lanes 2q and 2q+1 of a warp (same ty, tx = 2q' and 2q'+1) hold the two halves of
//     one byte; a __shfl_xor_sync(.., 1) hands the odd lane's nibble to the even lane, which
//     stores the byte. TX is even and blocks are whole warps, so partners share a warp.
// Blocks own disjoint BN-wide (multiple of 8) column ranges: no mask byte is shared between blocks.
//
// Each C element is one FMA chain over p = 0, 1, ..., inner-1 in order (exact FP32/FP64 FMAs,
// no reassociation), so results do not depend on the tile configuration or the launch.
#pragma once

#include <type_traits>

#include "epilogue.cuh"
#include "tile_load.cuh"

namespace fastmlp::cuda {

template <int BM_, int BN_, int BK_, int TM_, int TN_>
struct SimtTile {
  static constexpr int BM = BM_, BN = BN_, BK = BK_, TM = TM_, TN = TN_;
  static constexpr int TX = BN / TN, TY = BM / TM, THREADS = TX * TY;
  static_assert(BM % TM == 0 && BN % TN == 0, "register tiles must cover the block tile");
  static_assert(TN == 4 || TN == 8, "a thread holds half a mask byte or a whole one");
  static_assert(TX % 2 == 0, "mask-byte partners (tx ^ 1) must be adjacent lanes");
  static_assert(THREADS % 32 == 0, "whole warps only (the mask shuffle uses a full lane mask)");
  static_assert((BM * BK) % THREADS == 0 && (BN * BK) % THREADS == 0, "even tile loads");
  static_assert(BK == 8, "smem padding below assumes BK == 8");
};

// Reads N consecutive shared-memory values; 16-byte vector loads for float when N % 4 == 0 (the
// callers' offsets and row pitches are multiples of 4 floats, see PAD).
template <int N, typename T>
__device__ __forceinline__ void load_smem(const T* p, T (&r)[N]) {
  if constexpr (std::is_same_v<T, float> && N % 4 == 0) {
#pragma unroll
    for (int i = 0; i < N; i += 4) {
      const float4 v = *reinterpret_cast<const float4*>(p + i);
      r[i] = v.x, r[i + 1] = v.y, r[i + 2] = v.z, r[i + 3] = v.w;
    }
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) r[i] = p[i];
  }
}

// A_KC: A is contiguous along k (a_cs == 1); else along m (a_rs == 1) or arbitrary.
// B_KC: B is contiguous along k (b_rs == 1); else along n (b_cs == 1) or arbitrary.
// These choose only which global index consecutive threads load (coalescing); the addressing
// uses both strides, so every layout gives correct results.
// SPLIT: block z sums only inner slice [z * split_len, (z + 1) * split_len) and stores its raw sums
// to workspace slice z (rows x cols); splitk_reduce_kernel then applies the epilogue.
template <typename T, typename Tile, bool A_KC, bool B_KC, bool SPLIT = false>
__global__ void __launch_bounds__(Tile::THREADS) gemm_simt_kernel(const GemmArgs<T> g) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "CUDA-core path: float/double");
  using Acc = acc_t<T>;
  constexpr int BM = Tile::BM, BN = Tile::BN, BK = Tile::BK, TM = Tile::TM, TN = Tile::TN;
  constexpr int TX = Tile::TX, NT = Tile::THREADS;
  // Smem tiles are k-major (As[k][m], Bs[k][n]) so the compute loop reads TM / TN consecutive
  // values. Row pitch BM + 4: a warp storing a k-contiguous global tile covers 8 k x 4 m (see
  // TileLoader), which then lands on 32 distinct banks; the pitch stays a multiple of 4 floats
  // for the float4 reads.
  constexpr int PAD = 4;
  __shared__ __align__(16) T As[BK][BM + PAD];
  __shared__ __align__(16) T Bs[BK][BN + PAD];

  const int tid = threadIdx.x;
  const int tx = tid % TX, ty = tid / TX;
  const int64_t row0 = int64_t(blockIdx.x) * BM;
  const int64_t col0 = int64_t(blockIdx.y) * BN;

  Acc acc[TM][TN];
#pragma unroll
  for (int r = 0; r < TM; ++r)
#pragma unroll
    for (int c = 0; c < TN; ++c) acc[r][c] = Acc(0);

  const TileLoader<T, BM, BK, NT, A_KC> a_loader(tid);
  const TileLoader<T, BN, BK, NT, B_KC> b_loader(tid);
  int64_t k_begin = 0, k_end = g.inner;
  if constexpr (SPLIT) {
    k_begin = int64_t(blockIdx.z) * g.split_len;
    k_end = k_begin + g.split_len < g.inner ? k_begin + g.split_len : g.inner;
  }
  for (int64_t k0 = k_begin; k0 < k_end; k0 += BK) {
    // A(i, p) = a[i * a_rs + p * a_cs];  B(p, j) = b[p * b_rs + j * b_cs] (tile rows are j).
    a_loader.load(g.a, g.a_rs, g.a_cs, row0, g.rows, k0, k_end, [&](int m, int k, T v) { As[k][m] = v; });
    b_loader.load(g.b, g.b_cs, g.b_rs, col0, g.cols, k0, k_end, [&](int n, int k, T v) { Bs[k][n] = v; });
    __syncthreads();
#pragma unroll
    for (int k = 0; k < BK; ++k) {
      T a[TM], b[TN];
      load_smem<TM>(&As[k][ty * TM], a);
      load_smem<TN>(&Bs[k][tx * TN], b);
#pragma unroll
      for (int r = 0; r < TM; ++r)
#pragma unroll
        for (int c = 0; c < TN; ++c) acc[r][c] = fma_acc(a[r], b[c], acc[r][c]);
    }
    __syncthreads();  // the next iteration overwrites As / Bs
  }

  if constexpr (SPLIT) {
    Acc* ws = static_cast<Acc*>(g.workspace) + int64_t(blockIdx.z) * g.rows * g.cols;
#pragma unroll
    for (int r = 0; r < TM; ++r) {
      const int64_t row = row0 + ty * TM + r;
      const int64_t col = col0 + tx * TN;
      if (row >= g.rows) continue;
#pragma unroll
      for (int c = 0; c < TN; ++c)
        if (col + c < g.cols) ws[row * g.cols + col + c] = acc[r][c];
    }
  } else {
#pragma unroll
    for (int r = 0; r < TM; ++r) {
      const int64_t row = row0 + ty * TM + r;
      const int64_t col = col0 + tx * TN;
      uint32_t bits = epilogue_store<T, TN>(g, row, col, acc[r]);
      if (g.mask != nullptr) {  // a kernel argument: uniform, so every lane reaches the shuffle
        bool owner = true;
        if constexpr (TN == 4) {
          bits |= __shfl_xor_sync(0xffffffffu, bits, 1) << 4;  // meaningful on the even lane only
          owner = (tx & 1) == 0;
        }
        // col % 8 == 0 on the owner; out-of-range columns contributed 0 bits.
        if (owner && row < g.rows && col < g.cols) g.mask[row * g.ldm + col / 8] = uint8_t(bits);
      }
    }
  }
}

// Split-K second pass: one thread per (row, 8 columns) adds the `splits` slices of the workspace in
// order, then applies the epilogue and stores the whole mask byte.
template <typename T>
__global__ void splitk_reduce_kernel(const GemmArgs<T> g, int splits) {
  using Acc = acc_t<T>;
  const int64_t groups = (g.cols + 7) / 8;
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= g.rows * groups) return;
  const int64_t row = idx / groups, col = (idx % groups) * 8;
  const Acc* ws = static_cast<const Acc*>(g.workspace) + row * g.cols + col;
  const int64_t slice = g.rows * g.cols;
  Acc v[8];
#pragma unroll
  for (int c = 0; c < 8; ++c) v[c] = Acc(0);
  for (int s = 0; s < splits; ++s) {
#pragma unroll
    for (int c = 0; c < 8; ++c)
      if (col + c < g.cols) v[c] += ws[s * slice + c];
  }
  const uint32_t bits = epilogue_store<T, 8>(g, row, col, v);
  if (g.mask != nullptr) g.mask[row * g.ldm + col / 8] = uint8_t(bits);
}

}  // namespace fastmlp::cuda
