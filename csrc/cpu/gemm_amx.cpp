// The AMX kernels (amx_impl.h) on the tile instructions (x86-64 with AMX-TILE and AMX-BF16). See
// gemm_avx2.cpp for why a pragma sets the target; nothing here runs unless the CPU has AMX and Linux
// granted the process its tile data (amx_usable(), dispatch.cpp).
#if defined(__x86_64__) || defined(_M_X64)
#include <cstdint>

#pragma GCC push_options
#pragma GCC target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,bmi,bmi2,f16c")
#include <immintrin.h>
#define FASTMLP_AMX_NS amx_tiles
#include "amx_impl.h"

namespace fastmlp::cpu {

const AmxKernels& amx_kernels() {
  static const AmxKernels k{"amx", &amx_tiles::pack_a, &amx_tiles::gemm_cols, true};
  return k;
}

}  // namespace fastmlp::cpu
#pragma GCC pop_options
#endif
