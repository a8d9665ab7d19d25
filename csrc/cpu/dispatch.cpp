// Picks the kernel table for this CPU once, and owns the per-thread scratch memory of the kernels.
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <string>

#include "amx.h"
#include "kernels.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#endif
#if defined(__linux__) && (defined(__x86_64__) || defined(_M_X64))
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace fastmlp::cpu {

namespace {

bool cpu_has(const char* isa) {
  if (std::strcmp(isa, "generic") == 0) return true;
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  if (std::strcmp(isa, "avx2") == 0)
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (std::strcmp(isa, "avx512") == 0)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (std::strcmp(isa, "avx512-bf16") == 0) return cpu_has("avx512") && __builtin_cpu_supports("avx512bf16");
#endif
  return false;
}

const Kernels* plain_table(const char* isa) {
  if (!cpu_has(isa)) return nullptr;
  if (std::strcmp(isa, "generic") == 0) return &kernels_generic();
#if defined(__x86_64__) || defined(_M_X64)
  if (std::strcmp(isa, "avx2") == 0) return &kernels_avx2();
  if (std::strcmp(isa, "avx512") == 0) return &kernels_avx512();
#endif
  return nullptr;
}

const Kernels* best_plain() {
  for (const char* isa : {"avx512", "avx2", "generic"})
    if (const Kernels* k = plain_table(isa)) return k;
  return &kernels_generic();
}

// `base`'s float32 / float64 kernels with the bfloat16 GEMM `bf16`, named `isa`.
Kernels with_bf16(const Kernels& base, const char* isa, const AmxKernels& bf16) {
  Kernels t = base;
  t.isa = isa;
  t.amx = &bf16;
  return t;
}

const Kernels* table_for(const char* isa) {
  if (std::strcmp(isa, "amx-emulated") == 0) {
    static const Kernels k = with_bf16(*best_plain(), "amx-emulated", amx_emulated_kernels());
    return &k;
  }
  if (std::strcmp(isa, "avx512-bf16-emulated") == 0) {
    static const Kernels k = with_bf16(*best_plain(), "avx512-bf16-emulated", dpbf16_emulated_kernels());
    return &k;
  }
#if defined(__x86_64__) || defined(_M_X64)
  if (std::strcmp(isa, "amx") == 0) {
    if (!cpu_has("avx512") || !amx_usable()) return nullptr;
    static const Kernels k = with_bf16(kernels_avx512(), "amx", amx_kernels());
    return &k;
  }
  if (std::strcmp(isa, "avx512-bf16") == 0) {
    if (!cpu_has("avx512-bf16")) return nullptr;
    static const Kernels k = with_bf16(kernels_avx512(), "avx512-bf16", dpbf16_kernels());
    return &k;
  }
#endif
  return plain_table(isa);
}

// AMX, else AVX512-BF16 (bfloat16 layers 1.03-1.24x PyTorch's autocast at batch 64 where the float32
// kernels on widened operands were 0.93-0.98x: BENCHMARKS.md), else the best float32 kernels.
const Kernels* best() {
  for (const char* isa : {"amx", "avx512-bf16"})
    if (const Kernels* k = table_for(isa)) return k;
  return best_plain();
}

// AMD's CPU family (0x19: Zen 3 and Zen 4, 0x1A: Zen 5), or 0 on another vendor's CPU.
int amd_family() {
#if defined(__x86_64__) || defined(_M_X64)
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid(0, &eax, &ebx, &ecx, &edx)) return 0;
  const bool amd = ebx == 0x68747541 && edx == 0x69746e65 && ecx == 0x444d4163;  // "AuthenticAMD"
  if (!amd || !__get_cpuid(1, &eax, &ebx, &ecx, &edx)) return 0;
  const int base = int((eax >> 8) & 0xf);
  return base == 0xf ? base + int((eax >> 20) & 0xff) : base;
#else
  return 0;
#endif
}

bool valid_k_block(int64_t v) { return v >= 16 && v <= 1024 && v % 16 == 0; }

std::atomic<int64_t>& k_override() {
  static std::atomic<int64_t> k{[]() -> int64_t {
    const char* env = std::getenv("FASTMLP_CPU_KBLOCK");
    if (!env || !*env) return 0;
    char* end = nullptr;
    const long long v = std::strtoll(env, &end, 10);
    return *end == '\0' && valid_k_block(v) ? v : 0;  // else fastmlp/_ops.py warns
  }()};
  return k;
}

std::atomic<const Kernels*>& current() {
  static std::atomic<const Kernels*> k{[] {
    const char* env = std::getenv("FASTMLP_CPU_ISA");
    if (env && *env) {
      if (const Kernels* k = table_for(env)) return k;
    }
    return best();
  }()};
  return k;
}

}  // namespace

int64_t avx512_float_k_block() {
  // Zen 4 (family 0x19 with AVX-512; Zen 3 has none, and this table exists only on AVX-512 CPUs) runs
  // the avx512 float32 GEMMs faster with K = 784 in two blocks of 392 than in seven of 112: training
  // epochs 5-13%, layers up to 12% (BENCHMARKS.md). Elsewhere the kernel's 128 (tuned on Zen 5).
  return amd_family() == 0x19 ? 400 : 0;
}

int64_t k_block_override() { return k_override().load(std::memory_order_relaxed); }

bool set_k_block_override(int64_t k_block) {
  if (k_block != 0 && !valid_k_block(k_block)) return false;
  k_override().store(k_block);
  return true;
}

const Kernels& active_kernels() { return *current().load(std::memory_order_relaxed); }

bool set_isa(const char* isa) {
  const Kernels* k = std::strcmp(isa, "auto") == 0 ? best() : table_for(isa);
  if (!k) return false;
  current().store(k);
  return true;
}

const char* supported_isas() {
  static const std::string s = [] {
    std::string out = table_for("amx") ? "amx" : "";
    if (table_for("avx512-bf16")) out += (out.empty() ? "" : ",") + std::string("avx512-bf16");
    for (const char* isa : {"avx512", "avx2", "generic"})
      if (cpu_has(isa)) out += (out.empty() ? "" : ",") + std::string(isa);
    return out;
  }();
  return s.c_str();
}

bool amx_usable() {
  static const bool ok = [] {
    if (const char* v = std::getenv("FASTMLP_REFUSE_AMX"); v && std::strcmp(v, "1") == 0) return false;  // tests
#if defined(__linux__) && (defined(__x86_64__) || defined(_M_X64))
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("amx-tile") || !__builtin_cpu_supports("amx-bf16")) return false;
    // Linux hands out AMX tile state only on request (ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA);
    // a tile instruction before that faults.
    constexpr long kArchReqXcompPerm = 0x1023;
    constexpr long kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
    return false;
#endif
  }();
  return ok;
}

void* scratch(int64_t bytes) {
  struct Free {
    void operator()(void* p) const { std::free(p); }
  };
  thread_local std::unique_ptr<void, Free> buf;
  thread_local int64_t cap = 0;
  if (bytes > cap) {
    const int64_t rounded = (bytes + 4095) / 4096 * 4096;
    buf.reset(std::aligned_alloc(64, size_t(rounded)));
    if (!buf) throw std::bad_alloc();
    cap = rounded;
  }
  return buf.get();
}

}  // namespace fastmlp::cpu
