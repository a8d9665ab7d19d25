// Portable kernels: any CPU, any compiler. Also the reference the wide paths are tested against
// (FASTMLP_CPU_ISA=generic).
#define FASTMLP_ISA_NS generic
#include "vec_generic.h"
#include "gemm_impl.h"

namespace fastmlp::cpu {

const Kernels& kernels_generic() {
  using F = generic::GemmImpl<generic::VecGeneric<float, 8>, 4, 2, 256>;
  using D = generic::GemmImpl<generic::VecGeneric<double, 8>, 4, 1, 256>;
  static const Kernels k{"generic", F::table(), D::table()};
  return k;
}

}  // namespace fastmlp::cpu
