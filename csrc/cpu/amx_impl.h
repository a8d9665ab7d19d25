// The bfloat16 GEMM on AMX tiles (interface: amx.h), written once against the tile intrinsics and
// compiled twice: with the real instructions (gemm_amx.cpp) and with the portable emulator of the
// same intrinsics (amx_emulator.h, gemm_amx_emulated.cpp), so the test suite runs this code on any
// CPU and, where AMX exists, the two must agree bit for bit.
//
// Blocking: C is made in 32 x 32 blocks, four 16 x 16 float32 tiles (tmm0-3) that stay in the tile
// registers for the whole sum; each step of 32 along K loads two A tiles (tmm4-5: 16 rows x 32 bf16)
// and two B tiles (tmm6-7: 16 VNNI rows = 32 K values x 16 columns) and issues four TDPBF16PS. The
// finished block is stored to a small float32 buffer, from which the epilogue (bias, ReLU, mask,
// rounding to bf16) writes the valid rows and columns: M and N tails cost padding, never a read or
// write past the caller's data.
//
// Included after FASTMLP_AMX_NS is defined and the _tile_* intrinsics are declared.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "amx.h"

namespace fastmlp::cpu {
void* scratch(int64_t bytes);  // thread-local, 64-byte aligned, grows only (dispatch.cpp)
}

namespace fastmlp::cpu::FASTMLP_AMX_NS {

// float32 -> bfloat16, round to nearest even (NaN stays NaN), as torch does. Branch-free, so that
// the compiler vectorizes the packing loops below.
inline bf16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const uint32_t quiet_nan = (u >> 16) | 0x40u;
  return bf16_t((u & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded);
}
inline float from_bf16(bf16_t h) {
  const uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// Element idx of an operand stored as float32 (rounded here) or bf16.
inline bf16_t operand(const void* p, bool f32, int64_t idx) {
  return f32 ? to_bf16(static_cast<const float*>(p)[idx]) : static_cast<const bf16_t*>(p)[idx];
}

// dst[0 .. n) = the n contiguous elements at src (float32 rounded, or bf16), dst[n .. width) = 0.
// Packing is a pass over every operand per call, as long as the tile math itself at these sizes
// (BENCHMARKS.md): the loops are kept simple enough for the compiler to vectorize.
inline void convert_row(const void* src, bool f32, int64_t n, int64_t width, bf16_t* dst) {
  if (f32) {
    const float* s = static_cast<const float*>(src);
    for (int64_t p = 0; p < n; ++p) dst[p] = to_bf16(s[p]);
  } else {
    std::memcpy(dst, src, size_t(n) * sizeof(bf16_t));
  }
  std::memset(dst + n, 0, size_t(width - n) * sizeof(bf16_t));
}

// Portable 16-lane vectors of 32-bit words (GCC/Clang vector extensions: lowered to the target's
// own registers, AVX-512 in gemm_amx.cpp, SSE2 in the emulated build, the same code either way).
typedef uint32_t v16u __attribute__((vector_size(64)));

// Two-vector shuffle with constant lane indices (>= 16: lanes of the second vector): GCC's builtin
// (every version; __builtin_shufflevector only from GCC 12) or Clang's.
#ifdef __clang__
#define FASTMLP_SHUFFLE2(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define FASTMLP_SHUFFLE2(a, b, ...) __builtin_shuffle(a, b, v16u{__VA_ARGS__})
#endif

// One stage of the 16 x 16 transpose below: rows x (index i) and y (index i + B, bit B of i clear)
// exchange the lanes whose index has bit B set in x with those that have it clear in y.
inline void swap_lanes_1(v16u& x, v16u& y) {
  const v16u a = x, b = y;
  x = FASTMLP_SHUFFLE2(a, b, 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30);
  y = FASTMLP_SHUFFLE2(a, b, 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
}
inline void swap_lanes_2(v16u& x, v16u& y) {
  const v16u a = x, b = y;
  x = FASTMLP_SHUFFLE2(a, b, 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29);
  y = FASTMLP_SHUFFLE2(a, b, 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
}
inline void swap_lanes_4(v16u& x, v16u& y) {
  const v16u a = x, b = y;
  x = FASTMLP_SHUFFLE2(a, b, 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27);
  y = FASTMLP_SHUFFLE2(a, b, 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
}
inline void swap_lanes_8(v16u& x, v16u& y) {
  const v16u a = x, b = y;
  x = FASTMLP_SHUFFLE2(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23);
  y = FASTMLP_SHUFFLE2(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
}

// dst row r = column r of the 16 x 16 block of 32-bit words at src (row strides lds and ldd, in
// words): four stages, each swapping one bit of the row index with the same bit of the lane index.
inline void transpose16_u32(const uint32_t* src, int64_t lds, uint32_t* dst, int64_t ldd) {
  v16u r[16];
  for (int i = 0; i < 16; ++i) std::memcpy(&r[i], src + i * lds, sizeof(v16u));
  for (int i = 0; i < 16; ++i)
    if (!(i & 1)) swap_lanes_1(r[i], r[i + 1]);
  for (int i = 0; i < 16; ++i)
    if (!(i & 2)) swap_lanes_2(r[i], r[i + 2]);
  for (int i = 0; i < 16; ++i)
    if (!(i & 4)) swap_lanes_4(r[i], r[i + 4]);
  for (int i = 0; i < 8; ++i) swap_lanes_8(r[i], r[i + 8]);
  for (int i = 0; i < 16; ++i) std::memcpy(dst + i * ldd, &r[i], sizeof(v16u));
}

inline void pack_a(const GemmLow& g, bf16_t* dst) {
  const int64_t kp = amx_pad(g.inner, kAmxK), mp = amx_pad(g.rows, kAmxRows);
  const size_t row_bytes = size_t(kp) * sizeof(bf16_t);
  if (g.a_cs == 1) {  // rows contiguous (x, dz in dX)
    for (int64_t i = 0; i < g.rows; ++i) {
      const int64_t at = i * g.a_rs * (g.a_f32 ? 4 : 2);
      convert_row(static_cast<const char*>(g.a) + at, g.a_f32, g.inner, kp, dst + i * kp);
    }
  } else if (g.a_rs == 1) {  // A = dz.T in dW: each source row p holds column p of 16 packed rows
    std::memset(dst, 0, size_t(g.rows) * row_bytes);
    alignas(64) bf16_t col[16];
    for (int64_t i0 = 0; i0 < g.rows; i0 += 16) {
      const int64_t n = g.rows - i0 < 16 ? g.rows - i0 : 16;
      for (int64_t p = 0; p < g.inner; ++p) {
        const int64_t at = (i0 + p * g.a_cs) * (g.a_f32 ? 4 : 2);
        convert_row(static_cast<const char*>(g.a) + at, g.a_f32, n, n, col);
        for (int64_t r = 0; r < n; ++r) dst[(i0 + r) * kp + p] = col[r];
      }
    }
  } else {
    for (int64_t i = 0; i < g.rows; ++i) {
      bf16_t* row = dst + i * kp;
      int64_t p = 0;
      for (; p < g.inner; ++p) row[p] = operand(g.a, g.a_f32, i * g.a_rs + p * g.a_cs);
      std::memset(row + p, 0, size_t(kp - p) * sizeof(bf16_t));
    }
  }
  std::memset(dst + g.rows * kp, 0, size_t(mp - g.rows) * row_bytes);
}

// Words k2 < pairs of a VNNI sub-panel from 16 whole columns (from jc) of a B with contiguous rows
// (row stride rs elements, float32 rounded or bf16): word (k2, n) = B(2 k2, jc + n) | B(2 k2 + 1, jc + n) << 16.
template <bool F32>
inline void pair_rows(const char* b, int64_t rs, int64_t jc, int64_t pairs, uint32_t* sub) {
  using E = std::conditional_t<F32, float, bf16_t>;
  const E* base = reinterpret_cast<const E*>(b) + jc;
  auto value = [](E e) -> uint32_t {
    if constexpr (F32) return to_bf16(e);
    else return e;
  };
  for (int64_t k2 = 0; k2 < pairs; ++k2) {
    const E* lo = base + 2 * k2 * rs;
    const E* hi = lo + rs;
    uint32_t* row = sub + k2 * 16;
    for (int n = 0; n < 16; ++n) row[n] = value(lo[n]) | value(hi[n]) << 16;
  }
}

// Columns [j0, j0 + 32) of B as two VNNI sub-panels of 16 columns: sub-panel s holds B(p, j0 + 16 s + n)
// at [(p / 2) * 32 + n * 2 + p % 2], zero past the last column and K value; viewed as 32-bit words,
// word (p / 2, n) of the sub-panel is the pair (B(p, j), B(p + 1, j)).
// `work` holds 16 * kp bf16 (the transposed case).
inline void pack_b_panel(const GemmLow& g, int64_t j0, int64_t kp, bf16_t* dst, bf16_t* work) {
  const int64_t esize = g.b_f32 ? 4 : 2;
  const char* b = static_cast<const char*>(g.b);
  for (int s = 0; s < 2; ++s) {
    uint32_t* sub = reinterpret_cast<uint32_t*>(dst + s * kp * 16);
    const int64_t jc = j0 + 16 * s;
    const int64_t ncols = g.cols - jc < 16 ? (g.cols - jc > 0 ? g.cols - jc : 0) : 16;
    if (g.b_rs == 1) {
      // B = w.T (the forward): column j of B is row j of w, contiguous along K. Each is converted
      // into a row of `work`, whose 32-bit words are then exactly the VNNI pairs: a 16 x 16 word
      // transpose per block of 32 K values puts them in place.
      for (int64_t n = 0; n < 16; ++n) {
        if (n < ncols) convert_row(b + (jc + n) * g.b_cs * esize, g.b_f32, g.inner, kp, work + n * kp);
        else std::memset(work + n * kp, 0, size_t(kp) * sizeof(bf16_t));
      }
      const uint32_t* words = reinterpret_cast<const uint32_t*>(work);
      for (int64_t q = 0; q < kp / 2; q += 16) transpose16_u32(words + q, kp / 2, sub + q * 16, 16);
    } else if (g.b_cs == 1) {
      // Rows of B contiguous (w in dX, x in dW): word (k2, n) joins B(2 k2, j) and B(2 k2 + 1, j).
      alignas(64) bf16_t lo[16], hi[16];
      const int64_t full_pairs = ncols == 16 ? g.inner / 2 : 0;  // pairs of whole rows: a fixed-length loop
      if (g.b_f32) pair_rows<true>(b, g.b_rs, jc, full_pairs, sub);
      else pair_rows<false>(b, g.b_rs, jc, full_pairs, sub);
      for (int64_t k2 = full_pairs; k2 < kp / 2; ++k2) {
        const int64_t p = 2 * k2;
        if (p < g.inner) convert_row(b + (p * g.b_rs + jc) * esize, g.b_f32, ncols, 16, lo);
        else std::memset(lo, 0, sizeof lo);
        if (p + 1 < g.inner) convert_row(b + ((p + 1) * g.b_rs + jc) * esize, g.b_f32, ncols, 16, hi);
        else std::memset(hi, 0, sizeof hi);
        uint32_t* row = sub + k2 * 16;
        for (int n = 0; n < 16; ++n) row[n] = uint32_t(lo[n]) | uint32_t(hi[n]) << 16;
      }
    } else {
      bf16_t* sub16 = reinterpret_cast<bf16_t*>(sub);
      for (int64_t k2 = 0; k2 < kp / 2; ++k2) {
        bf16_t* row = sub16 + k2 * 32;
        for (int e = 0; e < 2; ++e) {
          const int64_t p = 2 * k2 + e;
          int64_t n = 0;
          if (p < g.inner)
            for (; n < ncols; ++n) row[2 * n + e] = operand(g.b, g.b_f32, p * g.b_rs + (jc + n) * g.b_cs);
          for (; n < 16; ++n) row[2 * n + e] = 0;
        }
      }
    }
  }
}

// The epilogue of one 32 x 32 block (rows from i0, columns from j0, ncols valid) held in tmp.
inline void finish_block(const GemmLow& g, const float* tmp, int64_t i0, int64_t j0, int ncols) {
  const int64_t rows = g.rows - i0 < kAmxRows ? g.rows - i0 : kAmxRows;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = i0 + r;
    uint32_t bits = 0;
    for (int n = 0; n < ncols; ++n) {
      float v = tmp[r * kAmxCols + n];
      if (g.bias) v += g.bias[j0 + n];
      if (g.mask_in && !((g.mask_in[i * g.ldm_in + (j0 + n) / 8] >> ((j0 + n) % 8)) & 1)) v = 0.0f;
      const bf16_t h = to_bf16(v);
      const float stored = g.c16 || g.round_c32 ? from_bf16(h) : v;
      bool zero = false;
      if (g.relu) {
        if (stored > 0.0f) bits |= 1u << n;
        else zero = !(stored != stored);  // ReLU keeps NaN, like torch.relu
      }
      if (g.c16) g.c16[i * g.ldc + j0 + n] = zero ? bf16_t(0) : h;
      else g.c32[i * g.ldc + j0 + n] = zero ? 0.0f : stored;
    }
    if (g.relu && g.mask)
      for (int k = 0; k < (ncols + 7) / 8; ++k) g.mask[i * g.ldm + j0 / 8 + k] = uint8_t(bits >> (8 * k));
  }
}

struct alignas(64) TileConfig {
  uint8_t palette_id = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

inline void gemm_cols(const GemmLow& g, const bf16_t* a_packed, int64_t c0, int64_t c1) {
  const int64_t kp = amx_pad(g.inner, kAmxK), mp = amx_pad(g.rows, kAmxRows);
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) cfg.rows[t] = 16, cfg.colsb[t] = 64;
  _tile_loadconfig(&cfg);
  bf16_t* panel = static_cast<bf16_t*>(scratch(int64_t(sizeof(bf16_t)) * 3 * kp * 16 + int64_t(sizeof(float)) * kAmxRows * kAmxCols));
  float* tmp = reinterpret_cast<float*>(panel + 2 * kp * 16);
  bf16_t* work = reinterpret_cast<bf16_t*>(tmp + kAmxRows * kAmxCols);  // pack_b_panel's
  const bf16_t* b0 = panel;
  const bf16_t* b1 = panel + kp * 16;
  const long lda = long(kp * sizeof(bf16_t));
  for (int64_t j0 = c0; j0 < c1; j0 += kAmxCols) {
    pack_b_panel(g, j0, kp, panel, work);
    for (int64_t i0 = 0; i0 < mp; i0 += kAmxRows) {
      const bf16_t* a0 = a_packed + i0 * kp;
      const bf16_t* a1 = a0 + 16 * kp;
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t k = 0; k < kp; k += kAmxK) {
        _tile_loadd(4, a0 + k, lda);
        _tile_loadd(5, a1 + k, lda);
        _tile_loadd(6, b0 + k * 16, 64);  // VNNI rows k / 2 .. k / 2 + 15, 32 bf16 each
        _tile_loadd(7, b1 + k * 16, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
      _tile_stored(0, tmp, 128);
      _tile_stored(1, tmp + 16, 128);
      _tile_stored(2, tmp + 16 * kAmxCols, 128);
      _tile_stored(3, tmp + 16 * kAmxCols + 16, 128);
      finish_block(g, tmp, i0, j0, int(c1 - j0 < kAmxCols ? c1 - j0 : kAmxCols));
    }
  }
  _tile_release();
}

}  // namespace fastmlp::cpu::FASTMLP_AMX_NS
