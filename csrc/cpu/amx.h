// Interface of the bfloat16 GEMM on Intel AMX tiles (amx_impl.h): C = A @ B with bf16 operands,
// float32 sums, and the layer epilogue. Raw pointers only (no ATen), like kernels.h.
//
// Operands are read from bfloat16 storage, or from float32 storage and rounded to bf16 (RNE, as
// tensor.to(torch.bfloat16)) while they are packed, so float32 tensors feed the tiles without a
// bf16 copy of their own. A is packed once per call into bf16 rows padded to a multiple of 32 along
// K (zeros: AMX never reads past a row, and 784 is not a multiple of 32) and of 32 rows; B panel by
// panel (32 columns) into the VNNI-2 layout TDPBF16PS reads: pairs of consecutive K values of one
// column side by side.
#pragma once

#include <cstdint>
#include <cstring>

namespace fastmlp::cpu {

using bf16_t = uint16_t;  // the bits of a bfloat16

// The mask byte of eight 0/1 bytes at p (bit e = byte e): one multiply gathers byte e's bit into bit
// 56 + e. The bf16 epilogues make their ReLU masks this way, not a compare and shift per element.
// static: each translation unit keeps its own copy, compiled for its own target instruction set.
static inline uint8_t bits_of_bytes(const uint8_t* p) {
  uint64_t bytes;
  std::memcpy(&bytes, p, sizeof bytes);
  return uint8_t((bytes * 0x0102040810204080ull) >> 56);
}

// C(i, j) = sum_p A(i, p) * B(p, j); A(i, p) = a[i * a_rs + p * a_cs], B(p, j) = b[p * b_rs + j * b_cs].
// Epilogue on each float32 sum, in order: + bias[j] (float32); 0 unless bit j % 8 of
// mask_in[i * ldm_in + j / 8] is set (when mask_in is given: dX through the ReLU below); ReLU (keeping
// NaN), with bit j % 8 of mask[i * ldm + j / 8] set iff the stored value is > 0 (when mask is given);
// stored to c16 (rounded to bf16, RNE) or c32 (float32; rounded to a bf16 value when round_c32),
// leading dimension ldc. TDPBF16PS's arithmetic: each product exact,
// each addition rounded (RNE), k ascending, bf16 subnormal inputs read as 0, subnormal sums flushed.
struct GemmLow {
  int64_t rows = 0, cols = 0, inner = 0;
  const void* a = nullptr;
  int64_t a_rs = 0, a_cs = 0;
  bool a_f32 = false;  // A stored as float32 (else bf16)
  const void* b = nullptr;
  int64_t b_rs = 0, b_cs = 0;
  bool b_f32 = false;
  bf16_t* c16 = nullptr;
  float* c32 = nullptr;
  int64_t ldc = 0;
  bool round_c32 = false;
  const float* bias = nullptr;
  const uint8_t* mask_in = nullptr;
  int64_t ldm_in = 0;
  bool relu = false;
  uint8_t* mask = nullptr;
  int64_t ldm = 0;
};

// The product part of a GemmLow (rows x inner @ inner x cols, operands with their strides and
// storage); the caller adds the output and the epilogue.
inline GemmLow gemm_low(int64_t rows, int64_t inner, int64_t cols, const void* a, int64_t a_rs, int64_t a_cs,
                        bool a_f32, const void* b, int64_t b_rs, int64_t b_cs, bool b_f32) {
  GemmLow g;
  g.rows = rows, g.cols = cols, g.inner = inner;
  g.a = a, g.a_rs = a_rs, g.a_cs = a_cs, g.a_f32 = a_f32;
  g.b = b, g.b_rs = b_rs, g.b_cs = b_cs, g.b_f32 = b_f32;
  return g;
}

inline constexpr int64_t kAmxK = 32;     // bf16 values of K per tile row (64 bytes)
inline constexpr int64_t kAmxRows = 32;  // rows of C per block (two 16-row tiles)
inline constexpr int64_t kAmxCols = 32;  // columns of C per panel (two 16-column tiles)
inline int64_t amx_pad(int64_t n, int64_t to) { return (n + to - 1) / to * to; }

// The bfloat16 GEMM kernels of a CPU: AMX tiles, or AVX512-BF16 dot products (dpbf16_impl.h), each
// also on an emulator. The layer ops use them for bfloat16 (where "auto" does not time ATen faster).
struct AmxKernels {
  const char* name;  // "amx", "avx512-bf16", or either with "-emulated"
  // Packs all of A: amx_pad(rows, kAmxRows) rows of amx_pad(inner, kAmxK) bf16 each.
  void (*pack_a)(const GemmLow& g, bf16_t* dst);
  // Columns [c0, c1) of C (c0 a multiple of kAmxCols) from the packed A; B is packed here, panel by
  // panel, into this thread's scratch. Sets up and releases the tile configuration itself (AMX).
  void (*gemm_cols)(const GemmLow& g, const bf16_t* a_packed, int64_t c0, int64_t c1);
  // Whether the bf16 whole step (mlp_step.cpp) runs its GEMMs here rather than on the float32 kernels
  // with rounded operands: AMX yes (unmeasured); AVX512-BF16 no, measured 1.09-1.25x slower there
  // (BENCHMARKS.md), its per-call packing and the weight gradient's trip through memory costing more
  // than its dot products save.
  bool whole_step;
};

// Defined by gemm_amx.cpp (x86-64 only) and gemm_amx_emulated.cpp; the same interface on AVX512-BF16
// dot products instead of tiles by gemm_dpbf16.cpp (x86-64 only) and gemm_dpbf16_emulated.cpp.
#if defined(__x86_64__) || defined(_M_X64)
const AmxKernels& amx_kernels();
const AmxKernels& dpbf16_kernels();
#endif
const AmxKernels& amx_emulated_kernels();
const AmxKernels& dpbf16_emulated_kernels();

// The process may use AMX tile data (Linux asks for permission first: arch_prctl
// ARCH_REQ_XCOMP_PERM for XTILEDATA); requested once, false if refused or not supported.
bool amx_usable();

}  // namespace fastmlp::cpu
