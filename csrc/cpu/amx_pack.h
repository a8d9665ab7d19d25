// The operand packing and the epilogue of the bfloat16 GEMMs (interface: amx.h), shared by the
// AMX tile kernel (amx_impl.h) and the AVX512-BF16 kernel (dpbf16_impl.h): A packed into bf16 rows
// padded along K to a multiple of 32 (and rows to a multiple of 32), B per 32-column panel into the
// VNNI-2 pairs both TDPBF16PS and VDPBF16PS read, float32 operands rounded to bf16 while packed;
// the epilogue from a 32 x 32 float32 block of finished sums.
//
// Included by each kernel's translation unit after FASTMLP_AMX_NS is defined, so that every build
// (and instruction set) of it keeps its own symbols.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

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
template <int B, std::size_t... I>
inline void swap_lanes(v16u& x, v16u& y, std::index_sequence<I...>) {
  const v16u a = x, b = y;
  x = FASTMLP_SHUFFLE2(a, b, (I & B ? 16 + int(I) - B : int(I))...);
  y = FASTMLP_SHUFFLE2(a, b, (I & B ? 16 + int(I) : int(I) + B)...);
}
template <int B>
inline void swap_lanes(v16u& x, v16u& y) {
  swap_lanes<B>(x, y, std::make_index_sequence<16>{});
}

// dst row r = column r of the 16 x 16 block of 32-bit words at src (row strides lds and ldd, in
// words): four stages, each swapping one bit of the row index with the same bit of the lane index.
inline void transpose16_u32(const uint32_t* src, int64_t lds, uint32_t* dst, int64_t ldd) {
  v16u r[16];
  for (int i = 0; i < 16; ++i) std::memcpy(&r[i], src + i * lds, sizeof(v16u));
  for (int i = 0; i < 16; ++i)
    if (!(i & 1)) swap_lanes<1>(r[i], r[i + 1]);
  for (int i = 0; i < 16; ++i)
    if (!(i & 2)) swap_lanes<2>(r[i], r[i + 2]);
  for (int i = 0; i < 16; ++i)
    if (!(i & 4)) swap_lanes<4>(r[i], r[i + 4]);
  for (int i = 0; i < 8; ++i) swap_lanes<8>(r[i], r[i + 8]);
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

// A GEMM thread's buffers for one 32-column panel: the two packed VNNI sub-panels of B (b0, b1),
// pack_b_panel's work rows and a 32 x 32 block of float32 sums; in this thread's scratch.
struct PanelBuffers {
  bf16_t* panel;  // b0 = panel, b1 = panel + kp * 16
  bf16_t* work;
  float* sums;
};
inline PanelBuffers panel_buffers(int64_t kp) {
  bf16_t* panel = static_cast<bf16_t*>(
      scratch(int64_t(sizeof(bf16_t)) * 3 * kp * 16 + int64_t(sizeof(float)) * kAmxRows * kAmxCols));
  float* sums = reinterpret_cast<float*>(panel + 2 * kp * 16);
  return {panel, reinterpret_cast<bf16_t*>(sums + kAmxRows * kAmxCols), sums};
}

// The epilogue of one 32 x 32 block (rows from i0, columns from j0, ncols valid) held in tmp. Each
// row goes through fixed-length loops over all 32 columns (the compiler vectorizes them; columns
// past ncols are computed from tmp's padding and never stored): at batch 64 the weight gradient's
// epilogue alone is 200K elements per step.
inline void finish_block(const GemmLow& g, const float* tmp, int64_t i0, int64_t j0, int ncols) {
  const int64_t rows = g.rows - i0 < kAmxRows ? g.rows - i0 : kAmxRows;
  const bool rounded = g.c16 || g.round_c32;
  alignas(64) float v[kAmxCols];
  alignas(64) bf16_t h[kAmxCols];
  alignas(64) uint8_t keep[kAmxCols], pos[kAmxCols];
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = i0 + r;
    for (int n = 0; n < kAmxCols; ++n) v[n] = tmp[r * kAmxCols + n];
    if (g.bias)
      for (int n = 0; n < kAmxCols; ++n) v[n] += n < ncols ? g.bias[j0 + n] : 0.0f;
    if (g.mask_in) {  // j0 is a multiple of 32: the row's bits start at a whole byte
      const uint8_t* in = g.mask_in + i * g.ldm_in + j0 / 8;
      alignas(64) uint8_t bytes[kAmxCols / 8] = {};
      for (int k = 0; k < (ncols + 7) / 8; ++k) bytes[k] = in[k];
      for (int n = 0; n < kAmxCols; ++n) v[n] = (bytes[n / 8] >> (n % 8)) & 1 ? v[n] : 0.0f;
    }
    for (int n = 0; n < kAmxCols; ++n) h[n] = to_bf16(v[n]);
    if (rounded)
      for (int n = 0; n < kAmxCols; ++n) v[n] = from_bf16(h[n]);
    if (g.relu) {  // ReLU keeps NaN, like torch.relu; the mask bit is the stored value's > 0
      for (int n = 0; n < kAmxCols; ++n) pos[n] = v[n] > 0.0f;
      for (int n = 0; n < kAmxCols; ++n) keep[n] = pos[n] | (v[n] != v[n]);
      for (int n = 0; n < kAmxCols; ++n) {
        v[n] = keep[n] ? v[n] : 0.0f;
        h[n] = keep[n] ? h[n] : bf16_t(0);
      }
      if (g.mask) {
        for (int k = 0; k < (ncols + 7) / 8; ++k)
          g.mask[i * g.ldm + j0 / 8 + k] =
              bits_of_bytes(pos + 8 * k) & uint8_t(k * 8 + 8 <= ncols ? 0xff : (1u << (ncols % 8)) - 1);
      }
    }
    if (g.c16) std::memcpy(g.c16 + i * g.ldc + j0, h, size_t(ncols) * sizeof(bf16_t));
    else std::memcpy(g.c32 + i * g.ldc + j0, v, size_t(ncols) * sizeof(float));
  }
}

}  // namespace fastmlp::cpu::FASTMLP_AMX_NS
