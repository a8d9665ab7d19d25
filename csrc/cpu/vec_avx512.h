// AVX-512 (F/DQ/BW/VL) lanes. Include only from a translation unit compiled for AVX-512.
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "vec_generic.h"

namespace fastmlp::cpu::FASTMLP_ISA_NS {

struct VecAvx512F32 {
  using T = float;
  static constexpr int L = 16;
  using reg = __m512;

  static inline __mmask16 lanes_below(int n) { return __mmask16((1u << n) - 1u); }
  static inline reg zero() { return _mm512_setzero_ps(); }
  static inline reg bcast(T x) { return _mm512_set1_ps(x); }
  static inline reg load(const T* p) { return _mm512_loadu_ps(p); }
  static inline reg load_n(const T* p, int n) { return _mm512_maskz_loadu_ps(lanes_below(n), p); }
  static inline void store(T* p, reg x) { _mm512_storeu_ps(p, x); }
  static inline void store_n(T* p, reg x, int n) { _mm512_mask_storeu_ps(p, lanes_below(n), x); }
  static inline reg fma(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }
  static inline T hsum(reg a) { return _mm512_reduce_add_ps(a); }
  static inline reg add(reg a, reg b) { return _mm512_add_ps(a, b); }
  static inline reg sub(reg a, reg b) { return _mm512_sub_ps(a, b); }
  static inline reg mul(reg a, reg b) { return _mm512_mul_ps(a, b); }
  static inline reg div(reg a, reg b) { return _mm512_div_ps(a, b); }
  static inline reg sqrt(reg a) { return _mm512_sqrt_ps(a); }
  static inline reg relu(reg a) { return _mm512_max_ps(_mm512_setzero_ps(), a); }
  static inline uint32_t gt0_bits(reg a) {
    return _mm512_cmp_ps_mask(a, _mm512_setzero_ps(), _CMP_GT_OQ);
  }
  static inline reg keep_bits(uint32_t bits, reg a) { return _mm512_maskz_mov_ps(__mmask16(bits), a); }
  // Rounded to the nearest bfloat16 (ties to even; NaN stays NaN), kept in float32: the rounding
  // of torch's float32 -> bfloat16 conversion.
  static inline reg round_bf16(reg a) {
    const __m512i u = _mm512_castps_si512(a);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff)));
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q),
                              _mm512_or_si512(u, _mm512_set1_epi32(0x00400000)));
    return _mm512_castsi512_ps(_mm512_and_si512(r, _mm512_set1_epi32(int(0xffff0000u))));
  }

  // 16 x 16 transpose in three shuffle stages (within 32-bit pairs, 64-bit pairs, 128-bit lanes).
  static inline void transpose(const T* src, int64_t lds, T* dst, int64_t ldd) {
    __m512 r[16], t[16], u[16], v[16];
    for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * lds);
    for (int i = 0; i < 8; ++i) {
      t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
      t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    // u[4g + c] holds column (4 * lane + c) of rows 4g .. 4g+3.
    for (int g = 0; g < 4; ++g) {
      __m512 *tt = t + 4 * g, *uu = u + 4 * g;
      uu[0] = _mm512_shuffle_ps(tt[0], tt[2], 0x44);
      uu[1] = _mm512_shuffle_ps(tt[0], tt[2], 0xEE);
      uu[2] = _mm512_shuffle_ps(tt[1], tt[3], 0x44);
      uu[3] = _mm512_shuffle_ps(tt[1], tt[3], 0xEE);
    }
    for (int c = 0; c < 4; ++c) {
      v[c] = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x88);
      v[4 + c] = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xDD);
      v[8 + c] = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x88);
      v[12 + c] = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xDD);
    }
    for (int c = 0; c < 4; ++c) {
      _mm512_storeu_ps(dst + c * ldd, _mm512_shuffle_f32x4(v[c], v[8 + c], 0x88));
      _mm512_storeu_ps(dst + (8 + c) * ldd, _mm512_shuffle_f32x4(v[c], v[8 + c], 0xDD));
      _mm512_storeu_ps(dst + (4 + c) * ldd, _mm512_shuffle_f32x4(v[4 + c], v[12 + c], 0x88));
      _mm512_storeu_ps(dst + (12 + c) * ldd, _mm512_shuffle_f32x4(v[4 + c], v[12 + c], 0xDD));
    }
  }
};

struct VecAvx512F64 {
  using T = double;
  static constexpr int L = 8;
  using reg = __m512d;

  static inline __mmask8 lanes_below(int n) { return __mmask8((1u << n) - 1u); }
  static inline reg zero() { return _mm512_setzero_pd(); }
  static inline reg bcast(T x) { return _mm512_set1_pd(x); }
  static inline reg load(const T* p) { return _mm512_loadu_pd(p); }
  static inline reg load_n(const T* p, int n) { return _mm512_maskz_loadu_pd(lanes_below(n), p); }
  static inline void store(T* p, reg x) { _mm512_storeu_pd(p, x); }
  static inline void store_n(T* p, reg x, int n) { _mm512_mask_storeu_pd(p, lanes_below(n), x); }
  static inline reg fma(reg a, reg b, reg c) { return _mm512_fmadd_pd(a, b, c); }
  static inline T hsum(reg a) { return _mm512_reduce_add_pd(a); }
  static inline reg add(reg a, reg b) { return _mm512_add_pd(a, b); }
  static inline reg sub(reg a, reg b) { return _mm512_sub_pd(a, b); }
  static inline reg mul(reg a, reg b) { return _mm512_mul_pd(a, b); }
  static inline reg div(reg a, reg b) { return _mm512_div_pd(a, b); }
  static inline reg sqrt(reg a) { return _mm512_sqrt_pd(a); }
  static inline reg relu(reg a) { return _mm512_max_pd(_mm512_setzero_pd(), a); }
  static inline uint32_t gt0_bits(reg a) {
    return _mm512_cmp_pd_mask(a, _mm512_setzero_pd(), _CMP_GT_OQ);
  }
  static inline reg keep_bits(uint32_t bits, reg a) { return _mm512_maskz_mov_pd(__mmask8(bits), a); }
  static inline void transpose(const T* src, int64_t lds, T* dst, int64_t ldd) {
    VecGeneric<double, 8>::transpose(src, lds, dst, ldd);
  }
};

}  // namespace fastmlp::cpu::FASTMLP_ISA_NS
