// Runs fastmlp's CUDA kernels (csrc/cuda/*.cuh, unmodified) on the CPU emulator (emu.h) and checks
// them bit for bit against exact references. Built and run by tests/test_cuda_emulation.py:
//   g++ -std=c++20 -O1 -fsanitize=address,undefined -Wno-unknown-pragmas -I csrc
//       -I $CUDA_HOME/include tests/cuda_emulation/run_kernels.cpp -o run_kernels
//   ./run_kernels [quick]
//
// Data are small integers times powers of two, so every product and partial sum is exact in FP32:
// the expected results are exact whatever the summation order, and any difference is a bug.
// Inputs and outputs live in exact-size heap buffers (AddressSanitizer catches out-of-bounds
// accesses); outputs start as a sentinel so unwritten elements and mask bytes are caught.
#include "emu.h"

// clang-format off
#include "cuda/kernels.h"
#include "cuda/gemm_simt.cuh"
#include "cuda/gemm_tc.cuh"
#include "cuda/drelu_bias_grad.cuh"
#include "cuda/step_kernels.cuh"
#include "cuda/mlp_forward.cuh"
#include "cuda/relu_mask.cuh"
// clang-format on

#include <array>
#include <string>

using namespace fastmlp::cuda;

namespace {

int g_checks = 0;
int g_failures = 0;

template <class T>
T from_double(double v) {
  if constexpr (std::is_same_v<T, __half>) return __float2half_rn(float(v));
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return __float2bfloat16_rn(float(v));
  else return T(v);
}
template <class T>
double to_double(T v) {
  if constexpr (std::is_same_v<T, __half>) return __half2float(v);
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return __bfloat162float(v);
  else return double(v);
}
template <class T>
bool same_bits(T a, T b) {
  return std::memcmp(&a, &b, sizeof(T)) == 0;
}
template <class T>
const char* type_name() {
  if constexpr (std::is_same_v<T, float>) return "float";
  else if constexpr (std::is_same_v<T, double>) return "double";
  else if constexpr (std::is_same_v<T, __half>) return "half";
  else return "bfloat16";
}

// Integers in [-4, 4] times `scale`.
template <class T>
std::vector<T> grid_data(size_t n, double scale, std::mt19937& rng) {
  std::uniform_int_distribution<int> d(-4, 4);
  std::vector<T> v(n);
  for (auto& e : v) e = from_double<T>(d(rng) * scale);
  return v;
}

template <class T>
T sentinel() {
  return from_double<T>(-12345.0);
}
constexpr uint8_t kMaskSentinel = 0xA5;

void report(bool ok, const std::string& what) {
  ++g_checks;
  if (!ok) {
    ++g_failures;
    std::printf("FAIL %s\n", what.c_str());
    if (g_failures > 50) emu::fail("too many failures");
  }
}

// ---- GEMM -------------------------------------------------------------------------------------

enum class Layout { Forward, ForwardLinear, GradInput, GradWeight };
const char* layout_name(Layout l) {
  switch (l) {
    case Layout::Forward: return "fwd+bias+relu";
    case Layout::ForwardLinear: return "fwd(no bias, no relu)";
    case Layout::GradInput: return "gx=dz@w";
    default: return "gw=dz.T@x";
  }
}

// One GEMM problem in op terms: x (M, K), w (N, K), dz (M, N), bias (N).
template <class T>
struct Problem {
  int64_t M, N, K;
  std::vector<T> x, w, dz, bias;
  Problem(int64_t m, int64_t n, int64_t k, std::mt19937& rng) : M(m), N(n), K(k) {
    x = grid_data<T>(size_t(M * K), 0.25, rng);
    w = grid_data<T>(size_t(N * K), 0.125, rng);
    dz = grid_data<T>(size_t(M * N), 0.25, rng);
    bias = grid_data<T>(size_t(N), 0.125, rng);
  }
};

// Expected output from the op definitions (independent of GemmArgs strides): values after the
// epilogue (sum in double, exact; bias; one rounding to T; ReLU) and the mask bytes.
template <class T>
void expected(const Problem<T>& p, Layout l, std::vector<T>& out, std::vector<uint8_t>& mask, int64_t& rows,
              int64_t& cols) {
  const int64_t M = p.M, N = p.N, K = p.K;
  rows = l == Layout::GradWeight ? N : M;
  cols = (l == Layout::Forward || l == Layout::ForwardLinear) ? N : K;
  out.assign(size_t(rows * cols), T());
  const int64_t ldm = (cols + 7) / 8;
  mask.assign(l == Layout::Forward ? size_t(rows * ldm) : 0, 0);
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) {
      double z = 0;
      if (l == Layout::Forward || l == Layout::ForwardLinear) {
        for (int64_t q = 0; q < K; ++q) z += to_double(p.x[i * K + q]) * to_double(p.w[j * K + q]);
        if (l == Layout::Forward) z += to_double(p.bias[j]);
      } else if (l == Layout::GradInput) {
        for (int64_t q = 0; q < N; ++q) z += to_double(p.dz[i * N + q]) * to_double(p.w[q * K + j]);
      } else {
        for (int64_t q = 0; q < M; ++q) z += to_double(p.dz[q * N + i]) * to_double(p.x[q * K + j]);
      }
      T y = from_double<T>(z);
      if (l == Layout::Forward) {
        if (to_double(y) > 0) mask[size_t(i * ldm + j / 8)] |= uint8_t(1u << (j % 8));
        else y = from_double<T>(0.0);
      }
      out[size_t(i * cols + j)] = y;
    }
}

template <class T>
GemmArgs<T> make_args(const Problem<T>& p, Layout l, T* out, uint8_t* mask) {
  switch (l) {
    case Layout::Forward: return forward_gemm<T>(p.M, p.N, p.K, p.x.data(), p.w.data(), p.bias.data(), out, mask);
    case Layout::ForwardLinear: return forward_gemm<T>(p.M, p.N, p.K, p.x.data(), p.w.data(), nullptr, out, nullptr);
    case Layout::GradInput: return grad_input_gemm<T>(p.M, p.N, p.K, p.dz.data(), p.w.data(), out);
    default: return grad_weight_gemm<T>(p.M, p.N, p.K, p.dz.data(), p.x.data(), out);
  }
}

// Kernel variants: which template flags, and whether they are what the launcher picks.
// Split: the launcher's flags with K split in 3 slices, then the split-K reduction (CUDA-core only).
enum class Flags { Launcher, Generic, Split };

template <class T, class Tile, bool TC>
void launch_gemm(const GemmArgs<T>& g, Flags flags, emu::Order order) {
  const dim3 grid(unsigned(div_up(g.rows, Tile::BM)), unsigned(div_up(g.cols, Tile::BN))), block(Tile::THREADS);
  // The launchers' choice (gemm_simt.cu / gemm_tc.cu), or the generic <false, false> instantiation,
  // which must be correct for every layout too.
  const bool a_kc = flags == Flags::Launcher && g.a_cs == 1;
  const bool b_kc = flags == Flags::Launcher && g.b_rs == 1;
  auto run = [&](auto kernel) { emu::launch(grid, block, [&] { kernel(g); }, order, 7); };
  if constexpr (!TC) {
    if (flags == Flags::Split) {
      GemmArgs<T> s = g;
      const int splits = 3;
      s.split_len = std::max<int64_t>(8, div_up(div_up(g.inner, splits), 8) * 8);
      const int used = int(std::max<int64_t>(1, div_up(g.inner, s.split_len)));
      std::vector<acc_t<T>> ws(size_t(used * g.rows * g.cols), acc_t<T>(-7));  // every slot is written
      s.workspace = ws.data();
      const bool akc = g.a_cs == 1, bkc = g.b_rs == 1;
      const dim3 sgrid(grid.x, grid.y, unsigned(used));
      auto srun = [&](auto kernel) { emu::launch(sgrid, block, [&] { kernel(s); }, order, 7); };
      if (akc && bkc) srun(gemm_simt_kernel<T, Tile, true, true, true>);
      else if (akc) srun(gemm_simt_kernel<T, Tile, true, false, true>);
      else srun(gemm_simt_kernel<T, Tile, false, false, true>);
      const int64_t threads = g.rows * div_up(g.cols, 8);
      emu::launch(dim3(unsigned(div_up(threads, 64))), dim3(64), [&] { splitk_reduce_kernel<T>(s, used); }, order, 7);
      return;
    }
  }
  if constexpr (TC) {
    if (a_kc && b_kc) run(gemm_tc_kernel<T, Tile, true, true>);
    else if (a_kc) run(gemm_tc_kernel<T, Tile, true, false>);
    else run(gemm_tc_kernel<T, Tile, false, false>);
  } else {
    if (a_kc && b_kc) run(gemm_simt_kernel<T, Tile, true, true>);
    else if (a_kc) run(gemm_simt_kernel<T, Tile, true, false>);
    else run(gemm_simt_kernel<T, Tile, false, false>);
  }
}

// For the TF32 path: nudges every non-zero GEMM operand by a quarter of its TF32 ulp (grid
// values have |v| >= 1/8 and at most 3 significant bits), which rounding to TF32 must remove. The
// expected results are computed from the grid values; the emulated mma_sync rejects operands that
// were not rounded. (The bias is added in FP32 and is not nudged.)
void nudge_below_tf32(std::vector<float>& v) {
  for (float& e : v)
    if (e != 0.0f) {
      int exp;
      std::frexp(e, &exp);                      // |e| in [2^(exp-1), 2^exp)
      e += std::ldexp(e > 0 ? 1.0f : -1.0f, exp - 1 - 10 - 2);  // TF32 ulp = 2^(exp-1-10)
    }
}

template <class T, class Tile, bool TC>
void check_gemm(const char* config, int64_t M, int64_t N, int64_t K, Layout l, Flags flags, emu::Order order,
                std::mt19937& rng) {
  Problem<T> p(M, N, K, rng);
  std::vector<T> want;
  std::vector<uint8_t> want_mask;
  int64_t rows, cols;
  expected(p, l, want, want_mask, rows, cols);
  if constexpr (TC && std::is_same_v<T, float>) {
    nudge_below_tf32(p.x);
    nudge_below_tf32(p.w);
    nudge_below_tf32(p.dz);
  }
  std::vector<T> out(want.size(), sentinel<T>());
  std::vector<uint8_t> mask(want_mask.size(), kMaskSentinel);
  const GemmArgs<T> g = make_args(p, l, out.data(), l == Layout::Forward ? mask.data() : nullptr);
  if (g.rows != rows || g.cols != cols) emu::fail("GemmArgs shape mismatch");
  if (rows > 0 && cols > 0) launch_gemm<T, Tile, TC>(g, flags, order);
  size_t bad = 0, first = SIZE_MAX;
  for (size_t e = 0; e < want.size(); ++e)
    if (!same_bits(out[e], want[e])) bad++, first = std::min(first, e);
  size_t bad_mask = 0;
  for (size_t e = 0; e < want_mask.size(); ++e) bad_mask += mask[e] != want_mask[e];
  char what[256];
  std::snprintf(what, sizeof what, "gemm %s %s M=%lld N=%lld K=%lld %s %s order=%d: %zu bad values%s, %zu bad mask bytes",
                type_name<T>(), config, (long long)M, (long long)N, (long long)K, layout_name(l),
                flags == Flags::Launcher ? "launcher-flags" : flags == Flags::Split ? "split-k" : "generic-flags",
                int(order), bad,
                bad ? (" (first at " + std::to_string(first) + ": got " + std::to_string(to_double(out[first])) +
                       " want " + std::to_string(to_double(want[first])) + ")")
                          .c_str()
                    : "",
                bad_mask);
  report(bad == 0 && bad_mask == 0, what);
}

// Shapes (M, N, K) per block tile: single elements, partial tiles on every side, several tiles,
// several K steps with a partial last one, exact tiles, and an empty reduction.
template <class T, class Tile, bool TC>
void gemm_suite(const char* config, int bk, bool quick, std::mt19937& rng) {
  const int64_t bm = Tile::BM, bn = Tile::BN;
  std::vector<std::array<int64_t, 3>> shapes = {
      {1, 1, 1}, {3, 5, 7}, {bm + 3, 2 * bn - 5, 2 * bk + 3}, {5, 9, 0}, {bm, bn, bk}, {2 * bm - 1, 11, 3 * bk - 1}};
  if (quick) shapes = {{3, 5, 7}, {bm + 3, bn + 5, 2 * bk + 3}, {5, 9, 0}};
  for (const auto& s : shapes)
    for (Layout l : {Layout::Forward, Layout::ForwardLinear, Layout::GradInput, Layout::GradWeight}) {
      // For gx / gw the block tile covers (M, K) / (N, K): reuse the same numbers.
      int64_t M = s[0], N = s[1], K = s[2];
      if (l == Layout::GradInput) std::swap(N, K);              // rows M, cols K = s[1], inner N = s[2]
      if (l == Layout::GradWeight) M = s[2], N = s[0], K = s[1];  // rows N, cols K, inner M
      check_gemm<T, Tile, TC>(config, M, N, K, l, Flags::Launcher, emu::Order::Forward, rng);
      if constexpr (!TC) check_gemm<T, Tile, TC>(config, M, N, K, l, Flags::Split, emu::Order::Random, rng);
      if (!quick) {
        check_gemm<T, Tile, TC>(config, M, N, K, l, Flags::Launcher, emu::Order::Reverse, rng);
        check_gemm<T, Tile, TC>(config, M, N, K, l, Flags::Generic, emu::Order::Random, rng);
      }
    }
}

// ---- dReLU + bias gradient ---------------------------------------------------------------------

template <class T>
void check_drelu(int64_t rows, int64_t cols, bool with_mask, bool want_dz, bool want_gb, emu::Order order,
                 std::mt19937& rng) {
  using Acc = acc_t<T>;
  const int64_t ldm = (cols + 7) / 8;
  std::vector<T> gy = grid_data<T>(size_t(rows * cols), 0.25, rng);
  std::vector<uint8_t> mask(size_t(rows * ldm));
  std::uniform_int_distribution<int> byte(0, 255);
  for (auto& m : mask) m = uint8_t(byte(rng));
  // Expected.
  std::vector<T> want_dz_v(size_t(rows * cols));
  std::vector<T> want_gb_v(static_cast<size_t>(cols));
  for (int64_t j = 0; j < cols; ++j) {
    double s = 0;
    for (int64_t i = 0; i < rows; ++i) {
      const bool keep = !with_mask || ((mask[size_t(i * ldm + j / 8)] >> (j % 8)) & 1);
      const T v = keep ? gy[size_t(i * cols + j)] : from_double<T>(0.0);
      want_dz_v[size_t(i * cols + j)] = v;
      s += to_double(v);
    }
    want_gb_v[size_t(j)] = from_double<T>(s);
  }
  std::vector<T> dz(size_t(rows * cols), sentinel<T>()), gb(size_t(cols), sentinel<T>());
  // Same plan as the launcher (drelu_bias_grad.cu) and the workspace the op glue allocates.
  const BiasGradPlan plan = bias_grad_plan(rows, cols, want_dz, want_gb);
  std::vector<Acc> partial(plan.finish ? size_t(plan.parts * cols) : 0);
  T* dz_p = want_dz ? dz.data() : nullptr;
  T* gb_p = want_gb ? gb.data() : nullptr;
  const uint8_t* mask_p = with_mask ? mask.data() : nullptr;
  Acc* partial_p = partial.empty() ? nullptr : partial.data();
  if (plan.pass1) {
    const dim3 grid(unsigned(div_up(cols, kCols)), unsigned(plan.parts)), block(kCols, kRowLanes);
    emu::launch(grid, block, [&] {
      drelu_colsum_kernel<T>(rows, cols, plan.chunk, gy.data(), mask_p, ldm, dz_p, plan.direct ? gb_p : nullptr,
                             plan.finish ? partial_p : nullptr);
    }, order, 3);
  }
  if (plan.finish) {
    emu::launch(dim3(unsigned(div_up(cols, 256))), dim3(256),
                [&] { bias_grad_finish_kernel<T>(plan.parts, cols, partial_p, gb_p); }, order, 5);
  }
  size_t bad_dz = 0, bad_gb = 0;
  if (want_dz)
    for (size_t e = 0; e < dz.size(); ++e) bad_dz += !same_bits(dz[e], want_dz_v[e]);
  if (want_gb)
    for (size_t e = 0; e < gb.size(); ++e) bad_gb += !same_bits(gb[e], want_gb_v[e]);
  char what[200];
  std::snprintf(what, sizeof what, "drelu_bias_grad %s rows=%lld cols=%lld mask=%d dz=%d gb=%d order=%d: %zu bad dz, %zu bad gb",
                type_name<T>(), (long long)rows, (long long)cols, with_mask, want_dz, want_gb, int(order), bad_dz, bad_gb);
  report(bad_dz == 0 && bad_gb == 0, what);
}

template <class T>
void drelu_suite(bool quick, std::mt19937& rng) {
  const std::vector<int64_t> rows = quick ? std::vector<int64_t>{0, 129} : std::vector<int64_t>{0, 1, 7, 128, 129, 1000};
  const std::vector<int64_t> cols = quick ? std::vector<int64_t>{33} : std::vector<int64_t>{1, 8, 33, 70};
  for (int64_t r : rows)
    for (int64_t c : cols)
      for (int variant = 0; variant < 6; ++variant) {
        const bool with_mask = variant < 3;
        const bool want_dz = variant % 3 != 1, want_gb = variant % 3 != 0;
        check_drelu<T>(r, c, with_mask, want_dz, want_gb, variant % 2 ? emu::Order::Reverse : emu::Order::Random, rng);
      }
}

// ---- multi-tensor optimizer updates (step_kernels.cuh) ---------------------------------------------

// Every element of every tensor must be updated exactly once, with its own tensor's state and step
// count: tensors of odd sizes (and empty ones) in one batch, spread over blocks and grid-stride
// rounds. The expected values apply the same formula element by element in the same precision, so
// they must match bit for bit; with the skip flag set nothing may change.
template <class T>
std::vector<int64_t> tensor_sizes(int count, std::mt19937& rng) {
  std::uniform_int_distribution<int> d(0, 300);
  std::vector<int64_t> n(static_cast<size_t>(count));
  for (int i = 0; i < count; ++i) n[size_t(i)] = i % 7 == 3 ? 0 : d(rng);
  return n;
}

template <class T>
void check_sgd(int count, unsigned blocks, bool skip, std::mt19937& rng) {
  const std::vector<int64_t> n = tensor_sizes<T>(count, rng);
  std::vector<std::vector<T>> p(static_cast<size_t>(count)), buf(static_cast<size_t>(count)), g(static_cast<size_t>(count));
  std::vector<SgdTensor<T>> ts(static_cast<size_t>(count));
  for (int i = 0; i < count; ++i) {
    p[size_t(i)] = grid_data<T>(size_t(n[size_t(i)]), 0.5, rng);
    g[size_t(i)] = grid_data<T>(size_t(n[size_t(i)]), 0.25, rng);
    if (i % 2 == 0) buf[size_t(i)] = grid_data<T>(size_t(n[size_t(i)]), 0.125, rng);  // odd ones: momentum 0
    ts[size_t(i)] = {p[size_t(i)].data(), i % 2 == 0 ? buf[size_t(i)].data() : nullptr, g[size_t(i)].data(), n[size_t(i)]};
  }
  const T lr = T(0.1), scale = T(0.5), momentum = T(0.9), decay = T(0.01);
  auto want_p = p, want_buf = buf;
  if (!skip)
    for (int i = 0; i < count; ++i)
      for (int64_t k = 0; k < n[size_t(i)]; ++k) {
        T& pk = want_p[size_t(i)][size_t(k)];
        T d = g[size_t(i)][size_t(k)] + decay * pk;
        if (i % 2 == 0) want_buf[size_t(i)][size_t(k)] = d = momentum * want_buf[size_t(i)][size_t(k)] + d;
        pk = pk - (lr * scale) * d;
      }
  const int32_t flag = skip ? 1 : 0;
  const auto b = make_batch<SgdBatch<T>>(ts.data(), count);
  emu::launch(dim3(blocks), dim3(64), [&] { sgd_kernel<T>(b, lr, &scale, momentum, decay, &flag); },
              emu::Order::Random, 9);
  size_t bad = 0;
  for (int i = 0; i < count; ++i)
    for (int64_t k = 0; k < n[size_t(i)]; ++k) {
      bad += !same_bits(p[size_t(i)][size_t(k)], want_p[size_t(i)][size_t(k)]);
      if (i % 2 == 0) bad += !same_bits(buf[size_t(i)][size_t(k)], want_buf[size_t(i)][size_t(k)]);
    }
  char what[160];
  std::snprintf(what, sizeof what, "sgd_kernel %s tensors=%d blocks=%u skip=%d: %zu bad", type_name<T>(), count,
                blocks, skip, bad);
  report(bad == 0, what);
}

template <class T>
void check_adam(int count, unsigned blocks, bool skip, bool decoupled, bool device_counts, std::mt19937& rng) {
  const std::vector<int64_t> n = tensor_sizes<T>(count, rng);
  std::vector<std::vector<T>> p(static_cast<size_t>(count)), m(static_cast<size_t>(count)), v(static_cast<size_t>(count)), g(static_cast<size_t>(count));
  std::vector<float> fcount(static_cast<size_t>(count));
  std::vector<double> dcount(static_cast<size_t>(count));
  std::vector<AdamTensor<T>> ts(static_cast<size_t>(count));
  for (int i = 0; i < count; ++i) {
    const size_t e = size_t(n[size_t(i)]);
    p[size_t(i)] = grid_data<T>(e, 0.5, rng);
    g[size_t(i)] = grid_data<T>(e, 0.25, rng);
    m[size_t(i)] = grid_data<T>(e, 0.125, rng);
    v[size_t(i)] = grid_data<T>(e, 0.125, rng);
    for (auto& x : v[size_t(i)]) x = x < T(0) ? -x : x;  // a second moment is never negative
    AdamTensor<T>& at = ts[size_t(i)];
    at.p = p[size_t(i)].data(), at.m = m[size_t(i)].data(), at.v = v[size_t(i)].data(), at.g = g[size_t(i)].data();
    at.n = n[size_t(i)];
    const double t = 1 + i % 5;  // each tensor its own count, as torch keeps them
    if (device_counts) {  // counts the kernel reads, float or double like Adam's state['step']
      fcount[size_t(i)] = float(t);
      dcount[size_t(i)] = t;
      at.step = i % 2 ? StepCount{&dcount[size_t(i)], true} : StepCount{&fcount[size_t(i)], false};
    } else {
      at.t = t;
    }
  }
  AdamHyper<T> h{.lr = T(0.01), .beta1 = 0.9, .beta2 = 0.999, .one_minus_beta1 = T(1 - 0.9), .beta2_t = T(0.999),
                 .one_minus_beta2 = T(1 - 0.999), .eps = T(1e-8), .weight_decay = T(0.1), .decoupled = decoupled};
  const T scale = T(0.5);
  auto want_p = p, want_m = m, want_v = v;
  if (!skip)
    for (int i = 0; i < count; ++i) {
      const T lr = h.lr * scale;
      const double t = 1 + i % 5;
      const T step_size = T(double(lr) / (1.0 - std::pow(h.beta1, t)));
      const T bc2_sqrt = T(std::sqrt(1.0 - std::pow(h.beta2, t)));
      for (int64_t k = 0; k < n[size_t(i)]; ++k) {
        T pk = want_p[size_t(i)][size_t(k)], gk = g[size_t(i)][size_t(k)];
        if (decoupled) pk *= T(1.0 - double(lr) * double(h.weight_decay));
        else gk += h.weight_decay * pk;
        T mk = want_m[size_t(i)][size_t(k)], vk = want_v[size_t(i)][size_t(k)];
        mk += h.one_minus_beta1 * (gk - mk);
        vk = vk * h.beta2_t + h.one_minus_beta2 * gk * gk;
        want_m[size_t(i)][size_t(k)] = mk;
        want_v[size_t(i)][size_t(k)] = vk;
        want_p[size_t(i)][size_t(k)] = pk - step_size * (mk / (std::sqrt(vk) / bc2_sqrt + h.eps));
      }
    }
  const int32_t flag = skip ? 1 : 0;
  const auto b = make_batch<AdamBatch<T>>(ts.data(), count);
  emu::launch(dim3(blocks), dim3(64), [&] { adam_kernel<T>(b, h, &scale, &flag); }, emu::Order::Random, 11);
  size_t bad = 0;
  for (int i = 0; i < count; ++i)
    for (int64_t k = 0; k < n[size_t(i)]; ++k)
      bad += !same_bits(p[size_t(i)][size_t(k)], want_p[size_t(i)][size_t(k)]) +
             !same_bits(m[size_t(i)][size_t(k)], want_m[size_t(i)][size_t(k)]) +
             !same_bits(v[size_t(i)][size_t(k)], want_v[size_t(i)][size_t(k)]);
  char what[200];
  std::snprintf(what, sizeof what, "adam_kernel %s tensors=%d blocks=%u skip=%d decoupled=%d device_counts=%d: %zu bad",
                type_name<T>(), count, blocks, skip, decoupled, device_counts, bad);
  report(bad == 0, what);
}

template <class T>
void update_suite(bool quick, std::mt19937& rng) {
  for (int count : {1, 5, quick ? 9 : kMaxAdamTensors})
    for (unsigned blocks : {1u, 3u}) {
      check_sgd<T>(count, blocks, false, rng);
      for (int variant = 0; variant < 4; ++variant) check_adam<T>(count, blocks, false, variant & 1, variant & 2, rng);
    }
  check_sgd<T>(5, 2, true, rng);
  check_adam<T>(5, 2, true, true, true, rng);
  if (!quick) check_sgd<T>(kMaxSgdTensors, 4, false, rng);
}

// ---- one-kernel inference (mlp_forward.cuh) ------------------------------------------------------

// A whole network against the layer-by-layer definition: exact sums, + bias, one rounding to T,
// ReLU, per layer; bit for bit. Grid data keep every partial sum exact in acc_t<T> whatever the
// order; a deep float network keeps it only with unit weights (-1, 0, 1: no bits added per layer).
template <class T>
void check_mlp_forward(int64_t rows, const std::vector<int>& dims, bool bias, bool relu_last, std::mt19937& rng,
                       bool unit_weights = false) {
  const int layers = int(dims.size()) - 1;
  std::vector<T> x = grid_data<T>(size_t(rows * dims[0]), 0.25, rng);
  std::vector<std::vector<T>> w, b;
  MlpForwardArgs<T> a;
  a.layers = layers, a.rows = rows, a.relu_last = relu_last, a.x = x.data();
  for (int l = 0; l < layers; ++l) {
    w.push_back(grid_data<T>(size_t(dims[size_t(l)] * dims[size_t(l + 1)]), 0.125, rng));
    if (unit_weights)
      for (T& v : w.back()) v = from_double<T>(to_double(v) > 0 ? 1.0 : to_double(v) < 0 ? -1.0 : 0.0);
    b.push_back(grid_data<T>(size_t(dims[size_t(l + 1)]), 0.5, rng));
  }
  for (int l = 0; l <= layers; ++l) a.dims[l] = dims[size_t(l)];
  for (int l = 0; l < layers; ++l) a.w[l] = w[size_t(l)].data(), a.b[l] = bias ? b[size_t(l)].data() : nullptr;

  std::vector<double> h(x.size());
  for (size_t i = 0; i < x.size(); ++i) h[i] = to_double(x[i]);
  std::vector<T> want;
  for (int l = 0; l < layers; ++l) {
    const int K = dims[size_t(l)], N = dims[size_t(l + 1)];
    const bool relu = l + 1 < layers || relu_last;
    std::vector<double> next(size_t(rows * N));
    want.assign(size_t(rows * N), T());
    for (int64_t i = 0; i < rows; ++i)
      for (int j = 0; j < N; ++j) {
        double z = bias ? to_double(b[size_t(l)][size_t(j)]) : 0.0;
        for (int k = 0; k < K; ++k) z += h[size_t(i * K + k)] * to_double(w[size_t(l)][size_t(j * K + k)]);
        T y = from_double<T>(z);
        if (relu && !(to_double(y) > 0)) y = from_double<T>(0.0);
        want[size_t(i * N + j)] = y;
        next[size_t(i * N + j)] = to_double(y);
      }
    h = std::move(next);
  }
  std::vector<T> y(want.size(), sentinel<T>());
  a.y = y.data();
  const unsigned blocks = unsigned(div_up(rows, kMlpRows<T>));
  emu::launch(dim3(blocks), dim3(kMlpThreads), [&] { mlp_forward_kernel<T>(a); }, emu::Order::Random, 13);
  size_t bad = 0;
  for (size_t i = 0; i < y.size(); ++i) bad += !same_bits(y[i], want[i]);
  std::string shape;
  for (int d : dims) shape += (shape.empty() ? "" : "-") + std::to_string(d);
  char what[200];
  std::snprintf(what, sizeof what, "mlp_forward_kernel %s rows=%lld %s bias=%d relu_last=%d: %zu of %zu bad",
                type_name<T>(), (long long)rows, shape.c_str(), bias, relu_last, bad, y.size());
  report(bad == 0, what);
}

// ---- ReLU + mask after a vendor GEMM (relu_mask.cuh) -----------------------------------------------

template <class T>
void check_relu_mask(int64_t rows, int64_t cols, bool with_mask, std::mt19937& rng) {
  std::vector<T> y = grid_data<T>(size_t(rows * cols), 0.5, rng), want = y;
  if (!y.empty()) y[y.size() / 2] = want[y.size() / 2] = from_double<T>(std::nan(""));
  const int64_t ldm = (cols + 7) / 8;
  std::vector<uint8_t> mask(size_t(rows * ldm), kMaskSentinel), want_mask(size_t(rows * ldm), 0);
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) {
      const double v = to_double(want[size_t(i * cols + j)]);
      if (v > 0) want_mask[size_t(i * ldm + j / 8)] |= uint8_t(1u << (j % 8));
      else if (v == v) want[size_t(i * cols + j)] = from_double<T>(0.0);
    }
  const int64_t threads = rows * ldm;
  emu::launch(dim3(unsigned(std::max<int64_t>(1, div_up(threads, 64)))), dim3(64),
              [&] { relu_mask_kernel<T>(rows, cols, y.data(), with_mask ? mask.data() : nullptr); },
              emu::Order::Random, 5);
  size_t bad = 0;
  for (size_t i = 0; i < y.size(); ++i) bad += !same_bits(y[i], want[i]);
  if (with_mask) bad += size_t(mask != want_mask);
  else bad += size_t(std::any_of(mask.begin(), mask.end(), [](uint8_t b) { return b != kMaskSentinel; }));
  char what[160];
  std::snprintf(what, sizeof what, "relu_mask_kernel %s rows=%lld cols=%lld mask=%d: %zu bad", type_name<T>(),
                (long long)rows, (long long)cols, with_mask, bad);
  report(bad == 0, what);
}

template <class T>
void relu_mask_suite(std::mt19937& rng) {
  for (auto [rows, cols] : {std::pair<int64_t, int64_t>{1, 1}, {3, 7}, {5, 8}, {9, 257}, {64, 10}})
    for (bool with_mask : {true, false}) check_relu_mask<T>(rows, cols, with_mask, rng);
}

template <class T>
void mlp_forward_suite(bool quick, std::mt19937& rng) {
  check_mlp_forward<T>(1, {784, 256, 10}, true, false, rng);  // the course MLPs at batch 1
  check_mlp_forward<T>(5, {33, 17, 1}, false, false, rng);    // a last block of one row, no bias
  check_mlp_forward<T>(3, {kMlpMaxWidth, 40}, true, true, rng);  // widest input, one layer, ReLU last
  check_mlp_forward<T>(2, {0, 7, 3}, true, false, rng);       // no input features: the biases alone
  if (quick) return;
  check_mlp_forward<T>(kMlpForwardMaxRows, {784, 128, 64, 10}, true, false, rng);
  // The most layers, a wide output; |sums| < 5 * 3^7 (plus the biases) stays exact in float.
  check_mlp_forward<T>(9, {5, 3, 3, 3, 3, 3, 3, 3, 1030}, true, true, rng, true);
}

}  // namespace

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::string(argv[1]) == "quick";
  std::mt19937 rng(12345);

  // The tile configurations of gemm_simt.cu and gemm_tc.cu.
  gemm_suite<float, SimtTile<128, 128, 8, 8, 8>, false>("simt-128x128", 8, quick, rng);
  gemm_suite<float, SimtTile<64, 64, 8, 4, 4>, false>("simt-64x64", 8, quick, rng);
  gemm_suite<float, SimtTile<32, 32, 8, 4, 4>, false>("simt-32x32", 8, quick, rng);
  gemm_suite<double, SimtTile<64, 64, 8, 4, 4>, false>("simt-64x64", 8, quick, rng);
  gemm_suite<__half, TcTile<2, 4, 4, 2>, true>("tc-128x128", 32, quick, rng);
  gemm_suite<__half, TcTile<2, 2, 2, 2>, true>("tc-64x64", 32, quick, rng);
  gemm_suite<__half, TcTile<1, 2, 2, 1>, true>("tc-32x32", 32, quick, rng);
  gemm_suite<__nv_bfloat16, TcTile<2, 4, 4, 2>, true>("tc-128x128", 32, quick, rng);
  gemm_suite<__nv_bfloat16, TcTile<2, 2, 2, 2>, true>("tc-64x64", 32, quick, rng);
  gemm_suite<__nv_bfloat16, TcTile<1, 2, 2, 1>, true>("tc-32x32", 32, quick, rng);
  gemm_suite<float, TcTile<2, 4, 4, 2>, true>("tf32-128x128", 16, quick, rng);
  gemm_suite<float, TcTile<2, 2, 2, 2>, true>("tf32-64x64", 16, quick, rng);
  gemm_suite<float, TcTile<1, 2, 2, 1>, true>("tf32-32x32", 16, quick, rng);

  drelu_suite<float>(quick, rng);
  drelu_suite<double>(quick, rng);
  drelu_suite<__half>(quick, rng);
  drelu_suite<__nv_bfloat16>(quick, rng);

  relu_mask_suite<float>(rng);
  relu_mask_suite<double>(rng);
  relu_mask_suite<__half>(rng);
  relu_mask_suite<__nv_bfloat16>(rng);

  mlp_forward_suite<float>(quick, rng);
  mlp_forward_suite<double>(quick, rng);
  mlp_forward_suite<__half>(quick, rng);
  mlp_forward_suite<__nv_bfloat16>(quick, rng);

  update_suite<float>(quick, rng);
  update_suite<double>(quick, rng);

  std::printf("%d checks, %d failures, %llu block barriers emulated\n", g_checks, g_failures,
              (unsigned long long)emu::g_barriers);
  if (g_failures == 0) std::printf("ALL OK\n");
  return g_failures == 0 ? 0 : 1;
}
