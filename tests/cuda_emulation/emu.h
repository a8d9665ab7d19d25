// A small CPU emulator for fastmlp's CUDA kernels, so their index math, bounds, barriers, warp
// shuffles and mask-byte ownership can be exercised on machines without a GPU.
//
// The kernel headers in csrc/cuda are compiled as plain C++ (g++) after this header:
//   - every CUDA thread of a block is a ucontext fiber; __syncthreads() / __syncwarp() /
//     __shfl_xor_sync() switch back to a scheduler that releases a barrier only when every thread
//     of the block (every lane of the warp) has reached it, and fails on deadlock, on a barrier
//     reached by only part of a block or warp, and on a warp mixing different warp operations;
//   - fibers run one at a time between barriers, in forward, reverse or random order, so a
//     missing barrier shows up as wrong results;
//   - __shared__ variables become function-local statics (one block runs at a time);
//   - nvcuda::wmma is modelled with whole-matrix fragments per lane, and load/store check the
//     WMMA rules: 256-bit aligned pointers and ldm a multiple of 16 bytes; mma checks that TF32
//     inputs were rounded to TF32.
// What it cannot show: real timing, memory-model effects between fibers that never meet at a
// barrier, bank conflicts, register limits, or the hardware's fragment layouts.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>  // dim3, uint3, float4 (host definitions)
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <numeric>
#include <random>
#include <type_traits>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#define EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define EMU_ASAN 1
#endif
#endif
#ifdef EMU_ASAN
#include <sanitizer/common_interface_defs.h>
#endif

#define FASTMLP_CUDA_EMULATION 1
#undef __shared__
#define __shared__ static
#define __launch_bounds__(...)

namespace emu {

[[noreturn]] inline void fail(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  std::fprintf(stderr, "EMULATION ERROR: ");
  std::vfprintf(stderr, fmt, ap);
  std::fprintf(stderr, "\n");
  va_end(ap);
  std::abort();
}

enum class St { Run, BlockBar, WarpBar, Done };
enum class WarpOp { Sync, Shfl };
enum class Order { Forward, Reverse, Random };

struct Fiber {
  ucontext_t ctx;
  St st = St::Run;
  WarpOp wop = WarpOp::Sync;
  uint32_t shfl_in = 0, shfl_out = 0;
  int shfl_lane_mask = 0;
  void* fake_stack = nullptr;
};

struct BlockRun {
  std::vector<Fiber> fibers;
  ucontext_t main;
  int cur = -1;
  const std::function<void()>* body = nullptr;
  void* main_fake_stack = nullptr;
  const void* main_bottom = nullptr;
  size_t main_size = 0;
};

inline constexpr size_t kStack = 256 * 1024;
inline BlockRun* g_run = nullptr;
inline std::vector<char> g_stacks;
inline uint3 g_threadIdx, g_blockIdx;
inline dim3 g_blockDim, g_gridDim;
inline uint64_t g_barriers = 0;

inline char* stack_of(int i) { return g_stacks.data() + size_t(i) * kStack; }

// Fiber -> scheduler.
inline void yield(St st) {
  BlockRun& r = *g_run;
  Fiber& f = r.fibers[r.cur];
  f.st = st;
#ifdef EMU_ASAN
  __sanitizer_start_switch_fiber(&f.fake_stack, r.main_bottom, r.main_size);
#endif
  swapcontext(&f.ctx, &r.main);
#ifdef EMU_ASAN
  __sanitizer_finish_switch_fiber(f.fake_stack, nullptr, nullptr);
#endif
}

inline void fiber_entry() {
  BlockRun& r = *g_run;
#ifdef EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &r.main_bottom, &r.main_size);
#endif
  (*r.body)();
  r.fibers[r.cur].st = St::Done;
#ifdef EMU_ASAN
  __sanitizer_start_switch_fiber(nullptr, r.main_bottom, r.main_size);
#endif
  // returning resumes uc_link (the scheduler)
}

// Scheduler -> fiber i.
inline void enter(BlockRun& r, int i) {
  r.cur = i;
  const unsigned bx = g_blockDim.x, by = g_blockDim.y;
  g_threadIdx = make_uint3(unsigned(i) % bx, (unsigned(i) / bx) % by, unsigned(i) / (bx * by));
#ifdef EMU_ASAN
  __sanitizer_start_switch_fiber(&r.main_fake_stack, stack_of(i), kStack);
#endif
  swapcontext(&r.main, &r.fibers[i].ctx);
#ifdef EMU_ASAN
  __sanitizer_finish_switch_fiber(r.main_fake_stack, nullptr, nullptr);
#endif
}

inline void schedule(BlockRun& r, Order order, std::mt19937& rng) {
  const int n = int(r.fibers.size());
  std::vector<int> idx(n);
  std::iota(idx.begin(), idx.end(), 0);
  if (order == Order::Reverse) std::reverse(idx.begin(), idx.end());
  for (;;) {
    if (order == Order::Random) std::shuffle(idx.begin(), idx.end(), rng);
    for (int i : idx)
      if (r.fibers[i].st == St::Run) enter(r, i);
    int done = 0, block_bar = 0, warp_bar = 0;
    for (const Fiber& f : r.fibers) {
      done += f.st == St::Done;
      block_bar += f.st == St::BlockBar;
      warp_bar += f.st == St::WarpBar;
    }
    if (done == n) return;
    if (warp_bar > 0) {
      for (int w0 = 0; w0 < n; w0 += 32) {
        const int w1 = std::min(n, w0 + 32);
        int at = 0;
        for (int i = w0; i < w1; ++i) at += r.fibers[i].st == St::WarpBar;
        if (at == 0) continue;
        if (at != w1 - w0)
          fail("warp %d: %d of %d lanes wait at a warp-level sync while the others are elsewhere", w0 / 32, at,
               w1 - w0);
        const WarpOp op = r.fibers[w0].wop;
        for (int i = w0; i < w1; ++i) {
          if (r.fibers[i].wop != op) fail("warp %d: lanes in different warp-level operations", w0 / 32);
          if (op == WarpOp::Shfl) {
            const int partner = w0 + (((i - w0) ^ r.fibers[i].shfl_lane_mask) & 31);
            if (partner >= w1) fail("shuffle from a lane outside the block");
            r.fibers[i].shfl_out = r.fibers[partner].shfl_in;
          }
        }
        for (int i = w0; i < w1; ++i) r.fibers[i].st = St::Run;
      }
      continue;
    }
    if (block_bar > 0) {
      if (done > 0) fail("__syncthreads() reached after %d threads of the block exited", done);
      for (Fiber& f : r.fibers) f.st = St::Run;
      ++g_barriers;
      continue;
    }
    fail("deadlock");
  }
}

// Kept out of line: locals live across getcontext() (-Wclobbered) otherwise.
[[gnu::noinline]] inline void init_fiber(BlockRun& r, int i) {
  Fiber& f = r.fibers[i];
  getcontext(&f.ctx);
  f.ctx.uc_stack.ss_sp = stack_of(i);
  f.ctx.uc_stack.ss_size = kStack;
  f.ctx.uc_link = &r.main;
  makecontext(&f.ctx, fiber_entry, 0);
}

// Runs `kernel()` (a call of the kernel with its arguments) on every thread of the grid.
template <class F>
void launch(dim3 grid, dim3 block, F&& kernel, Order order = Order::Forward, unsigned seed = 1) {
  const int nt = int(block.x * block.y * block.z);
  if (nt <= 0 || nt > 1024) fail("bad block size %d", nt);
  if (g_stacks.size() < size_t(nt) * kStack) g_stacks.resize(size_t(nt) * kStack);
  const std::function<void()> body = kernel;
  std::mt19937 rng(seed);
  g_blockDim = block;
  g_gridDim = grid;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        BlockRun r;
        r.fibers.resize(nt);
        r.body = &body;
        g_run = &r;
        g_blockIdx = make_uint3(bx, by, bz);
        for (int i = 0; i < nt; ++i) init_fiber(r, i);
        schedule(r, order, rng);
        g_run = nullptr;
      }
}

}  // namespace emu

#define threadIdx (::emu::g_threadIdx)
#define blockIdx (::emu::g_blockIdx)
#define blockDim (::emu::g_blockDim)
#define gridDim (::emu::g_gridDim)

inline void __syncthreads() { emu::yield(emu::St::BlockBar); }

inline void __syncwarp(unsigned mask = 0xffffffffu) {
  if (mask != 0xffffffffu) emu::fail("__syncwarp with a partial mask is not modelled");
  emu::g_run->fibers[emu::g_run->cur].wop = emu::WarpOp::Sync;
  emu::yield(emu::St::WarpBar);
}

inline unsigned __shfl_xor_sync(unsigned mask, unsigned v, int lane_mask, int width = 32) {
  if (mask != 0xffffffffu || width != 32) emu::fail("partial-warp shuffles are not modelled");
  emu::Fiber& f = emu::g_run->fibers[emu::g_run->cur];
  f.wop = emu::WarpOp::Shfl;
  f.shfl_in = v;
  f.shfl_lane_mask = lane_mask;
  emu::yield(emu::St::WarpBar);
  return emu::g_run->fibers[emu::g_run->cur].shfl_out;
}

// Values wider or other than 32-bit words are shuffled as their bits, as the CUDA overloads do.
inline float __shfl_xor_sync(unsigned mask, float v, int lane_mask, int width = 32) {
  unsigned u;
  std::memcpy(&u, &v, sizeof u);
  u = __shfl_xor_sync(mask, u, lane_mask, width);
  std::memcpy(&v, &u, sizeof v);
  return v;
}
inline double __shfl_xor_sync(unsigned mask, double v, int lane_mask, int width = 32) {
  unsigned u[2];
  std::memcpy(u, &v, sizeof u);
  u[0] = __shfl_xor_sync(mask, u[0], lane_mask, width);
  u[1] = __shfl_xor_sync(mask, u[1], lane_mask, width);
  std::memcpy(&v, u, sizeof v);
  return v;
}

[[noreturn]] inline void __trap() { emu::fail("__trap()"); }
inline float __fmaf_rn(float a, float b, float c) { return std::fmaf(a, b, c); }
inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }

// ---- nvcuda::wmma model -------------------------------------------------------------------------

namespace nvcuda::wmma {

struct row_major {};
struct col_major {};
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
namespace precision {
struct tf32 {};
}  // namespace precision
enum layout_t { mem_row_major, mem_col_major };

template <class T>
struct storage {
  using type = T;
};
template <>
struct storage<precision::tf32> {
  using type = float;
};

inline float to_f(float v) { return v; }
inline float to_f(__half v) { return __half2float(v); }
inline float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

// The whole logical matrix, row-major: rows x cols = M x K (a), K x N (b), M x N (accumulator).
template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
  static constexpr int rows = std::is_same_v<Use, matrix_b> ? K : M;
  static constexpr int cols = std::is_same_v<Use, matrix_a> ? K : N;
  static constexpr int num_elements = rows * cols;
  using element_type = typename storage<T>::type;
  element_type x[rows * cols];
};

inline float __float_to_tf32(float v) {  // cvt.rna.tf32.f32: round to nearest, ties away
  if (!std::isfinite(v)) return v;
  uint32_t u;
  std::memcpy(&u, &v, 4);
  u = (u + 0x1000u) & ~0x1fffu;
  std::memcpy(&v, &u, 4);
  return v;
}

template <class S>
void check_ptr(const S* p, unsigned ldm, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0) emu::fail("%s: pointer %p is not 256-bit aligned", what, (const void*)p);
  if ((size_t(ldm) * sizeof(S)) % 16 != 0) emu::fail("%s: ldm %u is not a multiple of 16 bytes", what, ldm);
}

template <class Use, int M, int N, int K, class T, class Layout, class V>
void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, V v) {
  for (auto& e : f.x) e = static_cast<typename fragment<Use, M, N, K, T, Layout>::element_type>(v);
}

template <int M, int N, int K, class T, class Layout, class S>
void load_matrix_sync(fragment<matrix_a, M, N, K, T, Layout>& f, const S* p, unsigned ldm) {
  check_ptr(p, ldm, "load_matrix_sync(matrix_a)");
  for (int i = 0; i < M; ++i)
    for (int k = 0; k < K; ++k)
      f.x[i * K + k] = std::is_same_v<Layout, row_major> ? p[size_t(i) * ldm + k] : p[i + size_t(k) * ldm];
}

template <int M, int N, int K, class T, class Layout, class S>
void load_matrix_sync(fragment<matrix_b, M, N, K, T, Layout>& f, const S* p, unsigned ldm) {
  check_ptr(p, ldm, "load_matrix_sync(matrix_b)");
  for (int k = 0; k < K; ++k)
    for (int j = 0; j < N; ++j)
      f.x[k * N + j] = std::is_same_v<Layout, row_major> ? p[size_t(k) * ldm + j] : p[k + size_t(j) * ldm];
}

template <int M, int N, int K>
void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& f, unsigned ldm, layout_t layout) {
  check_ptr(p, ldm, "store_matrix_sync");
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j)
      (layout == mem_row_major ? p[size_t(i) * ldm + j] : p[i + size_t(j) * ldm]) = f.x[i * N + j];
}

template <class T>
void check_input(float v) {
  if constexpr (std::is_same_v<T, precision::tf32>) {
    uint32_t u;
    std::memcpy(&u, &v, 4);
    if (u & 0x1fffu) emu::fail("mma_sync: a TF32 operand was not rounded to TF32 (%a)", double(v));
  }
}

template <int M, int N, int K, class T, class LA, class LB>
void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, T, LA>& a,
              const fragment<matrix_b, M, N, K, T, LB>& b, const fragment<accumulator, M, N, K, float>& c) {
  float out[M * N];
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      float s = c.x[i * N + j];
      for (int k = 0; k < K; ++k) {
        const float av = to_f(a.x[i * K + k]), bv = to_f(b.x[k * N + j]);
        check_input<T>(av);
        check_input<T>(bv);
        s = std::fmaf(av, bv, s);
      }
      out[i * N + j] = s;
    }
  std::memcpy(d.x, out, sizeof(out));
}

}  // namespace nvcuda::wmma
