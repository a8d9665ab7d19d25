// AVX2 + FMA lanes. Include only from a translation unit compiled for AVX2 (gemm_avx2.cpp).
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "vec_generic.h"

namespace fastmlp::cpu::FASTMLP_ISA_NS {

struct VecAvx2F32 {
  using T = float;
  static constexpr int L = 8;
  using reg = __m256;

  static inline __m256i lanes_below(int n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static inline reg zero() { return _mm256_setzero_ps(); }
  static inline reg bcast(T x) { return _mm256_set1_ps(x); }
  static inline reg load(const T* p) { return _mm256_loadu_ps(p); }
  static inline reg load_n(const T* p, int n) { return _mm256_maskload_ps(p, lanes_below(n)); }
  static inline void store(T* p, reg x) { _mm256_storeu_ps(p, x); }
  static inline void store_n(T* p, reg x, int n) { _mm256_maskstore_ps(p, lanes_below(n), x); }
  static inline reg fma(reg a, reg b, reg c) { return _mm256_fmadd_ps(a, b, c); }
  static inline T hsum(reg a) {  // halves added pairwise: (l + l+4), then (l + l+2), then (l + l+1)
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
  }
  static inline reg add(reg a, reg b) { return _mm256_add_ps(a, b); }
  static inline reg sub(reg a, reg b) { return _mm256_sub_ps(a, b); }
  static inline reg mul(reg a, reg b) { return _mm256_mul_ps(a, b); }
  static inline reg div(reg a, reg b) { return _mm256_div_ps(a, b); }
  static inline reg sqrt(reg a) { return _mm256_sqrt_ps(a); }
  static inline reg relu(reg a) { return _mm256_max_ps(_mm256_setzero_ps(), a); }
  static inline uint32_t gt0_bits(reg a) {
    return uint32_t(_mm256_movemask_ps(_mm256_cmp_ps(a, _mm256_setzero_ps(), _CMP_GT_OQ)));
  }
  static inline reg keep_bits(uint32_t bits, reg a) {
    const __m256i pow2 = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    __m256i sel = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(int(bits)), pow2), pow2);
    return _mm256_and_ps(a, _mm256_castsi256_ps(sel));
  }
  // Rounded to the nearest bfloat16 (ties to even; NaN stays NaN), kept in float32 (see vec_avx512.h).
  static inline reg round_bf16(reg a) {
    const __m256i u = _mm256_castps_si256(a);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff)));
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(a, a, _CMP_UNORD_Q));
    r = _mm256_blendv_epi8(r, _mm256_or_si256(u, _mm256_set1_epi32(0x00400000)), nan);
    return _mm256_castsi256_ps(_mm256_and_si256(r, _mm256_set1_epi32(int(0xffff0000u))));
  }
  static inline void transpose(const T* src, int64_t lds, T* dst, int64_t ldd) {
    __m256 r[8], t[8], u[8];
    for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * lds);
    for (int i = 0; i < 4; ++i) {
      t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
      t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int h = 0; h < 2; ++h) {  // rows 0-3, rows 4-7
      __m256 *tt = t + 4 * h, *uu = u + 4 * h;
      uu[0] = _mm256_shuffle_ps(tt[0], tt[2], 0x44);
      uu[1] = _mm256_shuffle_ps(tt[0], tt[2], 0xEE);
      uu[2] = _mm256_shuffle_ps(tt[1], tt[3], 0x44);
      uu[3] = _mm256_shuffle_ps(tt[1], tt[3], 0xEE);
    }
    for (int c = 0; c < 4; ++c) {
      _mm256_storeu_ps(dst + c * ldd, _mm256_permute2f128_ps(u[c], u[4 + c], 0x20));
      _mm256_storeu_ps(dst + (4 + c) * ldd, _mm256_permute2f128_ps(u[c], u[4 + c], 0x31));
    }
  }
};

struct VecAvx2F64 {
  using T = double;
  static constexpr int L = 4;
  using reg = __m256d;

  static inline __m256i lanes_below(int n) {
    return _mm256_cmpgt_epi64(_mm256_set1_epi64x(n), _mm256_setr_epi64x(0, 1, 2, 3));
  }
  static inline reg zero() { return _mm256_setzero_pd(); }
  static inline reg bcast(T x) { return _mm256_set1_pd(x); }
  static inline reg load(const T* p) { return _mm256_loadu_pd(p); }
  static inline reg load_n(const T* p, int n) { return _mm256_maskload_pd(p, lanes_below(n)); }
  static inline void store(T* p, reg x) { _mm256_storeu_pd(p, x); }
  static inline void store_n(T* p, reg x, int n) { _mm256_maskstore_pd(p, lanes_below(n), x); }
  static inline reg fma(reg a, reg b, reg c) { return _mm256_fmadd_pd(a, b, c); }
  static inline T hsum(reg a) {
    __m128d s = _mm_add_pd(_mm256_castpd256_pd128(a), _mm256_extractf128_pd(a, 1));
    return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
  }
  static inline reg add(reg a, reg b) { return _mm256_add_pd(a, b); }
  static inline reg sub(reg a, reg b) { return _mm256_sub_pd(a, b); }
  static inline reg mul(reg a, reg b) { return _mm256_mul_pd(a, b); }
  static inline reg div(reg a, reg b) { return _mm256_div_pd(a, b); }
  static inline reg sqrt(reg a) { return _mm256_sqrt_pd(a); }
  static inline reg relu(reg a) { return _mm256_max_pd(_mm256_setzero_pd(), a); }
  static inline uint32_t gt0_bits(reg a) {
    return uint32_t(_mm256_movemask_pd(_mm256_cmp_pd(a, _mm256_setzero_pd(), _CMP_GT_OQ)));
  }
  static inline reg keep_bits(uint32_t bits, reg a) {
    const __m256i pow2 = _mm256_setr_epi64x(1, 2, 4, 8);
    __m256i sel = _mm256_cmpeq_epi64(_mm256_and_si256(_mm256_set1_epi64x(bits), pow2), pow2);
    return _mm256_and_pd(a, _mm256_castsi256_pd(sel));
  }
  static inline void transpose(const T* src, int64_t lds, T* dst, int64_t ldd) {
    VecGeneric<double, 4>::transpose(src, lds, dst, ldd);
  }
};

}  // namespace fastmlp::cpu::FASTMLP_ISA_NS
