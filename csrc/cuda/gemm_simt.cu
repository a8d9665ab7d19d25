// Launchers of the CUDA-core GEMM (gemm_simt.cuh): tile configuration by problem size, operand
// layout by strides.
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include <algorithm>

#include "gemm_simt.cuh"

namespace fastmlp::cuda {

namespace {

//                          BM   BN  BK TM TN         threads
using F32Big = SimtTile<128, 128, 8, 8, 8>;     // 256
using F32Small = SimtTile<64, 64, 8, 4, 4>;     // 256
using F32Tiny = SimtTile<32, 32, 8, 4, 4>;      // 64
using F64Tile = SimtTile<64, 64, 8, 4, 4>;      // 256

int64_t tiles(const GemmArgs<float>& g, int64_t bm, int64_t bn) { return div_up(g.rows, bm) * div_up(g.cols, bn); }

template <typename T, typename Tile, bool SPLIT>
void launch(const GemmArgs<T>& g, int splits, cudaStream_t stream) {
  const int64_t gx = div_up(g.rows, Tile::BM), gy = div_up(g.cols, Tile::BN);
  TORCH_CHECK(gx <= 0x7fffffff && gy <= 65535, "fastmlp: GEMM too large for one launch");
  const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy), static_cast<unsigned>(splits));
  const dim3 block(Tile::THREADS);
  const bool a_kc = g.a_cs == 1, b_kc = g.b_rs == 1;
  if (a_kc && b_kc) {  // x @ w.T
    gemm_simt_kernel<T, Tile, true, true, SPLIT><<<grid, block, 0, stream>>>(g);
  } else if (a_kc) {  // dz @ w
    gemm_simt_kernel<T, Tile, true, false, SPLIT><<<grid, block, 0, stream>>>(g);
  } else {  // dz.T @ x (and any other layout: correct, just not coalesced)
    gemm_simt_kernel<T, Tile, false, false, SPLIT><<<grid, block, 0, stream>>>(g);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Split-K plan for float: when even the smallest tiles leave SMs idle, slice `inner` so that about
// two blocks per SM run, each slice at least 64 deep (so the extra pass stays cheap). Depends only
// on the shape and the SM count: results are reproducible on a given GPU.
struct SplitPlan {
  bool small_tile = false;  // F32Small (deep inner) or F32Tiny
  int splits = 1;
  int64_t len = 0;
};

SplitPlan split_plan(const GemmArgs<float>& g, int num_sms) {
  SplitPlan p;
  if (tiles(g, F32Small::BM, F32Small::BN) >= num_sms || g.inner < 128) return p;
  p.small_tile = g.inner >= 2048;
  const int64_t t = p.small_tile ? tiles(g, F32Small::BM, F32Small::BN) : tiles(g, F32Tiny::BM, F32Tiny::BN);
  if (!p.small_tile && t >= num_sms) return p;
  int64_t s = std::min<int64_t>({div_up(2 * int64_t(num_sms), t), g.inner / 64, 64});
  if (s <= 1) return p;
  p.len = div_up(div_up(g.inner, s), 8) * 8;  // whole BK steps per slice
  p.splits = static_cast<int>(div_up(g.inner, p.len));
  return p;
}

}  // namespace

int64_t gemm_simt_workspace(const GemmArgs<float>& g, int num_sms) {
  if (g.rows <= 0 || g.cols <= 0) return 0;
  const SplitPlan p = split_plan(g, num_sms);
  return p.splits > 1 ? p.splits * g.rows * g.cols : 0;
}

void gemm_simt(const GemmArgs<float>& g, int num_sms, cudaStream_t stream) {
  if (g.rows <= 0 || g.cols <= 0) return;
  // Biggest tiles that still give every SM a block (small MLP layers have few output tiles);
  // failing that, split K (when the caller provided the workspace).
  if (tiles(g, F32Big::BM, F32Big::BN) >= num_sms) {
    launch<float, F32Big, false>(g, 1, stream);
    return;
  }
  if (tiles(g, F32Small::BM, F32Small::BN) >= num_sms) {
    launch<float, F32Small, false>(g, 1, stream);
    return;
  }
  const SplitPlan p = split_plan(g, num_sms);
  if (p.splits <= 1 || g.workspace == nullptr) {
    launch<float, F32Tiny, false>(g, 1, stream);
    return;
  }
  GemmArgs<float> s = g;
  s.split_len = p.len;
  if (p.small_tile) launch<float, F32Small, true>(s, p.splits, stream);
  else launch<float, F32Tiny, true>(s, p.splits, stream);
  const int64_t threads = g.rows * div_up(g.cols, 8);
  splitk_reduce_kernel<float><<<static_cast<unsigned>(div_up(threads, 256)), 256, 0, stream>>>(s, p.splits);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void gemm_simt(const GemmArgs<double>& g, int /*num_sms*/, cudaStream_t stream) {
  if (g.rows <= 0 || g.cols <= 0) return;
  launch<double, F64Tile, false>(g, 1, stream);
}

}  // namespace fastmlp::cuda
