// The AVX512-BF16 kernel (dpbf16_impl.h) on the instructions (x86-64 with AVX512-BF16). See
// gemm_avx2.cpp for why a pragma sets the target; nothing here runs unless the CPU has AVX512-BF16.
#if defined(__x86_64__) || defined(_M_X64)
#include <cstdint>

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,bmi,bmi2,f16c")
#include <immintrin.h>
#define FASTMLP_AMX_NS dpbf16_instr
#include "dpbf16_impl.h"

namespace fastmlp::cpu {

namespace {

struct DpAvx512 {
  using reg = __m512;
  using pairs = __m512bh;
  static reg zero() { return _mm512_setzero_ps(); }
  static pairs load(const uint32_t* p) { return (pairs)_mm512_loadu_si512(p); }
  static pairs bcast(uint32_t w) { return (pairs)_mm512_set1_epi32(int(w)); }
  static reg dot(reg acc, pairs a, pairs b) { return _mm512_dpbf16_ps(acc, a, b); }
  static void store(float* p, reg x) { _mm512_storeu_ps(p, x); }
};

void gemm_cols(const GemmLow& g, const bf16_t* a_packed, int64_t c0, int64_t c1) {
  dpbf16_instr::dp_gemm_cols<DpAvx512>(g, a_packed, c0, c1);
}

}  // namespace

const AmxKernels& dpbf16_kernels() {
  static const AmxKernels k{"avx512-bf16", &dpbf16_instr::pack_a, &gemm_cols, false};
  return k;
}

}  // namespace fastmlp::cpu
#pragma GCC pop_options
#endif
