// bfloat16 and float16 layers on the CPU: PyTorch's low-precision linear (low-precision operands,
// float32 sums, each output rounded once; the bias added to the float32 sum), three ways:
//   AMX tiles (bfloat16, when the active kernels have them: amx_ops.h), with the epilogue applied
//     to the float32 tiles;
//   the float32 kernels on operands widened to float32 (exact), their outputs rounded ("widened");
//   ATen's own low-precision GEMM (at::addmm / at::mm: oneDNN, which uses AVX512-BF16 or AMX where
//     the CPU has them) followed by fastmlp's ReLU + mask pass, the vendor way of gemm_choice.h.
// (AVX512-BF16 dot products take the AMX kernels' place on CPUs with them and no AMX: amx.h.)
// fastmlp's way (AMX or AVX512-BF16, else widened) serves unless "auto" measured the vendor GEMM
// faster for the shape (or FASTMLP_GEMM=vendor). Low-precision GEMMs are timed from kLowTuneFlops
// up, small shapes included: each call of fastmlp's packs the weight, which oneDNN may do better at
// a batch of a few rows or at hundreds (512x784->256 on a Zen 5).
// Results agree to the rounding of the low-precision type; the vendor way equals PyTorch's
// nn.Linear + nn.ReLU in that dtype bit for bit.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <bit>
#include <cstring>

#include "amx_ops.h"
#include "gemm_choice.h"
#include "layer_ops.h"
#include "runner.h"

namespace fastmlp::cpu {

namespace {

using at::Tensor;

constexpr int64_t kLowTuneFlops = int64_t(1) << 16;

Tensor wide(const Tensor& t) { return t.to(at::kFloat); }
std::optional<Tensor> wide(const std::optional<Tensor>& t) {
  return t.has_value() ? std::optional<Tensor>(wide(*t)) : std::nullopt;
}

const char* dtype_name(const Tensor& t) { return t.scalar_type() == at::kBFloat16 ? "bfloat16" : "float16"; }

// y = relu(y) in place (NaN kept, like torch.relu), bit j % 8 of mask row i's byte j / 8 set iff
// y(i, j) > 0 (mask may be null); y (M, N) contiguous bfloat16 or float16 bits, kInf their +inf.
// On the bit patterns: h > 0 exactly when 0 < h <= +inf, NaN when (h & 0x7fff) > +inf; written so
// that the compiler vectorizes the elementwise part.
template <uint16_t kInf>
void relu_mask(uint16_t* y, int64_t M, int64_t N, uint8_t* mask) {
  const int64_t ldm = div_up(N, 8);
  constexpr int64_t kChunk = 512;
  at::parallel_for(0, M, std::max<int64_t>(1, (int64_t(1) << 14) / std::max<int64_t>(N, 1)), [&](int64_t r0, int64_t r1) {
    uint8_t pos[kChunk + 8];
    for (int64_t i = r0; i < r1; ++i) {
      uint16_t* row = y + i * N;
      for (int64_t c0 = 0; c0 < N; c0 += kChunk) {
        const int64_t n = std::min(kChunk, N - c0);
        for (int64_t j = 0; j < n; ++j) {
          const uint16_t h = row[c0 + j];
          const bool p = uint16_t(h - 1) < kInf, nan = (h & 0x7fff) > kInf;
          pos[j] = p;
          row[c0 + j] = (p || nan) ? h : uint16_t(0);
        }
        if (mask == nullptr) continue;
        uint8_t* m = mask + i * ldm + c0 / 8;  // c0 is a multiple of 8
        std::memset(pos + n, 0, 8);  // the last byte's bits past n
        for (int64_t j0 = 0; j0 < n; j0 += 8) m[j0 / 8] = bits_of_bytes(pos + j0);
      }
    }
  });
}

// The bf16 backward's elementwise pass on the bits: dz = gy where the mask bit is set, else 0 (exact,
// so dz stays bfloat16: no float32 copy of gy or dz), and gb[j] = float32 sum of dz(i, j) over the
// rows, top to bottom (the float32 kernels' order, so the same bits). mask null: dz is gy (not
// written); dz or gb may be null. Split by column chunks, so no sum depends on the thread count.
// lanes[b][e] = 0xffff if bit e of b is set, else 0: a mask byte as 8 lanes of 16 bits (no per-lane
// shifts, which the baseline x86-64 this file is compiled for cannot vectorize).
struct ByteLanes {
  alignas(16) uint16_t lanes[256][8];
  constexpr ByteLanes() : lanes() {
    for (int b = 0; b < 256; ++b)
      for (int e = 0; e < 8; ++e) lanes[b][e] = (b >> e) & 1 ? 0xffff : 0;
  }
};
constexpr ByteLanes kByteLanes;

void drelu_bias_grad_bf16(const uint16_t* gy, int64_t M, int64_t N, const uint8_t* mask, uint16_t* dz, float* gb) {
  constexpr int64_t kChunk = 64;  // columns per task: 4 tasks for a 256-wide layer
  const int64_t ldm = div_up(N, 8);
  const int64_t chunks = div_up(N, kChunk);
  at::parallel_for(0, chunks, std::max<int64_t>(1, (int64_t(1) << 14) / std::max<int64_t>(M * kChunk, 1)),
                   [&](int64_t c_begin, int64_t c_end) {
    alignas(64) float sum[kChunk];
    alignas(64) uint16_t h[kChunk];
    for (int64_t c = c_begin; c < c_end; ++c) {
      const int64_t c0 = c * kChunk, n = std::min(kChunk, N - c0);
      for (int64_t j = 0; j < kChunk; ++j) sum[j] = 0.0f;
      for (int64_t i = 0; i < M; ++i) {
        const uint16_t* g = gy + i * N + c0;
        if (mask) {  // c0 is a multiple of 8: the row's bits start at a whole byte
          const uint8_t* m = mask + i * ldm + c0 / 8;
          std::memcpy(h, g, size_t(n) * sizeof(uint16_t));
          for (int64_t k = 0; k < (n + 7) / 8; ++k)  // 8 lanes ANDed with the byte's lane masks
            for (int e = 0; e < 8; ++e) h[8 * k + e] &= kByteLanes.lanes[m[k]][e];
          if (dz) std::memcpy(dz + i * N + c0, h, size_t(n) * sizeof(uint16_t));
        } else {
          std::memcpy(h, g, size_t(n) * sizeof(uint16_t));
        }
        for (int64_t j = 0; j < n; ++j) sum[j] += std::bit_cast<float>(uint32_t(h[j]) << 16);
      }
      if (gb) std::memcpy(gb + c0, sum, size_t(n) * sizeof(float));
    }
  });
}

void relu_mask(Tensor& y, Tensor* mask) {
  uint8_t* m = mask ? mask->mutable_data_ptr<uint8_t>() : nullptr;
  uint16_t* bits = static_cast<uint16_t*>(y.data_ptr());
  if (y.scalar_type() == at::kBFloat16) relu_mask<0x7f80>(bits, y.size(0), y.size(1), m);
  else relu_mask<0x7c00>(bits, y.size(0), y.size(1), m);
}

}  // namespace

std::tuple<Tensor, Tensor> low_precision_forward(const Tensor& x_, const Tensor& w_, const std::optional<Tensor>& b,
                                                 bool relu, bool want_mask) {
  const Tensor x = x_.contiguous(), w = w_.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  const bool masked = relu && want_mask;
  Tensor mask = masked ? at::empty({M, div_up(N, 8)}, x.options().dtype(at::kByte)) : Tensor();
  Tensor y;
  const AmxKernels* amx = x.scalar_type() == at::kBFloat16 ? active_kernels().amx : nullptr;
  auto ours = [&] {
    if (amx) {
      y = amx_linear(*amx, x, w, b, relu, masked ? mask.mutable_data_ptr<uint8_t>() : nullptr);
      return;
    }
    auto [y32, m] = float_forward(wide(x), wide(w), wide(b), relu);
    y = y32.to(x.scalar_type());
    if (masked) mask = m;
  };
  auto theirs = [&] {
    y = b.has_value() ? at::addmm(*b, x, w.t()) : at::mm(x, w.t());
    if (relu) relu_mask(y, masked ? &mask : nullptr);
  };
  if (M == 0 || N == 0) {
    ours();
    return {y, mask};
  }
  run_chosen(GemmKind::kForward, dtype_name(x), M, N, K, kLowTuneFlops, ours, theirs);
  return {y, mask};
}

std::tuple<Tensor, Tensor, Tensor> low_precision_backward(const Tensor& gy_, const Tensor& x_, const Tensor& w_,
                                                          const Tensor* mask, std::array<bool, 3> needs) {
  const Tensor gy = gy_.contiguous(), x = x_.contiguous(), w = w_.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  const auto dtype = x.scalar_type();
  // dz (gy through the ReLU) and the bias gradient in float32 (gb rounded once). bfloat16: dz in
  // bfloat16 straight from gy's bits (exact) and float32 made from it only where needed; float16:
  // through a float32 copy of gy.
  Tensor gb32 = at::empty({N}, gy.options().dtype(at::kFloat));
  Tensor dz, dz32;  // dz in the layer's dtype, dz in float32: one made here, the other on first use
  if (dtype == at::kBFloat16) {
    dz = mask != nullptr ? at::empty({M, N}, gy.options()) : gy;
    if (mask != nullptr || needs[2])
      drelu_bias_grad_bf16(static_cast<const uint16_t*>(gy.const_data_ptr()), M, N,
                           mask ? mask->const_data_ptr<uint8_t>() : nullptr,
                           mask ? static_cast<uint16_t*>(dz.data_ptr()) : nullptr,
                           needs[2] ? gb32.mutable_data_ptr<float>() : nullptr);
  } else {
    const Tensor gy32 = wide(gy);
    dz32 = mask != nullptr ? at::empty({M, N}, gy32.options()) : gy32;
    if (mask != nullptr || needs[2])
      run_drelu_bias_grad<float>(table<float>(), M, N, gy32.const_data_ptr<float>(),
                                 mask ? mask->const_data_ptr<uint8_t>() : nullptr, div_up(N, 8),
                                 mask ? dz32.mutable_data_ptr<float>() : nullptr,
                                 needs[2] ? gb32.mutable_data_ptr<float>() : nullptr);
  }
  Tensor gx = at::empty({0}, x.options()), gw = at::empty({0}, x.options());
  Tensor x32, w32;  // made on first use
  auto dz_low = [&]() -> const Tensor& { return dz.defined() ? dz : (dz = dz32.to(dtype)); };
  auto dz_wide = [&]() -> const Tensor& { return dz32.defined() ? dz32 : (dz32 = wide(dz)); };
  auto x_wide = [&]() -> const Tensor& { return x32.defined() ? x32 : (x32 = wide(x)); };
  auto w_wide = [&]() -> const Tensor& { return w32.defined() ? w32 : (w32 = wide(w)); };
  const AmxKernels* amx = dtype == at::kBFloat16 ? active_kernels().amx : nullptr;
  if (needs[0]) {  // gx = dz @ w
    auto ours = [&] {
      if (amx) gx = amx_grad_input(*amx, dz_low(), w);
      else gx = std::get<0>(float_backward(dz_wide(), x_wide(), w_wide(), nullptr, {true, false, false})).to(dtype);
    };
    if (M == 0 || K == 0) ours();
    else run_chosen(GemmKind::kGradInput, dtype_name(x), M, K, N, kLowTuneFlops, ours, [&] { gx = at::mm(dz_low(), w); });
  }
  if (needs[1]) {  // gw = dz.T @ x (zeros for an empty batch)
    auto ours = [&] {
      if (amx) gw = amx_grad_weight(*amx, dz_low(), x);
      else gw = std::get<1>(float_backward(dz_wide(), x_wide(), w_wide(), nullptr, {false, true, false})).to(dtype);
    };
    if (N == 0 || K == 0 || M == 0) ours();
    else run_chosen(GemmKind::kGradWeight, dtype_name(x), N, K, M, kLowTuneFlops, ours,
                    [&] { gw = at::mm(dz_low().t(), x); });
  }
  return {gx, gw, needs[2] ? gb32.to(dtype) : at::empty({0}, x.options())};
}

}  // namespace fastmlp::cpu
