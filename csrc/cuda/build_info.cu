// Compiled by nvcc whenever the CUDA build is enabled (see setup.py), so CI proves the CUDA
// toolchain path on machines without a GPU. The CUDA kernels live next to it (linear_ops.cu);
// they serve CUDA tensors only when enabled with FASTMLP_CUDA_KERNELS=1 (fastmlp/_ops.py).
#define FASTMLP_STR2(...) #__VA_ARGS__
#define FASTMLP_STR(...) FASTMLP_STR2(__VA_ARGS__)

namespace fastmlp::cuda {

// nvcc defines __CUDA_ARCH_LIST__ (e.g. 800,900) in host code for every -gencode target.
const char* compiled_arch_list() {
#ifdef __CUDA_ARCH_LIST__
  return FASTMLP_STR(__CUDA_ARCH_LIST__);
#else
  return "unknown";
#endif
}

}  // namespace fastmlp::cuda
