// The bfloat16 GEMM on AVX512-BF16 (VDPBF16PS: 16 float32 sums, each += two bf16 products), for CPUs
// with AVX512-BF16 and no AMX (AMD Zen 4 and 5): the AMX kernel's packing and epilogue (amx_pack.h)
// with the tile math replaced by 512-bit dot products. Written once against a lane type D and
// compiled twice, with the instructions (gemm_dpbf16.cpp) and on a portable emulator of them
// (dpbf16_emulator.h, gemm_dpbf16_emulated.cpp), which must agree bit for bit where the CPU has them.
//
// D: reg (16 float32), pairs (16 pairs of bf16); zero(); load(const uint32_t*) -> pairs;
// bcast(uint32_t) -> pairs; dot(reg acc, pairs a, pairs b) -> reg (VDPBF16PS); store(float*, reg).
//
// Blocking: per 32-column panel of packed B (two VNNI sub-panels of 16 columns, one vector per K pair
// each), rows 8 at a time: 16 accumulators, and per K pair two vector loads of B and 8 broadcasts of
// A pairs for 16 dot products. The 32 x 32 block of sums then goes through finish_block.
#pragma once

#include <cstdint>

#include "amx_pack.h"

namespace fastmlp::cpu::FASTMLP_AMX_NS {

inline constexpr int kDpRows = 8;

// Rows [i0, i0 + kDpRows) of the 32-column block: sums to tmp (32 floats per row).
template <class D>
inline void dp_rows(const bf16_t* a_packed, int64_t kp, int64_t i0, const uint32_t* b0, const uint32_t* b1,
                    float* tmp) {
  typename D::reg acc[kDpRows][2];
  for (int r = 0; r < kDpRows; ++r) acc[r][0] = acc[r][1] = D::zero();
  const uint32_t* a[kDpRows];
  for (int r = 0; r < kDpRows; ++r) a[r] = reinterpret_cast<const uint32_t*>(a_packed + (i0 + r) * kp);
  for (int64_t k2 = 0; k2 < kp / 2; ++k2) {
    const auto p0 = D::load(b0 + k2 * 16), p1 = D::load(b1 + k2 * 16);
    for (int r = 0; r < kDpRows; ++r) {
      const auto ar = D::bcast(a[r][k2]);
      acc[r][0] = D::dot(acc[r][0], ar, p0);
      acc[r][1] = D::dot(acc[r][1], ar, p1);
    }
  }
  for (int r = 0; r < kDpRows; ++r) {
    D::store(tmp + r * kAmxCols, acc[r][0]);
    D::store(tmp + r * kAmxCols + 16, acc[r][1]);
  }
}

// Columns [c0, c1) of C (c0 a multiple of kAmxCols) from the packed A; B packed here panel by panel.
template <class D>
inline void dp_gemm_cols(const GemmLow& g, const bf16_t* a_packed, int64_t c0, int64_t c1) {
  const int64_t kp = amx_pad(g.inner, kAmxK), mp = amx_pad(g.rows, kAmxRows);
  const PanelBuffers buf = panel_buffers(kp);
  float* tmp = buf.sums;
  const uint32_t* b0 = reinterpret_cast<const uint32_t*>(buf.panel);
  const uint32_t* b1 = reinterpret_cast<const uint32_t*>(buf.panel + kp * 16);
  for (int64_t j0 = c0; j0 < c1; j0 += kAmxCols) {
    pack_b_panel(g, j0, kp, buf.panel, buf.work);
    for (int64_t i0 = 0; i0 < mp; i0 += kAmxRows) {
      // Row groups wholly past the last row are padding: skipped (finish_block never reads them).
      for (int64_t r0 = i0; r0 < i0 + kAmxRows && r0 < g.rows; r0 += kDpRows)
        dp_rows<D>(a_packed, kp, r0, b0, b1, tmp + (r0 - i0) * kAmxCols);
      finish_block(g, tmp, i0, j0, int(c1 - j0 < kAmxCols ? c1 - j0 : kAmxCols));
    }
  }
}

}  // namespace fastmlp::cpu::FASTMLP_AMX_NS
