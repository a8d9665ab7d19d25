// A portable emulator of the AVX512-BF16 operations dpbf16_impl.h uses, for testing that kernel on
// CPUs without AVX512-BF16 (as amx_emulator.h does for AMX). VDPBF16PS as the Intel SDM defines it:
// per lane, acc += odd pair product, then acc += even pair product, each a fused multiply-add rounded
// to nearest even, bf16 subnormal inputs read as zero, subnormal results flushed to zero.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace fastmlp::cpu {

struct DpEmulated {
  struct reg {
    float v[16];
  };
  struct pairs {
    uint32_t w[16];
  };
  static reg zero() { return reg{}; }
  static pairs load(const uint32_t* p) {
    pairs x;
    std::memcpy(x.w, p, sizeof x.w);
    return x;
  }
  static pairs bcast(uint32_t w) {
    pairs x;
    for (uint32_t& e : x.w) e = w;
    return x;
  }
  static void store(float* p, const reg& x) { std::memcpy(p, x.v, sizeof x.v); }

  // bf16 bits -> float, subnormals (and their sign) read as zero.
  static float value(uint32_t h) {
    if ((h & 0x7f80u) == 0) h &= 0x8000u;
    const uint32_t u = h << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
  }
  static float flush(float x) { return std::fpclassify(x) == FP_SUBNORMAL ? std::copysign(0.0f, x) : x; }

  static reg dot(reg acc, const pairs& a, const pairs& b) {
    for (int j = 0; j < 16; ++j) {
      float s = acc.v[j];
      s = flush(std::fma(value(a.w[j] >> 16), value(b.w[j] >> 16), s));
      s = flush(std::fma(value(a.w[j] & 0xffffu), value(b.w[j] & 0xffffu), s));
      acc.v[j] = s;
    }
    return acc;
  }
};

}  // namespace fastmlp::cpu
