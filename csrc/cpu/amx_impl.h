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

#include "amx.h"

namespace fastmlp::cpu {
void* scratch(int64_t bytes);  // thread-local, 64-byte aligned, grows only (dispatch.cpp)
}

namespace fastmlp::cpu::FASTMLP_AMX_NS {

// float32 -> bfloat16, round to nearest even (NaN stays NaN), as torch does.
inline bf16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16_t((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16_t(u >> 16);
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

inline void pack_a(const GemmLow& g, bf16_t* dst) {
  const int64_t kp = amx_pad(g.inner, kAmxK), mp = amx_pad(g.rows, kAmxRows);
  for (int64_t i = 0; i < mp; ++i) {
    bf16_t* row = dst + i * kp;
    int64_t p = 0;
    if (i < g.rows) {
      const int64_t base = i * g.a_rs;
      if (g.a_cs == 1 && g.a_f32)
        for (const float* src = static_cast<const float*>(g.a) + base; p < g.inner; ++p) row[p] = to_bf16(src[p]);
      else
        for (; p < g.inner; ++p) row[p] = operand(g.a, g.a_f32, base + p * g.a_cs);
    }
    std::memset(row + p, 0, size_t(kp - p) * sizeof(bf16_t));
  }
}

// Columns [j0, j0 + 32) of B as two VNNI sub-panels of 16 columns: sub-panel s holds B(p, j0 + 16 s + n)
// at [(p / 2) * 32 + n * 2 + p % 2], zero past the last column and K value.
// Written row by row of the panel (one K pair, 16 columns: 64 contiguous bytes), reading 16 column
// streams of B (the weight's rows in the forward) or two of its rows (dX, dW).
inline void pack_b_panel(const GemmLow& g, int64_t j0, int64_t kp, bf16_t* dst) {
  for (int s = 0; s < 2; ++s) {
    bf16_t* sub = dst + s * kp * 16;
    const int ncols = int(g.cols - (j0 + 16 * s) < 16 ? g.cols - (j0 + 16 * s) : 16);
    for (int64_t k2 = 0; k2 < kp / 2; ++k2) {
      bf16_t* row = sub + k2 * 32;
      for (int e = 0; e < 2; ++e) {
        const int64_t p = 2 * k2 + e;
        int n = 0;
        if (p < g.inner)
          for (; n < ncols; ++n) row[2 * n + e] = operand(g.b, g.b_f32, p * g.b_rs + (j0 + 16 * s + n) * g.b_cs);
        for (; n < 16; ++n) row[2 * n + e] = 0;
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
      const bf16_t h = to_bf16(v);
      const float stored = g.c16 ? from_bf16(h) : v;
      bool zero = false;
      if (g.relu) {
        if (stored > 0.0f) bits |= 1u << n;
        else zero = !(stored != stored);  // ReLU keeps NaN, like torch.relu
      }
      if (g.c16) g.c16[i * g.ldc + j0 + n] = zero ? bf16_t(0) : h;
      else g.c32[i * g.ldc + j0 + n] = zero ? 0.0f : v;
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
  bf16_t* panel = static_cast<bf16_t*>(scratch(int64_t(sizeof(bf16_t)) * 2 * kp * 16 + int64_t(sizeof(float)) * kAmxRows * kAmxCols));
  float* tmp = reinterpret_cast<float*>(panel + 2 * kp * 16);
  const bf16_t* b0 = panel;
  const bf16_t* b1 = panel + kp * 16;
  const long lda = long(kp * sizeof(bf16_t));
  for (int64_t j0 = c0; j0 < c1; j0 += kAmxCols) {
    pack_b_panel(g, j0, kp, panel);
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
