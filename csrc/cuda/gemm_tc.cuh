// The tensor-core GEMM tile kernel (WMMA, FP32 accumulation) for float16, bfloat16 and TF32
// (float32 inputs rounded to TF32 in the fragments), with the same fused epilogue as the CUDA-core
// kernel (epilogue.cuh). Needs compute capability 8.0+ (bf16 / tf32 WMMA); the host dispatch never
// launches it on older GPUs and the body traps if it ever runs there. (FASTMLP_CUDA_EMULATION:
// the CPU emulation harness in tests/cuda_emulation compiles the body for the host.)
//
// Block tile BM x BN = (WM*FM*16) x (WN*FN*16), K step BK; WM x WN warps, each holding FM x FN
// 16x16 accumulator fragments. A and B tiles are stored in shared memory in their global layout
// (so global loads coalesce and no transpose is needed), and the fragment layout follows:
//   A k-contiguous: As[m][k] -> matrix_a row_major     A m-contiguous: As[k][m] -> col_major
//   B k-contiguous: Bs[n][k] -> matrix_b col_major     B n-contiguous: Bs[k][n] -> row_major
// Epilogue: fragment layouts are opaque, so each warp stores one accumulator fragment at a time to
// its own 16x16 fp32 scratch; lane l then finishes row l/2, columns 8*(l%2) .. +8 of that fragment
// (bias, ReLU, down-cast) and stores the whole mask byte of those 8 columns. Fragment origins
// are multiples of 16, so those 8 columns are exactly one byte, owned by one lane of one warp of
// one block: no two writers per byte.
#pragma once

#include <mma.h>

#include <type_traits>

#include "epilogue.cuh"
#include "tile_load.cuh"

namespace fastmlp::cuda {

template <typename T>
struct MmaTraits;
template <>
struct MmaTraits<__half> {
  using frag = __half;
  static constexpr int FK = 16, BK = 32;
};
template <>
struct MmaTraits<__nv_bfloat16> {
  using frag = __nv_bfloat16;
  static constexpr int FK = 16, BK = 32;
};
template <>
struct MmaTraits<float> {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  using frag = nvcuda::wmma::precision::tf32;
#else
  using frag = float;  // unused: the kernel body is compiled out below sm_80
#endif
  static constexpr int FK = 8, BK = 16;  // fp32 smem tiles are twice as large: half the K step
};

template <int WM_, int WN_, int FM_, int FN_>
struct TcTile {
  static constexpr int WM = WM_, WN = WN_, FM = FM_, FN = FN_;
  static constexpr int BM = WM * FM * 16, BN = WN * FN * 16;
  static constexpr int WARPS = WM * WN, THREADS = 32 * WARPS;
};

template <typename T, typename Tile, bool A_KC, bool B_KC>
__global__ void __launch_bounds__(Tile::THREADS) gemm_tc_kernel(const GemmArgs<T> g) {
#if (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800) || defined(FASTMLP_CUDA_EMULATION)
  namespace wmma = nvcuda::wmma;
  using F = typename MmaTraits<T>::frag;
  constexpr int BM = Tile::BM, BN = Tile::BN, FM = Tile::FM, FN = Tile::FN, NT = Tile::THREADS;
  constexpr int BK = MmaTraits<T>::BK, FK = MmaTraits<T>::FK;
  // Leading dimensions, padded by 8 elements: a multiple of 16 bytes (WMMA's ldm rule) that
  // staggers rows over the banks; every fragment pointer below is then 32-byte aligned:
  // row offsets are multiples of 16 rows (or FK = 8 fp32 rows) of a pitch that is a multiple of
  // 8 elements, column offsets multiples of 16 elements (or 8 fp32).
  constexpr int PAD = 8;
  constexpr int LDA = A_KC ? BK + PAD : BM + PAD;
  constexpr int LDB = B_KC ? BK + PAD : BN + PAD;
  constexpr int LDC = 16 + 8;  // fp32 scratch pitch (multiple of 4 floats)
  __shared__ __align__(128) T As[(A_KC ? BM : BK) * LDA];
  __shared__ __align__(128) T Bs[(B_KC ? BN : BK) * LDB];
  __shared__ __align__(128) float Cs[Tile::WARPS][16 * LDC];
  static_assert(sizeof(As) + sizeof(Bs) + sizeof(Cs) <= 48 * 1024, "static shared memory limit");
  using ALayout = std::conditional_t<A_KC, wmma::row_major, wmma::col_major>;
  using BLayout = std::conditional_t<B_KC, wmma::col_major, wmma::row_major>;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int wm = warp / Tile::WN, wn = warp % Tile::WN;
  const int64_t row0 = int64_t(blockIdx.x) * BM;
  const int64_t col0 = int64_t(blockIdx.y) * BN;

  wmma::fragment<wmma::accumulator, 16, 16, FK, float> acc[FM][FN];
#pragma unroll
  for (int fm = 0; fm < FM; ++fm)
#pragma unroll
    for (int fn = 0; fn < FN; ++fn) wmma::fill_fragment(acc[fm][fn], 0.0f);

  const TileLoader<T, BM, BK, NT, A_KC> a_loader(tid);
  const TileLoader<T, BN, BK, NT, B_KC> b_loader(tid);
  for (int64_t k0 = 0; k0 < g.inner; k0 += BK) {
    // A(i, p) = a[i * a_rs + p * a_cs];  B(p, j) = b[p * b_rs + j * b_cs] (tile rows are j).
    a_loader.load(g.a, g.a_rs, g.a_cs, row0, g.rows, k0, g.inner,
                  [&](int m, int k, T v) { As[A_KC ? m * LDA + k : k * LDA + m] = v; });
    b_loader.load(g.b, g.b_cs, g.b_rs, col0, g.cols, k0, g.inner,
                  [&](int n, int k, T v) { Bs[B_KC ? n * LDB + k : k * LDB + n] = v; });
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BK; kk += FK) {
      wmma::fragment<wmma::matrix_a, 16, 16, FK, F, ALayout> af[FM];
      wmma::fragment<wmma::matrix_b, 16, 16, FK, F, BLayout> bf[FN];
#pragma unroll
      for (int fm = 0; fm < FM; ++fm) {
        const int m = (wm * FM + fm) * 16;
        wmma::load_matrix_sync(af[fm], A_KC ? As + m * LDA + kk : As + kk * LDA + m, LDA);
        if constexpr (std::is_same_v<T, float>) {
#pragma unroll
          for (int e = 0; e < af[fm].num_elements; ++e) af[fm].x[e] = wmma::__float_to_tf32(af[fm].x[e]);
        }
      }
#pragma unroll
      for (int fn = 0; fn < FN; ++fn) {
        const int n = (wn * FN + fn) * 16;
        wmma::load_matrix_sync(bf[fn], B_KC ? Bs + n * LDB + kk : Bs + kk * LDB + n, LDB);
        if constexpr (std::is_same_v<T, float>) {
#pragma unroll
          for (int e = 0; e < bf[fn].num_elements; ++e) bf[fn].x[e] = wmma::__float_to_tf32(bf[fn].x[e]);
        }
      }
#pragma unroll
      for (int fm = 0; fm < FM; ++fm)
#pragma unroll
        for (int fn = 0; fn < FN; ++fn) wmma::mma_sync(acc[fm][fn], af[fm], bf[fn], acc[fm][fn]);
    }
    __syncthreads();  // the next iteration overwrites As / Bs
  }

  float* scratch = Cs[warp];
  const int r = lane / 2, c8 = (lane % 2) * 8;
#pragma unroll
  for (int fm = 0; fm < FM; ++fm) {
#pragma unroll
    for (int fn = 0; fn < FN; ++fn) {
      wmma::store_matrix_sync(scratch, acc[fm][fn], LDC, wmma::mem_row_major);
      __syncwarp();
      const int64_t row = row0 + (wm * FM + fm) * 16 + r;
      const int64_t col = col0 + (wn * FN + fn) * 16 + c8;  // a multiple of 8
      float v[8];
#pragma unroll
      for (int c = 0; c < 8; ++c) v[c] = scratch[r * LDC + c8 + c];
      const uint32_t bits = epilogue_store<T, 8>(g, row, col, v);
      if (g.mask != nullptr && row < g.rows && col < g.cols) g.mask[row * g.ldm + col / 8] = uint8_t(bits);
      __syncwarp();  // all lanes have read the scratch before the next fragment overwrites it
    }
  }
#elif defined(__CUDA_ARCH__)
  __trap();  // compiled for a GPU below sm_80: the host dispatch does not launch this kernel there
#endif
}

}  // namespace fastmlp::cuda
