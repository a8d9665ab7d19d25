// The fastmlp operator library: every schema in one place, plus the few build/runtime facts the
// Python package reads. The CPU kernels register themselves (csrc/cpu); the CUDA kernels
// (csrc/cuda) only when Python calls register_cuda_kernels() (see fastmlp/_ops.py).
//
// Semantics (x: (M, K), w: (N, K), b: (N,), all 2-D and of one floating dtype):
//   linear_relu_fwd(x, w, b)           -> (y, mask)  y = relu(x @ w.T + b); mask = packbits(y > 0)
//   linear_relu_bwd(gy, x, w, mask, n) -> (gx, gw, gb)  through dz = gy * unpackbits(mask)
//   linear_fwd(x, w, b)                -> y         y = x @ w.T + b
//   linear_bwd(gy, x, w, n)            -> (gx, gw, gb)
// mask is uint8 of shape (M, ceil(N / 8)): bit (j % 8) of byte mask[i, j / 8] is y[i, j] > 0
// (numpy.packbits(y > 0, axis=1, bitorder="little")). needs = [gx, gw, gb]; an output that is not
// needed is returned as an empty tensor of shape (0,).
//
//   mlp_forward(x, weights, biases, relu_last=False) -> y
// inference through a whole MLP in one op: y = relu(...relu(x @ w0.T + b0)...) @ wL.T + bL (with a
// ReLU after the last layer too when relu_last), no masks, nothing saved for backward. x may have
// any leading shape (..., in_features); y is (..., out_features of the last layer). biases may be
// empty (no bias). Not differentiable: with grad mode on and an input that requires grad it raises.
//
//   mlp_sgd_step(x, target, weights, biases, weight_bufs, bias_bufs, lr, momentum, weight_decay,
//                lr_scale=None, bf16=False) -> loss
// one training step of the MLP relu(...relu(x @ w0.T + b0)...) @ wL.T + bL with mean softmax
// cross-entropy against `target` (int64 class indices), updating weights, biases and their momentum
// buffers in place exactly as torch.optim.SGD(lr, momentum, weight_decay) does after backward().
// biases may be empty (no bias); the buffer lists may be empty when momentum == 0. lr_scale, if
// given, is a one-element tensor of x's dtype and device: the learning rate is then lr * lr_scale,
// read where the step runs (on the GPU, so a CUDA-graph-captured step can follow an LR schedule).
// bf16=True (CPU, float32 tensors): the step in torch.autocast(bfloat16) arithmetic, the parameters
// and optimizer state staying float32: every GEMM operand and result rounded to bfloat16, float32
// sums, loss and update (see csrc/cpu/mlp_step.cpp).
//
//   mlp_adam_step(x, target, weights, biases, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, eps,
//                 weight_decay, decoupled_weight_decay=False, lr_scale=None, bf16=False) -> loss
// the same step with torch.optim.Adam's update (AdamW's with decoupled_weight_decay; no AMSGrad).
// exp_avgs, exp_avg_sqs and steps hold one tensor per parameter, the weights first, then the
// biases; steps are Adam's one-element state['step'] counts, all on the CPU or all on x's device
// (Adam(capturable=True)), each incremented by the step and used for its bias corrections.
//
//   mlp_sgd_steps(x, target, batch_size, weights, biases, weight_bufs, bias_bufs, lrs, momentum,
//                 weight_decay, bf16=False) -> losses
//   mlp_adam_steps(x, target, batch_size, weights, biases, exp_avgs, exp_avg_sqs, steps, lrs, beta1,
//                  beta2, eps, weight_decay, decoupled_weight_decay=False, bf16=False) -> losses
// ceil(len(x) / batch_size) steps, one after another, over the consecutive batches of batch_size
// rows of x (the last one shorter when batch_size does not divide len(x)): step s is the step above
// on x[s * batch_size : (s + 1) * batch_size] with learning rate lrs[s] (one per step). Returns the
// steps' losses, shape (steps,). Every target is checked before the first step, so a bad label
// changes nothing.
#include <torch/extension.h>

#include <map>
#include <string>
#include <vector>

#include "cpu/gemm_choice.h"
#include "cpu/kernels.h"

#ifdef FASTMLP_WITH_CUDA
namespace fastmlp::cuda {
const char* compiled_arch_list();
void register_cuda_kernels();  // csrc/cuda/ops_cuda.cpp
}  // namespace fastmlp::cuda
#endif

TORCH_LIBRARY(fastmlp, m) {
  m.def("linear_relu_fwd(Tensor x, Tensor w, Tensor? b) -> (Tensor, Tensor)");
  m.def("linear_relu_bwd(Tensor gy, Tensor x, Tensor w, Tensor mask, bool[3] needs) -> (Tensor, Tensor, Tensor)");
  m.def("linear_fwd(Tensor x, Tensor w, Tensor? b) -> Tensor");
  m.def("linear_bwd(Tensor gy, Tensor x, Tensor w, bool[3] needs) -> (Tensor, Tensor, Tensor)");
  m.def("mlp_forward(Tensor x, Tensor[] weights, Tensor[] biases, bool relu_last=False) -> Tensor");
  m.def(
      "mlp_sgd_step(Tensor x, Tensor target, Tensor(a!)[] weights, Tensor(b!)[] biases, "
      "Tensor(c!)[] weight_bufs, Tensor(d!)[] bias_bufs, float lr, float momentum, float weight_decay, "
      "Tensor? lr_scale=None, bool bf16=False) -> Tensor");
  m.def(
      "mlp_adam_step(Tensor x, Tensor target, Tensor(a!)[] weights, Tensor(b!)[] biases, "
      "Tensor(c!)[] exp_avgs, Tensor(d!)[] exp_avg_sqs, Tensor(e!)[] steps, float lr, float beta1, float beta2, "
      "float eps, float weight_decay, bool decoupled_weight_decay=False, Tensor? lr_scale=None, bool bf16=False) "
      "-> Tensor");
  m.def(
      "mlp_sgd_steps(Tensor x, Tensor target, int batch_size, Tensor(a!)[] weights, Tensor(b!)[] biases, "
      "Tensor(c!)[] weight_bufs, Tensor(d!)[] bias_bufs, float[] lrs, float momentum, float weight_decay, "
      "bool bf16=False) -> Tensor");
  m.def(
      "mlp_adam_steps(Tensor x, Tensor target, int batch_size, Tensor(a!)[] weights, Tensor(b!)[] biases, "
      "Tensor(c!)[] exp_avgs, Tensor(d!)[] exp_avg_sqs, Tensor(e!)[] steps, float[] lrs, float beta1, float beta2, "
      "float eps, float weight_decay, bool decoupled_weight_decay=False, bool bf16=False) -> Tensor");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastmlp compiled kernels (ops are registered under torch.ops.fastmlp)";
  m.def("torch_version", [] { return std::string(FASTMLP_TORCH_VERSION); },
        "The torch version this extension was compiled against.");
  m.def("cpu_isa", [] { return std::string(fastmlp::cpu::active_kernels().isa); },
        "Instruction set of the CPU kernels in use.");
  m.def("supported_cpu_isas", [] { return std::string(fastmlp::cpu::supported_isas()); });
  m.def("cpu_k_block", [] { return fastmlp::cpu::k_block_of(fastmlp::cpu::active_kernels().f32); },
        "K block of the float32 GEMMs of the CPU kernels in use.");
  m.def("cpu_k_block_override", [] { return fastmlp::cpu::k_block_override(); },
        "The K block set for every CPU GEMM (FASTMLP_CPU_KBLOCK or set_cpu_k_block), or 0 for none.");
  m.def("set_cpu_k_block", [](int64_t k_block) {
        TORCH_CHECK(fastmlp::cpu::set_k_block_override(k_block), "fastmlp: the K block must be a multiple of 16 ",
                    "from 16 to 1024, or 0 for each CPU's own, got ", k_block);
      },
      "Tuning aid: the K block of every CPU GEMM (0: each CPU's measured one; FASTMLP_CPU_KBLOCK). "
      "Results are the same bits whatever the block.");
  m.def("set_cpu_isa", [](const std::string& isa) {
        TORCH_CHECK(fastmlp::cpu::set_isa(isa.c_str()), "fastmlp: CPU instruction set '", isa,
                    "' is unknown or not supported here; supported: ", fastmlp::cpu::supported_isas(),
                    " (or 'auto')");
      },
      "Select the CPU kernels: 'auto', 'avx512', 'avx2' or 'generic'.");
  m.def("gemm_mode", [] { return std::string(fastmlp::cpu::gemm_mode_name()); },
        "Which GEMMs serve the layer ops: 'auto', 'fastmlp' or 'vendor' (FASTMLP_GEMM).");
  m.def("set_gemm", [](const std::string& mode) {
        TORCH_CHECK(fastmlp::cpu::set_gemm_mode(mode.c_str()), "fastmlp.set_gemm: mode must be 'auto', ",
                    "'fastmlp' or 'vendor', got '", mode, "'");
      },
      "Select the GEMMs of the layer ops: 'auto', 'fastmlp' or 'vendor'; forgets the tuned choices.");
  m.def("gemm_choices", [] {
        std::vector<std::map<std::string, py::object>> out;
        for (const auto& c : fastmlp::cpu::gemm_choices())
          out.push_back({{"kind", py::str(c.kind)}, {"dtype", py::str(c.dtype)}, {"isa", py::str(c.isa)},
                         {"rows", py::int_(c.rows)}, {"cols", py::int_(c.cols)}, {"inner", py::int_(c.inner)},
                         {"threads", py::int_(c.threads)}, {"fastmlp_us", py::float_(c.fastmlp_us)},
                         {"vendor_us", py::float_(c.vendor_us)},
                         {"gemm", py::str(c.vendor ? "vendor" : "fastmlp")}});
        return out;
      },
      "The CPU layer GEMM shapes timed both ways in 'auto' mode, with their times and the winner.");
  m.def("cuda_arch_list", [] {
#ifdef FASTMLP_WITH_CUDA
    return std::string(fastmlp::cuda::compiled_arch_list());
#else
    return std::string();
#endif
  }, "SM architectures the CUDA sources were compiled for; empty for a CPU-only build.");
  m.def("has_cuda_kernels", [] {
#ifdef FASTMLP_WITH_CUDA
    return true;
#else
    return false;
#endif
  }, "Whether this build contains the hand-written CUDA kernels (see register_cuda_kernels).");
#ifdef FASTMLP_WITH_CUDA
  // The CUDA kernels are not registered at load time (no TORCH_LIBRARY_IMPL(fastmlp, CUDA, ...)):
  // fastmlp/_ops.py calls this only when FASTMLP_CUDA_KERNELS=1.
  m.def("register_cuda_kernels", &fastmlp::cuda::register_cuda_kernels,
        "Register the hand-written CUDA kernels for the fastmlp ops' CUDA dispatch key (idempotent).");
#endif
}
