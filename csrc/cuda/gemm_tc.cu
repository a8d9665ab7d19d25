// Launchers of the tensor-core GEMM (gemm_tc.cuh): tile configuration by problem size, operand
// layout by strides. The callers (linear_ops.cu) only come here on compute capability >= 8.0.
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include "gemm_tc.cuh"

namespace fastmlp::cuda {

namespace {

//                     WM WN FM FN     block tile   threads
using TcBig = TcTile<2, 4, 4, 2>;    // 128 x 128    256
using TcSmall = TcTile<2, 2, 2, 2>;  //  64 x 64     128
using TcTiny = TcTile<1, 2, 2, 1>;   //  32 x 32      64

template <typename T>
int64_t tiles(const GemmArgs<T>& g, int64_t bm, int64_t bn) {
  return div_up(g.rows, bm) * div_up(g.cols, bn);
}

template <typename T, typename Tile>
void launch(const GemmArgs<T>& g, cudaStream_t stream) {
  const int64_t gx = div_up(g.rows, Tile::BM), gy = div_up(g.cols, Tile::BN);
  TORCH_CHECK(gx <= 0x7fffffff && gy <= 65535, "fastmlp: GEMM too large for one launch");
  const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy)), block(Tile::THREADS);
  const bool a_kc = g.a_cs == 1, b_kc = g.b_rs == 1;
  if (a_kc && b_kc) {  // x @ w.T
    gemm_tc_kernel<T, Tile, true, true><<<grid, block, 0, stream>>>(g);
  } else if (a_kc) {  // dz @ w
    gemm_tc_kernel<T, Tile, true, false><<<grid, block, 0, stream>>>(g);
  } else {  // dz.T @ x (and any other layout: correct, just not coalesced)
    gemm_tc_kernel<T, Tile, false, false><<<grid, block, 0, stream>>>(g);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void dispatch(const GemmArgs<T>& g, int num_sms, cudaStream_t stream) {
  if (g.rows <= 0 || g.cols <= 0) return;
  if (tiles(g, TcBig::BM, TcBig::BN) >= num_sms) {
    launch<T, TcBig>(g, stream);
  } else if (tiles(g, TcSmall::BM, TcSmall::BN) >= num_sms) {
    launch<T, TcSmall>(g, stream);
  } else {
    launch<T, TcTiny>(g, stream);
  }
}

}  // namespace

void gemm_tensor_core(const GemmArgs<__half>& g, int num_sms, cudaStream_t stream) {
  dispatch(g, num_sms, stream);
}
void gemm_tensor_core(const GemmArgs<__nv_bfloat16>& g, int num_sms, cudaStream_t stream) {
  dispatch(g, num_sms, stream);
}
void gemm_tensor_core(const GemmArgs<float>& g, int num_sms, cudaStream_t stream) {
  dispatch(g, num_sms, stream);
}

}  // namespace fastmlp::cuda
