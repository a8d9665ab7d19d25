// Picks the kernel table for this CPU once, and owns the per-thread scratch memory of the kernels.
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <string>

#include "kernels.h"

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
#endif
  return false;
}

const Kernels* table_for(const char* isa) {
  if (!cpu_has(isa)) return nullptr;
  if (std::strcmp(isa, "generic") == 0) return &kernels_generic();
#if defined(__x86_64__) || defined(_M_X64)
  if (std::strcmp(isa, "avx2") == 0) return &kernels_avx2();
  if (std::strcmp(isa, "avx512") == 0) return &kernels_avx512();
#endif
  return nullptr;
}

const Kernels* best() {
  for (const char* isa : {"avx512", "avx2", "generic"})
    if (const Kernels* k = table_for(isa)) return k;
  return &kernels_generic();
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

const Kernels& active_kernels() { return *current().load(std::memory_order_relaxed); }

bool set_isa(const char* isa) {
  const Kernels* k = std::strcmp(isa, "auto") == 0 ? best() : table_for(isa);
  if (!k) return false;
  current().store(k);
  return true;
}

const char* supported_isas() {
  static const std::string s = [] {
    std::string out;
    for (const char* isa : {"avx512", "avx2", "generic"})
      if (cpu_has(isa)) out += (out.empty() ? "" : ",") + std::string(isa);
    return out;
  }();
  return s.c_str();
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
