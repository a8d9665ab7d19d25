// A portable emulator of the AMX intrinsics amx_impl.h uses, so that kernel code runs (and is
// tested) on any CPU: compiled into the extension as the "amx-emulated" kernels, a testing aid that
// is never selected automatically (fastmlp.set_cpu_isa("amx-emulated") or FASTMLP_CPU_ISA).
//
// Modelled: the eight tile registers of palette 1 (at most 16 rows of 64 bytes) of the calling
// thread, set by _tile_loadconfig; loads and stores of rows[t] rows of colsb[t] bytes; TDPBF16PS as
// the Intel SDM defines it: for each row m of C, K pairs ascending, C[m][n] += A[m][2k] * B[k][2n],
// then += A[m][2k + 1] * B[k][2n + 1], each product exact and each addition rounded to nearest even
// (one fmaf), bf16 subnormal inputs read as zero and subnormal results flushed to zero. Misuse
// (no configuration, shapes that do not chain) aborts with a message, as the hardware would fault.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace fastmlp::cpu::amx_emu {

struct Tiles {
  bool configured = false;
  uint8_t rows[8] = {};
  uint16_t colsb[8] = {};
  alignas(64) uint8_t data[8][16][64] = {};
};
inline thread_local Tiles tiles;

[[noreturn]] inline void fault(const char* what) {
  std::fprintf(stderr, "fastmlp AMX emulator: %s\n", what);
  std::abort();
}

inline void check(int t) {
  if (!tiles.configured) fault("tile instruction without a tile configuration");
  if (t < 0 || t > 7) fault("no such tile register");
}

inline float bf16_value(uint16_t h) {
  if ((h & 0x7f80u) == 0) h &= 0x8000u;  // subnormal (or zero) input: zero
  const uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline float flush(float f) { return std::fabs(f) < 1.17549435e-38f ? std::copysign(0.0f, f) : f; }

}  // namespace fastmlp::cpu::amx_emu

inline void _tile_loadconfig(const void* config) {
  using namespace fastmlp::cpu::amx_emu;
  const uint8_t* c = static_cast<const uint8_t*>(config);
  if (c[0] != 1) fault("only palette 1 is modelled");
  for (int t = 0; t < 8; ++t) {
    uint16_t colsb;
    std::memcpy(&colsb, c + 16 + 2 * t, 2);
    tiles.colsb[t] = colsb;
    tiles.rows[t] = c[48 + t];
    if (colsb > 64 || tiles.rows[t] > 16) fault("tile larger than 16 rows x 64 bytes");
  }
  tiles.configured = true;
}

inline void _tile_release() { fastmlp::cpu::amx_emu::tiles = {}; }

inline void _tile_zero(int t) {
  using namespace fastmlp::cpu::amx_emu;
  check(t);
  std::memset(tiles.data[t], 0, sizeof tiles.data[t]);
}

inline void _tile_loadd(int t, const void* base, long stride) {
  using namespace fastmlp::cpu::amx_emu;
  check(t);
  std::memset(tiles.data[t], 0, sizeof tiles.data[t]);
  for (int r = 0; r < tiles.rows[t]; ++r)
    std::memcpy(tiles.data[t][r], static_cast<const uint8_t*>(base) + r * stride, tiles.colsb[t]);
}

inline void _tile_stored(int t, void* base, long stride) {
  using namespace fastmlp::cpu::amx_emu;
  check(t);
  for (int r = 0; r < tiles.rows[t]; ++r)
    std::memcpy(static_cast<uint8_t*>(base) + r * stride, tiles.data[t][r], tiles.colsb[t]);
}

inline void _tile_dpbf16ps(int c, int a, int b) {
  using namespace fastmlp::cpu::amx_emu;
  check(c), check(a), check(b);
  const int m_rows = tiles.rows[c], pairs = tiles.colsb[a] / 4, n_cols = tiles.colsb[c] / 4;
  if (tiles.rows[a] != m_rows || tiles.rows[b] != pairs || tiles.colsb[b] != tiles.colsb[c])
    fault("TDPBF16PS operand shapes do not chain");
  for (int m = 0; m < m_rows; ++m) {
    float acc[16];
    std::memcpy(acc, tiles.data[c][m], sizeof acc);
    uint16_t arow[32];
    std::memcpy(arow, tiles.data[a][m], sizeof arow);
    for (int k = 0; k < pairs; ++k) {
      uint16_t brow[32];
      std::memcpy(brow, tiles.data[b][k], sizeof brow);
      for (int n = 0; n < n_cols; ++n)
        for (int e = 0; e < 2; ++e)
          acc[n] = flush(std::fmaf(bf16_value(arow[2 * k + e]), bf16_value(brow[2 * n + e]), acc[n]));
    }
    std::memcpy(tiles.data[c][m], acc, sizeof acc);
  }
}
