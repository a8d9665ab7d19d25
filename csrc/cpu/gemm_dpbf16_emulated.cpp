// The AVX512-BF16 kernel (dpbf16_impl.h) on the portable emulator of its instructions
// (dpbf16_emulator.h): the "avx512-bf16-emulated" CPU kernels, for testing it on any CPU.
#include "dpbf16_emulator.h"
#define FASTMLP_AMX_NS dpbf16_emulated
#include "dpbf16_impl.h"

namespace fastmlp::cpu {

namespace {
void gemm_cols(const GemmLow& g, const bf16_t* a_packed, int64_t c0, int64_t c1) {
  dpbf16_emulated::dp_gemm_cols<DpEmulated>(g, a_packed, c0, c1);
}
}  // namespace

const AmxKernels& dpbf16_emulated_kernels() {
  static const AmxKernels k{"avx512-bf16-emulated", &dpbf16_emulated::pack_a, &gemm_cols, false};
  return k;
}

}  // namespace fastmlp::cpu
