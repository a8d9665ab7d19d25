// AVX2 + FMA kernels (x86-64). Compiled for AVX2 through the pragma below rather than per-file
// flags, which setuptools cannot give; everything after it lives in namespace `avx2`, so no inline
// function compiled with wide instructions can be merged with a generic one at link time. Only
// standard headers are included before the pragma.
#if defined(__x86_64__) || defined(_M_X64)
#include <cmath>
#include <cstdint>

#pragma GCC push_options
#pragma GCC target("avx2,fma,bmi,bmi2,popcnt,f16c")
#define FASTMLP_ISA_NS avx2
#include "vec_avx2.h"
#include "gemm_impl.h"

namespace fastmlp::cpu {

// 6 x 16 floats: 12 accumulators + 2 B vectors + 1 broadcast of the 16 ymm registers.
const Kernels& kernels_avx2() {
  using F = avx2::GemmImpl<avx2::VecAvx2F32, 6, 2, 256>;
  using D = avx2::GemmImpl<avx2::VecAvx2F64, 6, 2, 256>;
  static const Kernels k{"avx2", F::table(), D::table()};
  return k;
}

}  // namespace fastmlp::cpu
#pragma GCC pop_options
#endif
