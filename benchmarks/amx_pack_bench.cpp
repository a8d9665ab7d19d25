// Time of the AMX GEMM's operand packing (csrc/cpu/amx_impl.h: pack_a, pack_b_panel) and epilogue per
// call at the batch-64 layer shapes, on any x86-64 CPU: packing and the epilogue are plain C++, so
// their cost is measurable without AMX (the tile math is not: the emulator's is not its speed).
// Compare with the tile math at AMX's ~1 TFLOP/s per core (issue 11's probe: 64x784x256 in 24 us).
//
//   g++ -std=c++20 -O3 -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx2 -mfma -I csrc -I csrc/cpu \
//       benchmarks/amx_pack_bench.cpp -o /tmp/amx_pack_bench && /tmp/amx_pack_bench
// (the AVX-512 flags are those gemm_amx.cpp compiles the packing with; drop them for the emulated build's).
#include <chrono>
#include <cstdio>
#include <vector>

namespace fastmlp::cpu {
void* scratch(int64_t bytes) {
  static std::vector<char> buffer;
  if (int64_t(buffer.size()) < bytes) buffer.resize(size_t(bytes) + 64);
  return buffer.data();
}
}  // namespace fastmlp::cpu

#include "cpu/amx_emulator.h"
#define FASTMLP_AMX_NS amx_emulated
#include "cpu/amx_impl.h"

using namespace fastmlp::cpu;

template <class F>
double best_us(F f) {
  double best = 1e30;
  for (int r = 0; r < 50; ++r) {
    const auto t = std::chrono::steady_clock::now();
    f();
    const double us = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t).count();
    best = us < best ? us : best;
  }
  return best;
}

int main() {
  const int64_t M = 64, K = 784, N = 256;
  std::vector<uint16_t> x(M * K, 0x3f80), w(N * K, 0x3f80);
  std::vector<float> dz(M * N, 0.5f), bias(N, 0.1f), tile(kAmxRows * kAmxCols, 0.3f);
  std::vector<uint16_t> a_packed(amx_pad(N, kAmxRows) * amx_pad(K, kAmxK)), panel(2 * amx_pad(K, kAmxK) * 16);
  std::vector<uint16_t> work(16 * amx_pad(K, kAmxK)), c16(M * N);
  std::vector<uint8_t> mask(M * N / 8);
  auto report = [&](const char* name, const GemmLow& g) {
    const int64_t kp = amx_pad(g.inner, kAmxK);
    const double ta = best_us([&] { amx_emulated::pack_a(g, a_packed.data()); });
    const double tb = best_us([&] {
      for (int64_t j0 = 0; j0 < g.cols; j0 += kAmxCols) amx_emulated::pack_b_panel(g, j0, kp, panel.data(), work.data());
    });
    std::printf("%-22s pack_a %6.1f us   pack_b (every panel) %6.1f us   tile math at 1 TFLOP/s %5.1f us\n", name, ta, tb,
                2e-6 * double(g.rows * g.cols * g.inner));
  };
  GemmLow f;  // forward: x (bf16) @ w.T
  f.rows = M, f.cols = N, f.inner = K, f.a = x.data(), f.a_rs = K, f.a_cs = 1, f.b = w.data(), f.b_rs = 1, f.b_cs = K;
  report("forward 64x784->256", f);
  GemmLow d;  // dX: dz (float32) @ w
  d.rows = M, d.cols = K, d.inner = N, d.a = dz.data(), d.a_rs = N, d.a_cs = 1, d.a_f32 = true;
  d.b = w.data(), d.b_rs = K, d.b_cs = 1;
  report("dX 64x256->784", d);
  GemmLow g;  // dW: dz.T (float32) @ x
  g.rows = N, g.cols = K, g.inner = M, g.a = dz.data(), g.a_rs = 1, g.a_cs = N, g.a_f32 = true;
  g.b = x.data(), g.b_rs = K, g.b_cs = 1;
  report("dW 256x64->784", g);
  GemmLow e;  // the forward's epilogue: bias, ReLU, mask, bf16 output
  e.rows = M, e.cols = N, e.c16 = c16.data(), e.ldc = N, e.bias = bias.data(), e.relu = true, e.mask = mask.data();
  e.ldm = N / 8;
  const double te = best_us([&] {
    for (int64_t i0 = 0; i0 < M; i0 += kAmxRows)
      for (int64_t j0 = 0; j0 < N; j0 += kAmxCols) amx_emulated::finish_block(e, tile.data(), i0, j0, int(kAmxCols));
  });
  std::printf("forward epilogue 64x256 (bias, ReLU, mask, bf16): %.1f us\n", te);
}
