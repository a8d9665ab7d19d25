// The vendor-GEMM safety net (gemm_choice.h): the mode, the per-shape timing and its record.
#include "gemm_choice.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <map>
#include <mutex>
#include <optional>
#include <tuple>

#include "runner.h"

namespace fastmlp::cpu {

namespace {

bool parse_mode(const char* name, GemmMode* out) {
  if (std::strcmp(name, "fastmlp") == 0) *out = GemmMode::kFastmlp;
  else if (std::strcmp(name, "vendor") == 0) *out = GemmMode::kVendor;
  else if (std::strcmp(name, "auto") == 0) *out = GemmMode::kAuto;
  else return false;
  return true;
}

std::atomic<GemmMode>& mode_state() {
  static std::atomic<GemmMode> mode{[] {
    GemmMode m = GemmMode::kAuto;
    const char* env = std::getenv("FASTMLP_GEMM");
    if (env && *env) parse_mode(env, &m);  // an unknown name: auto (fastmlp/_ops.py warns)
    return m;
  }()};
  return mode;
}

// (kind, dtype, floor(log2(batch)), the two other dimensions, threads, isa)
using Key = std::tuple<int, std::string, int, int64_t, int64_t, int, std::string>;
std::mutex& choices_mutex() {
  static std::mutex mu;
  return mu;
}
std::map<Key, GemmChoice>& choices() {
  static std::map<Key, GemmChoice> m;
  return m;
}

int log2_floor(int64_t v) {
  int b = 0;
  while (v > 1) v >>= 1, ++b;
  return b;
}

const char* kind_name(GemmKind kind) {
  switch (kind) {
    case GemmKind::kForward: return "forward";
    case GemmKind::kGradInput: return "grad_input";
    default: return "grad_weight";
  }
}

// C = A @ B by ATen's GEMM, straight into C, then fastmlp's epilogue (bias, ReLU, mask) row by row.
template <typename T>
void vendor_gemm(const KernelTable<T>& k, const Gemm<T>& g) {
  const auto opt = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  at::Tensor c = at::from_blob(g.c, {g.rows, g.cols}, {g.ldc, 1}, opt);
  if (g.inner == 0) {
    c.zero_();  // (a and b may then have no data at all)
  } else {
    const at::Tensor a = at::from_blob(const_cast<T*>(g.a), {g.rows, g.inner}, {g.a_rs, g.a_cs}, opt);
    const at::Tensor b = at::from_blob(const_cast<T*>(g.b), {g.inner, g.cols}, {g.b_rs, g.b_cs}, opt);
    at::mm_out(c, a, b);
  }
  if (g.bias == nullptr && !g.relu) return;
  const int64_t nt = threads_for(g.rows * g.cols, kParallelElems);
  if (nt == 1) return k.finish_rows(g, 0, g.rows);
  at::parallel_for(0, g.rows, div_up(g.rows, nt), [&](int64_t r0, int64_t r1) { k.finish_rows(g, r0, r1); });
}

template <class F>
double time_us(F&& f) {
  const auto t0 = std::chrono::steady_clock::now();
  f();
  return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

GemmMode gemm_mode() { return mode_state().load(std::memory_order_relaxed); }

const char* gemm_mode_name() {
  switch (gemm_mode()) {
    case GemmMode::kFastmlp: return "fastmlp";
    case GemmMode::kVendor: return "vendor";
    default: return "auto";
  }
}

bool set_gemm_mode(const char* name) {
  GemmMode m;
  if (!parse_mode(name, &m)) return false;
  const std::lock_guard<std::mutex> lock(choices_mutex());
  choices().clear();
  mode_state().store(m);
  return true;
}

std::vector<GemmChoice> gemm_choices() {
  const std::lock_guard<std::mutex> lock(choices_mutex());
  std::vector<GemmChoice> out;
  for (const auto& [key, c] : choices()) out.push_back(c);
  return out;
}

void run_chosen(GemmKind kind, const char* dtype, int64_t rows, int64_t cols, int64_t inner, int64_t min_flops,
                const std::function<void()>& ours, const std::function<void()>& theirs) {
  const GemmMode mode = gemm_mode();
  if (mode == GemmMode::kFastmlp || (mode == GemmMode::kAuto && 2 * rows * cols * inner < min_flops)) return ours();
  if (mode == GemmMode::kVendor) return theirs();

  const int threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  const char* isa = active_kernels().isa;
  // The batch (rows, or inner for dW) by power-of-two bucket, the layer's widths exactly.
  const bool dw = kind == GemmKind::kGradWeight;
  const Key key{int(kind), dtype, log2_floor(dw ? inner : rows), dw ? rows : cols, dw ? cols : inner, threads, isa};
  // The lock is released before either way runs: a way may itself come back here (a float16 or
  // bfloat16 GEMM widened to float32 runs the float32 choice), and the mutex is not recursive.
  std::optional<bool> vendor_known;
  {
    const std::lock_guard<std::mutex> lock(choices_mutex());
    const auto it = choices().find(key);
    if (it != choices().end()) vendor_known = it->second.vendor;
  }
  if (vendor_known.has_value()) return *vendor_known ? theirs() : ours();
  // First time for this shape: both ways, alternating; the first round warms caches and is not counted.
  double t_ours = 1e300, t_theirs = 1e300;
  for (int round = 0; round < 4; ++round) {
    const double a = time_us(ours);
    const double b = time_us(theirs);
    if (round > 0) t_ours = std::min(t_ours, a), t_theirs = std::min(t_theirs, b);
  }
  // fastmlp's way keeps shapes where the vendor GEMM is not clearly (3%) faster.
  const bool vendor = t_theirs * 1.03 < t_ours;
  if (!vendor) ours();  // the outputs from the way later calls take (the last run was the vendor's)
  const std::lock_guard<std::mutex> lock(choices_mutex());
  choices().emplace(key, GemmChoice{kind_name(kind), dtype, isa, rows, cols, inner, threads, t_ours, t_theirs, vendor});
}

template <typename T>
void run_layer_gemm(const KernelTable<T>& k, const Gemm<T>& g, GemmKind kind) {
  if (g.mask_in != nullptr || g.update.kind != UpdateKind::kNone) return run_gemm(k, g);
  const int64_t batch = kind == GemmKind::kGradWeight ? g.inner : g.rows;
  const int64_t min_flops = batch >= kTuneBatch ? kTuneFlops : std::numeric_limits<int64_t>::max();
  run_chosen(kind, sizeof(T) == 4 ? "float32" : "float64", g.rows, g.cols, g.inner, min_flops,
             [&] { run_gemm(k, g); }, [&] { vendor_gemm(k, g); });
}

template void run_layer_gemm<float>(const KernelTable<float>&, const Gemm<float>&, GemmKind);
template void run_layer_gemm<double>(const KernelTable<double>&, const Gemm<double>&, GemmKind);

}  // namespace fastmlp::cpu
