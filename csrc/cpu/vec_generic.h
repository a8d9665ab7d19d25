// Portable "vector" of L lanes: plain arrays the compiler may auto-vectorize. Serves every CPU,
// and is the reference the wide ISAs are tested against.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace fastmlp::cpu::FASTMLP_ISA_NS {

// x rounded to the nearest bfloat16 (ties to even), as a float: torch's float32 -> bfloat16
// conversion. NaN stays NaN (quieted).
inline float round_to_bf16(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) u |= 0x00400000u;
  else u += 0x7fffu + ((u >> 16) & 1u);
  u &= 0xffff0000u;
  std::memcpy(&x, &u, sizeof x);
  return x;
}

template <typename T_, int L_>
struct VecGeneric {
  using T = T_;
  static constexpr int L = L_;
  struct reg {
    T v[L];
  };

  static inline reg zero() {
    reg r;
    for (int l = 0; l < L; ++l) r.v[l] = T(0);
    return r;
  }
  static inline reg bcast(T x) {
    reg r;
    for (int l = 0; l < L; ++l) r.v[l] = x;
    return r;
  }
  static inline reg load(const T* p) {
    reg r;
    for (int l = 0; l < L; ++l) r.v[l] = p[l];
    return r;
  }
  static inline reg load_n(const T* p, int n) {
    reg r;
    for (int l = 0; l < L; ++l) r.v[l] = l < n ? p[l] : T(0);
    return r;
  }
  static inline void store(T* p, const reg& x) {
    for (int l = 0; l < L; ++l) p[l] = x.v[l];
  }
  // The sum of the lanes, pairwise (lane l + lane l + L/2, and so on down), as the wide ISAs do.
  static inline T hsum(const reg& x) {
    T t[L];
    for (int l = 0; l < L; ++l) t[l] = x.v[l];
    for (int w = L / 2; w >= 1; w /= 2)
      for (int l = 0; l < w; ++l) t[l] += t[l + w];
    return t[0];
  }
  static inline void store_n(T* p, const reg& x, int n) {
    for (int l = 0; l < n; ++l) p[l] = x.v[l];
  }
  static inline reg fma(const reg& a, const reg& b, const reg& c) {
    reg r;
    for (int l = 0; l < L; ++l) r.v[l] = a.v[l] * b.v[l] + c.v[l];
    return r;
  }
  static inline reg add(const reg& a, const reg& b) {
    reg r;
    for (int l = 0; l < L; ++l) r.v[l] = a.v[l] + b.v[l];
    return r;
  }
  static inline reg sub(const reg& a, const reg& b) {
    reg r;
    for (int l = 0; l < L; ++l) r.v[l] = a.v[l] - b.v[l];
    return r;
  }
  static inline reg mul(const reg& a, const reg& b) {
    reg r;
    for (int l = 0; l < L; ++l) r.v[l] = a.v[l] * b.v[l];
    return r;
  }
  static inline reg div(const reg& a, const reg& b) {
    reg r;
    for (int l = 0; l < L; ++l) r.v[l] = a.v[l] / b.v[l];
    return r;
  }
  static inline reg sqrt(const reg& a) {
    reg r;
    for (int l = 0; l < L; ++l) r.v[l] = std::sqrt(a.v[l]);
    return r;
  }
  // max(0, x) that keeps NaN, like torch.relu.
  static inline reg relu(const reg& a) {
    reg r;
    for (int l = 0; l < L; ++l) r.v[l] = T(0) > a.v[l] ? T(0) : a.v[l];
    return r;
  }
  static inline uint32_t gt0_bits(const reg& a) {
    uint32_t bits = 0;
    for (int l = 0; l < L; ++l) bits |= uint32_t(a.v[l] > T(0)) << l;
    return bits;
  }
  static inline reg keep_bits(uint32_t bits, const reg& a) {
    reg r;
    for (int l = 0; l < L; ++l) r.v[l] = (bits >> l) & 1u ? a.v[l] : T(0);
    return r;
  }
  // Rounded to the nearest bfloat16 (ties to even; NaN stays NaN), kept in float32 (float lanes only).
  static inline reg round_bf16(const reg& a) {
    reg r;
    for (int l = 0; l < L; ++l) r.v[l] = round_to_bf16(a.v[l]);
    return r;
  }
  // dst[j * ldd + i] = src[i * lds + j] for an L x L block.
  static inline void transpose(const T* src, int64_t lds, T* dst, int64_t ldd) {
    for (int i = 0; i < L; ++i)
      for (int j = 0; j < L; ++j) dst[j * ldd + i] = src[i * lds + j];
  }
};

}  // namespace fastmlp::cpu::FASTMLP_ISA_NS
