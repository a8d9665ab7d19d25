// The AMX kernels (amx_impl.h) on the portable emulator of the tile intrinsics (amx_emulator.h):
// the "amx-emulated" CPU kernels, for testing the AMX code on CPUs without AMX.
#include "amx_emulator.h"
#define FASTMLP_AMX_NS amx_emulated
#include "amx_impl.h"

namespace fastmlp::cpu {

const AmxKernels& amx_emulated_kernels() {
  static const AmxKernels k{"amx-emulated", &amx_emulated::pack_a, &amx_emulated::gemm_cols, true};
  return k;
}

}  // namespace fastmlp::cpu
