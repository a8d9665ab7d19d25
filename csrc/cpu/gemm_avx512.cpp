// AVX-512 kernels (x86-64 with F/DQ/BW/VL). See gemm_avx2.cpp for why a pragma sets the target.
#if defined(__x86_64__) || defined(_M_X64)
#include <cmath>
#include <cstdint>

#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma,bmi,bmi2,popcnt,f16c")
#define FASTMLP_ISA_NS avx512
#include "vec_avx512.h"
#include "gemm_impl.h"

namespace fastmlp::cpu {

// 6 x 64 floats: 24 accumulators + 4 B vectors + 1 broadcast of the 32 zmm registers. The float32 K
// block is the CPU's (avx512_float_k_block): 128 rows, a panel of B of up to 32 KiB that L1 can keep
// while rows of A stream past it, except where longer blocks measured faster (Zen 4: 400).
const Kernels& kernels_avx512() {
  using F = avx512::GemmImpl<avx512::VecAvx512F32, 6, 4, 128, 192, 8>;
  using D = avx512::GemmImpl<avx512::VecAvx512F64, 6, 4, 128, 192, 8>;
  static const Kernels k{"avx512", F::table(avx512_float_k_block()), D::table()};
  return k;
}

}  // namespace fastmlp::cpu
#pragma GCC pop_options
#endif
