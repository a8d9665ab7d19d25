// Launchers of the CUDA-core GEMM (gemm_simt.cuh): tile configuration by problem size, operand
// layout by strides.
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include "gemm_simt.cuh"

namespace fastmlp::cuda {

namespace {

//                          BM   BN  BK TM TN         threads
using F32Big = SimtTile<128, 128, 8, 8, 8>;     // 256
using F32Small = SimtTile<64, 64, 8, 4, 4>;     // 256
using F32Tiny = SimtTile<32, 32, 8, 4, 4>;      // 64
using F64Tile = SimtTile<64, 64, 8, 4, 4>;      // 256

int64_t tiles(const GemmArgs<float>& g, int64_t bm, int64_t bn) { return div_up(g.rows, bm) * div_up(g.cols, bn); }

template <typename T, typename Tile>
void launch(const GemmArgs<T>& g, cudaStream_t stream) {
  const int64_t gx = div_up(g.rows, Tile::BM), gy = div_up(g.cols, Tile::BN);
  TORCH_CHECK(gx <= 0x7fffffff && gy <= 65535, "fastmlp: GEMM of ", g.rows, " x ", g.cols,
              " is too large for one launch");
  const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy)), block(Tile::THREADS);
  const bool a_kc = g.a_cs == 1, b_kc = g.b_rs == 1;
  if (a_kc && b_kc) {  // x @ w.T
    gemm_simt_kernel<T, Tile, true, true><<<grid, block, 0, stream>>>(g);
  } else if (a_kc) {  // dz @ w
    gemm_simt_kernel<T, Tile, true, false><<<grid, block, 0, stream>>>(g);
  } else {  // dz.T @ x (and any other layout: correct, just not coalesced)
    gemm_simt_kernel<T, Tile, false, false><<<grid, block, 0, stream>>>(g);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void gemm_simt(const GemmArgs<float>& g, int num_sms, cudaStream_t stream) {
  if (g.rows <= 0 || g.cols <= 0) return;
  // Biggest tiles that still give every SM a block (small MLP layers have few output tiles).
  if (tiles(g, F32Big::BM, F32Big::BN) >= num_sms) {
    launch<float, F32Big>(g, stream);
  } else if (tiles(g, F32Small::BM, F32Small::BN) >= num_sms) {
    launch<float, F32Small>(g, stream);
  } else {
    launch<float, F32Tiny>(g, stream);
  }
}

void gemm_simt(const GemmArgs<double>& g, int /*num_sms*/, cudaStream_t stream) {
  if (g.rows <= 0 || g.cols <= 0) return;
  launch<double, F64Tile>(g, stream);
}

}  // namespace fastmlp::cuda
