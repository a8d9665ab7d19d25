// The argument checks of csrc/checks.h.
#include "checks.h"

#include <algorithm>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace fastmlp {

namespace {

int64_t div_up(int64_t a, int64_t b) { return a / b + (a % b != 0); }  // a >= 0, b >= 1, no overflow

// The step ops write every parameter and state tensor in place while they read x and the others:
// no two may share memory (a momentum buffer that is its weight gave silently wrong updates). The
// check runs on every call, so the extents are sorted by start and each compared with the next; the
// pairwise scan that names the first clash in argument order runs only once one is known.
void check_no_shared_memory(const char* op, const std::vector<std::pair<std::string, at::Tensor>>& tensors) {
  struct Extent {
    uintptr_t begin, end;
    size_t index;
  };
  std::vector<Extent> extents;
  extents.reserve(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i].second;
    if (t.numel() == 0) continue;
    int64_t last = 0;  // offset of the last element (strides are >= 0 for these tensors)
    for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
    const auto begin = reinterpret_cast<uintptr_t>(t.const_data_ptr());
    extents.push_back({begin, begin + uintptr_t(last + 1) * t.element_size(), i});
  }
  std::vector<Extent> by_start = extents;
  std::sort(by_start.begin(), by_start.end(), [](const Extent& a, const Extent& b) { return a.begin < b.begin; });
  bool overlap = false;
  for (size_t k = 1; k < by_start.size(); ++k) overlap = overlap || by_start[k].begin < by_start[k - 1].end;
  if (!overlap) return;
  // Named by the first pair in argument order, whatever the addresses.
  for (size_t i = 0; i < extents.size(); ++i)
    for (size_t j = i + 1; j < extents.size(); ++j)
      TORCH_CHECK(extents[j].begin >= extents[i].end || extents[i].begin >= extents[j].end, op, ": ",
                  tensors[extents[j].index].first, " shares memory with ", tensors[extents[i].index].first,
                  "; the step updates its tensors in place, so each parameter and optimizer state must be a "
                  "tensor of its own");
}

// (name[i], tensor) for every tensor of a list.
void add_named(std::vector<std::pair<std::string, at::Tensor>>& out, const char* name, at::TensorList list) {
  for (size_t i = 0; i < list.size(); ++i) out.emplace_back(std::string(name) + "[" + std::to_string(i) + "]", list[i]);
}

}  // namespace

using at::Tensor;

void check_linear_args(const char* op, const Tensor& x, const Tensor& w, const std::optional<Tensor>& b,
                       DtypeRule rule) {
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D (batch, in_features), got shape ", x.sizes());
  TORCH_CHECK(w.dim() == 2, op, ": w must be 2-D (out_features, in_features), got shape ", w.sizes());
  TORCH_CHECK(rule.ok(x.scalar_type()), op, ": x must be ", rule.allowed, ", got ", x.scalar_type());
  TORCH_CHECK(w.scalar_type() == x.scalar_type(), op, ": w has dtype ", w.scalar_type(),
              " but x has dtype ", x.scalar_type(), "; they must match");
  TORCH_CHECK(w.device() == x.device(), op, ": w is on ", w.device(), " but x is on ", x.device());
  TORCH_CHECK(x.size(1) == w.size(1), op, ": x has ", x.size(1), " features but w expects ",
              w.size(1), " (w has shape ", w.sizes(), ")");
  if (b.has_value()) {
    TORCH_CHECK(b->dim() == 1 && b->size(0) == w.size(0), op, ": b must have shape (", w.size(0),
                ",), got ", b->sizes());
    TORCH_CHECK(b->scalar_type() == x.scalar_type(), op, ": b has dtype ", b->scalar_type(),
                " but x has dtype ", x.scalar_type(), "; they must match");
    TORCH_CHECK(b->device() == x.device(), op, ": b is on ", b->device(), " but x is on ", x.device());
  }
}

void check_grad_args(const char* op, const Tensor& gy, const Tensor& x, const Tensor& w, DtypeRule rule) {
  check_linear_args(op, x, w, std::nullopt, rule);
  TORCH_CHECK(gy.dim() == 2 && gy.size(0) == x.size(0) && gy.size(1) == w.size(0), op,
              ": gy must have shape (", x.size(0), ", ", w.size(0), "), got ", gy.sizes());
  TORCH_CHECK(gy.scalar_type() == x.scalar_type(), op, ": gy has dtype ", gy.scalar_type(),
              " but x has dtype ", x.scalar_type(), "; they must match");
  TORCH_CHECK(gy.device() == x.device(), op, ": gy is on ", gy.device(), " but x is on ", x.device());
}

void check_mask(const char* op, const Tensor& mask, const Tensor& x, const Tensor& w) {
  TORCH_CHECK(mask.scalar_type() == at::kByte, op, ": mask must be uint8, got ", mask.scalar_type());
  TORCH_CHECK(mask.dim() == 2 && mask.size(0) == x.size(0) && mask.size(1) == div_up(w.size(0), 8), op,
              ": mask must have shape (", x.size(0), ", ", div_up(w.size(0), 8), "), got ", mask.sizes());
  TORCH_CHECK(mask.device() == x.device(), op, ": mask is on ", mask.device(), " but x is on ", x.device());
}

void check_mlp_forward_args(const char* op, const Tensor& x, at::TensorList weights, at::TensorList biases,
                            DtypeRule rule) {
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least 1 dimension (..., in_features), got a 0-d tensor");
  TORCH_CHECK(rule.ok(x.scalar_type()), op, ": x must be ", rule.allowed, ", got ", x.scalar_type());
  TORCH_CHECK(!weights.empty(), op, ": weights must not be empty");
  TORCH_CHECK(biases.empty() || biases.size() == weights.size(), op, ": biases must be empty or one per layer (",
              weights.size(), "), got ", biases.size());
  int64_t fan_in = x.size(-1);
  for (size_t l = 0; l < weights.size(); ++l) {
    const Tensor& w = weights[l];
    TORCH_CHECK(w.dim() == 2 && w.size(1) == fan_in, op, ": weights[", l, "] must have shape (*, ", fan_in,
                ")", l == 0 ? " (x's last dimension)" : " (the width of the layer before)", ", got ", w.sizes());
    TORCH_CHECK(w.scalar_type() == x.scalar_type() && w.device() == x.device(), op, ": weights[", l, "] is ",
                w.scalar_type(), " on ", w.device(), " but x is ", x.scalar_type(), " on ", x.device());
    if (!biases.empty()) {
      const Tensor& b = biases[l];
      TORCH_CHECK(b.dim() == 1 && b.size(0) == w.size(0), op, ": biases[", l, "] must have shape (", w.size(0),
                  ",), got ", b.sizes());
      TORCH_CHECK(b.scalar_type() == x.scalar_type() && b.device() == x.device(), op, ": biases[", l, "] is ",
                  b.scalar_type(), " on ", b.device(), " but x is ", x.scalar_type(), " on ", x.device());
    }
    fan_in = w.size(0);
  }
}

void check_step_args(const char* op, const Tensor& x, const Tensor& target, at::TensorList weights,
                     at::TensorList biases, at::TensorList wbufs, at::TensorList bbufs, double momentum,
                     const std::optional<Tensor>& lr_scale) {
  TORCH_CHECK(!weights.empty(), op, ": weights must not be empty");
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D (batch, in_features), got shape ", x.sizes());
  TORCH_CHECK(x.size(0) > 0, op, ": x must hold at least one sample");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
              ": x must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(target.dim() == 1 && target.size(0) == x.size(0), op, ": target must have shape (", x.size(0),
              ",), got ", target.sizes());
  TORCH_CHECK(target.scalar_type() == at::kLong, op, ": target must be int64 class indices, got ",
              target.scalar_type());
  TORCH_CHECK(target.device() == x.device(), op, ": target is on ", target.device(), " but x is on ", x.device());
  TORCH_CHECK(biases.empty() || biases.size() == weights.size(), op, ": biases must be empty or one per layer (",
              weights.size(), "), got ", biases.size());
  const bool with_momentum = momentum != 0.0;
  TORCH_CHECK(!with_momentum || wbufs.size() == weights.size(), op,
              ": weight_bufs must hold one momentum buffer per weight when momentum != 0");
  TORCH_CHECK(!with_momentum || bbufs.size() == biases.size(), op,
              ": bias_bufs must hold one momentum buffer per bias when momentum != 0");
  int64_t fan_in = x.size(1);
  for (size_t l = 0; l < weights.size(); ++l) {
    const Tensor& w = weights[l];
    TORCH_CHECK(w.dim() == 2 && w.size(1) == fan_in, op, ": weights[", l, "] must have shape (*, ", fan_in,
                "), got ", w.sizes());
    TORCH_CHECK(w.size(0) > 0, op, ": weights[", l, "] must have at least one output feature");
    TORCH_CHECK(w.scalar_type() == x.scalar_type() && w.device() == x.device(), op, ": weights[", l,
                "] must match x's dtype and device (", x.scalar_type(), " on ", x.device(), "), got ",
                w.scalar_type(), " on ", w.device());
    TORCH_CHECK(w.is_contiguous(), op, ": weights[", l, "] must be contiguous (it is updated in place)");
    auto check_like = [&](const Tensor& t, const char* what, at::IntArrayRef shape) {
      TORCH_CHECK(t.sizes() == shape && t.scalar_type() == x.scalar_type() && t.device() == x.device() &&
                      t.is_contiguous(),
                  op, ": ", what, "[", l, "] must be a contiguous ", x.scalar_type(), " tensor of shape ",
                  shape, " on ", x.device(), ", got ", t.scalar_type(), " ", t.sizes(), " on ", t.device());
    };
    if (!biases.empty()) check_like(biases[l], "biases", {w.size(0)});
    if (with_momentum) check_like(wbufs[l], "weight_bufs", w.sizes());
    if (with_momentum && !biases.empty()) check_like(bbufs[l], "bias_bufs", {w.size(0)});
    fan_in = w.size(0);
  }
  if (lr_scale.has_value())
    TORCH_CHECK(lr_scale->numel() == 1 && lr_scale->scalar_type() == x.scalar_type() &&
                    lr_scale->device() == x.device(),
                op, ": lr_scale must be a one-element ", x.scalar_type(), " tensor on ", x.device(), ", got ",
                lr_scale->scalar_type(), " of shape ", lr_scale->sizes(), " on ", lr_scale->device());
  std::vector<std::pair<std::string, Tensor>> written{{"x", x}};
  add_named(written, "weights", weights);
  add_named(written, "biases", biases);
  if (with_momentum) add_named(written, "weight_bufs", wbufs), add_named(written, "bias_bufs", bbufs);
  check_no_shared_memory(op, written);
}

void check_adam_args(const char* op, const Tensor& x, const Tensor& target, at::TensorList weights,
                     at::TensorList biases, at::TensorList exp_avgs, at::TensorList exp_avg_sqs, at::TensorList steps,
                     double beta1, double beta2, double eps, const std::optional<Tensor>& lr_scale) {
  check_step_args(op, x, target, weights, biases, {}, {}, 0.0, lr_scale);
  TORCH_CHECK(beta1 >= 0 && beta1 < 1 && beta2 >= 0 && beta2 < 1, op, ": betas must lie in [0, 1), got (", beta1,
              ", ", beta2, ")");
  TORCH_CHECK(eps >= 0, op, ": eps must be >= 0, got ", eps);
  const size_t n = weights.size() + biases.size();
  TORCH_CHECK(exp_avgs.size() == n && exp_avg_sqs.size() == n && steps.size() == n, op,
              ": exp_avgs, exp_avg_sqs and steps must hold one tensor per parameter (", n,
              ": the weights, then the biases), got ", exp_avgs.size(), ", ", exp_avg_sqs.size(), " and ",
              steps.size());
  for (size_t i = 0; i < n; ++i) {
    const Tensor& p = i < weights.size() ? weights[i] : biases[i - weights.size()];
    for (const auto& [list, what] : {std::pair{exp_avgs, "exp_avgs"}, std::pair{exp_avg_sqs, "exp_avg_sqs"}}) {
      const Tensor& t = list[i];
      TORCH_CHECK(t.sizes() == p.sizes() && t.scalar_type() == x.scalar_type() && t.device() == x.device() &&
                      t.is_contiguous(),
                  op, ": ", what, "[", i, "] must be a contiguous ", x.scalar_type(), " tensor of shape ", p.sizes(),
                  " on ", x.device(), ", got ", t.scalar_type(), " ", t.sizes(), " on ", t.device());
    }
    const Tensor& s = steps[i];
    TORCH_CHECK(s.numel() == 1 && (s.scalar_type() == at::kFloat || s.scalar_type() == at::kDouble) &&
                    (s.device() == steps[0].device()) && (s.is_cpu() || s.device() == x.device()),
                op, ": steps[", i, "] must be a one-element float32 or float64 tensor, all on the CPU or all on ",
                x.device(), " (torch.optim.Adam's state['step']), got ", s.scalar_type(), " of shape ", s.sizes(),
                " on ", s.device());
    TORCH_CHECK(!s.is_inference() || c10::InferenceMode::is_enabled(), op, ": steps[", i,
                "] is an inference tensor (made under torch.inference_mode()): it can only be updated in place "
                "inside inference mode");
  }
  std::vector<std::pair<std::string, Tensor>> written{{"x", x}};
  add_named(written, "weights", weights);
  add_named(written, "biases", biases);
  add_named(written, "exp_avgs", exp_avgs);
  add_named(written, "exp_avg_sqs", exp_avg_sqs);
  check_no_shared_memory(op, written);
}

int64_t check_batches(const char* op, const Tensor& x, int64_t batch_size, at::ArrayRef<double> lrs) {
  TORCH_CHECK(batch_size >= 1, op, ": batch_size must be >= 1, got ", batch_size);
  const int64_t count = div_up(x.size(0), batch_size);
  TORCH_CHECK(int64_t(lrs.size()) == count, op, ": lrs must hold one learning rate per step (", count, " batches of ",
              batch_size, " in ", x.size(0), " samples), got ", lrs.size());
  return count;
}

}  // namespace fastmlp
