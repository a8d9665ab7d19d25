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

#include "amx_pack.h"

namespace fastmlp::cpu::FASTMLP_AMX_NS {

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
  const PanelBuffers buf = panel_buffers(kp);
  float* tmp = buf.sums;
  const bf16_t* b0 = buf.panel;
  const bf16_t* b1 = buf.panel + kp * 16;
  const long lda = long(kp * sizeof(bf16_t));
  for (int64_t j0 = c0; j0 < c1; j0 += kAmxCols) {
    pack_b_panel(g, j0, kp, buf.panel, buf.work);
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
