"""Loads the compiled extension, or falls back to the pure-PyTorch reference, and gives every op of
the `fastmlp` namespace its fake (meta) implementation and (for the fallback) its autograd formula.

After import, torch.ops.fastmlp.{linear_relu_fwd, linear_relu_bwd, linear_fwd, linear_bwd, mlp_forward,
mlp_sgd_step, mlp_adam_step, mlp_sgd_steps, mlp_adam_steps} exist whatever the backend (schemas: csrc/ops.cpp).

Environment (read once, at import):
  FASTMLP_DISABLE_EXTENSION=1  ignore the compiled extension: the pure-PyTorch reference serves all
  FASTMLP_CPU_ISA=NAME         the CPU kernels to use (amx, avx512-bf16, avx512, avx2, generic, or
                               amx-emulated / avx512-bf16-emulated; read by the extension); a name this
                               CPU cannot run warns and the best kernels serve
  FASTMLP_CPU_KBLOCK=N         the K block of the CPU GEMMs (a multiple of 16 from 16 to 1024; a tuning aid,
                               as _C.set_cpu_k_block: results are the same bits whatever the block); another
                               value warns and each CPU's measured block serves
  FASTMLP_REFUSE_AMX=1         behave as if Linux refused the AMX tile data (tests the fallback)
  FASTMLP_GEMM=MODE            the GEMM of the CPU layer ops: auto (default), fastmlp or vendor (read by the
                               extension; see fastmlp.set_gemm); another value warns and auto serves
  FASTMLP_CUDA_KERNELS=0       serve CUDA tensors with the PyTorch reference instead of the
                               hand-written CUDA kernels (the default when the build has them)
"""

import os
import warnings

import torch

from . import _checks
from . import _reference as ref

SCHEMAS = {
    "linear_relu_fwd": "linear_relu_fwd(Tensor x, Tensor w, Tensor? b) -> (Tensor, Tensor)",
    "linear_relu_bwd": "linear_relu_bwd(Tensor gy, Tensor x, Tensor w, Tensor mask, bool[3] needs)"
    " -> (Tensor, Tensor, Tensor)",
    "linear_fwd": "linear_fwd(Tensor x, Tensor w, Tensor? b) -> Tensor",
    "linear_bwd": "linear_bwd(Tensor gy, Tensor x, Tensor w, bool[3] needs) -> (Tensor, Tensor, Tensor)",
    "mlp_forward": "mlp_forward(Tensor x, Tensor[] weights, Tensor[] biases, bool relu_last=False) -> Tensor",
    "mlp_sgd_step": "mlp_sgd_step(Tensor x, Tensor target, Tensor(a!)[] weights, Tensor(b!)[] biases, "
    "Tensor(c!)[] weight_bufs, Tensor(d!)[] bias_bufs, float lr, float momentum, float weight_decay, "
    "Tensor? lr_scale=None, bool bf16=False) -> Tensor",
    "mlp_adam_step": "mlp_adam_step(Tensor x, Tensor target, Tensor(a!)[] weights, Tensor(b!)[] biases, "
    "Tensor(c!)[] exp_avgs, Tensor(d!)[] exp_avg_sqs, Tensor(e!)[] steps, float lr, float beta1, float beta2, "
    "float eps, float weight_decay, bool decoupled_weight_decay=False, Tensor? lr_scale=None, bool bf16=False) "
    "-> Tensor",
    "mlp_sgd_steps": "mlp_sgd_steps(Tensor x, Tensor target, int batch_size, Tensor(a!)[] weights, "
    "Tensor(b!)[] biases, Tensor(c!)[] weight_bufs, Tensor(d!)[] bias_bufs, float[] lrs, float momentum, "
    "float weight_decay, bool bf16=False) -> Tensor",
    "mlp_adam_steps": "mlp_adam_steps(Tensor x, Tensor target, int batch_size, Tensor(a!)[] weights, "
    "Tensor(b!)[] biases, Tensor(c!)[] exp_avgs, Tensor(d!)[] exp_avg_sqs, Tensor(e!)[] steps, float[] lrs, "
    "float beta1, float beta2, float eps, float weight_decay, bool decoupled_weight_decay=False, bool bf16=False) "
    "-> Tensor",
}
_REFERENCE = {
    "linear_relu_fwd": ref.linear_relu_fwd,
    "linear_relu_bwd": ref.linear_relu_bwd,
    "linear_fwd": ref.linear_fwd,
    "linear_bwd": ref.linear_bwd,
    "mlp_forward": ref.mlp_forward,
    "mlp_sgd_step": ref.mlp_sgd_step,
    "mlp_adam_step": ref.mlp_adam_step,
    "mlp_sgd_steps": ref.mlp_sgd_steps,
    "mlp_adam_steps": ref.mlp_adam_steps,
}

REBUILD_HINT = "pip install --no-build-isolation --force-reinstall --no-deps ."


def _load_extension():
    """Returns (module or None, reason it is None)."""
    if os.environ.get("FASTMLP_DISABLE_EXTENSION", "0") == "1":
        return None, "disabled by FASTMLP_DISABLE_EXTENSION=1"
    try:
        from . import _build_meta
    except ImportError:
        return None, "the compiled extension is not built"
    if _build_meta.TORCH_VERSION != torch.__version__:
        raise ImportError(
            f"fastmlp's compiled extension was built against torch {_build_meta.TORCH_VERSION}, but "
            f"torch {torch.__version__} is installed. Rebuild it against this torch: {REBUILD_HINT}"
        )
    try:
        from . import _C
    except ImportError as e:
        return None, f"the compiled extension failed to load ({e})"
    return _C, None


_C, FALLBACK_REASON = _load_extension()

# Kept alive for the life of the process: dropping a Library unregisters what it registered.
_LIBS = []


def _register_reference(key: str, define: bool) -> None:
    """Registers _reference.py's implementation of every op for the dispatch key `key`, defining the
    ops first when `define` (no compiled extension: the Python schemas are the only ones)."""
    lib = torch.library.Library("fastmlp", "DEF" if define else "IMPL")
    for name, schema in SCHEMAS.items():
        if define:
            lib.define(schema)
        lib.impl(name, _REFERENCE[name], key)
    _LIBS.append(lib)


def _register_step_fallthrough() -> None:
    """The step ops fall through autograd (csrc/autograd.cpp): optimizer steps, no graph."""
    lib = torch.library.Library("fastmlp", "IMPL")
    for name in ("mlp_sgd_step", "mlp_adam_step", "mlp_sgd_steps", "mlp_adam_steps"):
        lib.impl(name, torch.library.fallthrough_kernel, "Autograd")
    _LIBS.append(lib)


def _autocast_cast(value, device_type, dtype):
    if isinstance(value, torch.Tensor):
        eligible = value.is_floating_point() and value.dtype != torch.float64 and value.device.type == device_type
        return value.to(dtype) if eligible else value
    if isinstance(value, (list, tuple)):
        return [_autocast_cast(v, device_type, dtype) for v in value]
    return value


def _register_autocast() -> None:
    """Autocast for the fallback's layer ops and mlp_forward (csrc/autocast.cpp's rule, in Python):
    under torch.autocast their floating inputs of that device, float64 excepted, are cast to the
    autocast dtype, then the op runs below autocast, so that its autograd sees the dtypes it computes
    in."""
    lib = torch.library.Library("fastmlp", "IMPL")
    for device_type in ("cpu", "cuda"):
        key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        keyset = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))
        for name in ("linear_relu_fwd", "linear_fwd", "mlp_forward"):
            op = getattr(torch.ops.fastmlp, name).default

            def kernel(_keys, *args, op=op, keyset=keyset, device_type=device_type):
                dtype = torch.get_autocast_dtype(device_type)
                with torch._C._ExcludeDispatchKeyGuard(keyset):
                    return op(*(_autocast_cast(a, device_type, dtype) for a in args))

            lib.impl(name, kernel, key, with_keyset=True)
    _LIBS.append(lib)


if _C is None:
    if not FALLBACK_REASON.startswith("disabled"):
        warnings.warn(
            f"fastmlp: {FALLBACK_REASON}; using the pure-PyTorch fallback (same results, no fused "
            f"kernels). To build the kernels: {REBUILD_HINT}",
            RuntimeWarning,
            stacklevel=2,
        )
    _register_reference("CompositeExplicitAutograd", define=True)
    _register_step_fallthrough()
    _register_autocast()
    CUDA_KERNELS = False
else:
    _isa_env = os.environ.get("FASTMLP_CPU_ISA", "")
    if _isa_env not in ("", "auto") and _C.cpu_isa() != _isa_env:
        warnings.warn(
            f"fastmlp: FASTMLP_CPU_ISA={_isa_env} is not a CPU kernel family this machine runs (it runs: "
            f"{_C.supported_cpu_isas()}); using {_C.cpu_isa()}",
            RuntimeWarning,
            stacklevel=2,
        )
    _kblock_env = os.environ.get("FASTMLP_CPU_KBLOCK", "")
    if _kblock_env and _C.cpu_k_block_override() == 0:  # the extension ignored it
        warnings.warn(
            f"fastmlp: FASTMLP_CPU_KBLOCK={_kblock_env} is not a multiple of 16 from 16 to 1024; using this "
            f"CPU's K block ({_C.cpu_k_block()})",
            RuntimeWarning,
            stacklevel=2,
        )
    _gemm_env = os.environ.get("FASTMLP_GEMM", "")
    if _gemm_env not in ("", "auto", "fastmlp", "vendor"):
        warnings.warn(
            f"fastmlp: FASTMLP_GEMM={_gemm_env} is not a GEMM mode (auto, fastmlp or vendor); using auto",
            RuntimeWarning,
            stacklevel=2,
        )
    # CUDA tensors: the hand-written CUDA kernels (csrc/cuda) when the extension was built with them,
    # unless FASTMLP_CUDA_KERNELS=0 at import; otherwise the PyTorch reference (_reference.py).
    _cuda_env = os.environ.get("FASTMLP_CUDA_KERNELS", "")
    _want_cuda_kernels = _cuda_env != "0"
    _has_cuda_kernels = bool(getattr(_C, "has_cuda_kernels", lambda: False)())
    if _want_cuda_kernels and _has_cuda_kernels:
        _C.register_cuda_kernels()
        CUDA_KERNELS = True
    else:
        if _cuda_env == "1":
            warnings.warn(
                "fastmlp: FASTMLP_CUDA_KERNELS=1 but the compiled extension was built without its CUDA "
                "sources (no nvcc, or FASTMLP_CPU_ONLY=1); CUDA tensors use the PyTorch reference",
                RuntimeWarning,
                stacklevel=2,
            )
        _register_reference("CUDA", define=False)
        CUDA_KERNELS = False


# ---- fake (meta) implementations: the kernels' argument checks (_checks.py), then shapes --------


def _grad_shapes(x, w, needs):
    m, k = x.shape
    n = w.shape[0]
    return (
        x.new_empty((m, k) if needs[0] else (0,)),
        x.new_empty((n, k) if needs[1] else (0,)),
        x.new_empty((n,) if needs[2] else (0,)),
    )


@torch.library.register_fake("fastmlp::linear_relu_fwd")
def _(x, w, b):
    _checks.linear_args("fastmlp::linear_relu_fwd", x, w, b)
    m, n = x.shape[0], w.shape[0]
    return x.new_empty((m, n)), x.new_empty((m, (n + 7) // 8), dtype=torch.uint8)


@torch.library.register_fake("fastmlp::linear_fwd")
def _(x, w, b):
    _checks.linear_args("fastmlp::linear_fwd", x, w, b)
    return x.new_empty((x.shape[0], w.shape[0]))


@torch.library.register_fake("fastmlp::linear_relu_bwd")
def _(gy, x, w, mask, needs):
    _checks.grad_args("fastmlp::linear_relu_bwd", gy, x, w)
    _checks.mask("fastmlp::linear_relu_bwd", mask, x, w)
    return _grad_shapes(x, w, needs)


@torch.library.register_fake("fastmlp::linear_bwd")
def _(gy, x, w, needs):
    _checks.grad_args("fastmlp::linear_bwd", gy, x, w)
    return _grad_shapes(x, w, needs)


@torch.library.register_fake("fastmlp::mlp_forward")
def _(x, weights, biases, relu_last=False):
    _checks.mlp_forward_args("fastmlp::mlp_forward", x, weights, biases)
    return x.new_empty((*x.shape[:-1], weights[-1].shape[0]))


@torch.library.register_fake("fastmlp::mlp_sgd_step")
def _(x, target, weights, biases, weight_bufs, bias_bufs, lr, momentum, weight_decay, lr_scale=None, bf16=False):
    op = "fastmlp::mlp_sgd_step"
    _checks.step_args(op, x, target, weights, biases, weight_bufs, bias_bufs, momentum, lr_scale)
    _checks.bf16_step(op, x, bf16)
    return x.new_empty(())


@torch.library.register_fake("fastmlp::mlp_adam_step")
def _(x, target, weights, biases, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, eps, weight_decay,
      decoupled_weight_decay=False, lr_scale=None, bf16=False):
    op = "fastmlp::mlp_adam_step"
    _checks.adam_args(op, x, target, weights, biases, exp_avgs, exp_avg_sqs, steps, beta1, beta2, eps, lr_scale)
    _checks.bf16_step(op, x, bf16)
    return x.new_empty(())


@torch.library.register_fake("fastmlp::mlp_sgd_steps")
def _(x, target, batch_size, weights, biases, weight_bufs, bias_bufs, lrs, momentum, weight_decay, bf16=False):
    op = "fastmlp::mlp_sgd_steps"
    _checks.step_args(op, x, target, weights, biases, weight_bufs, bias_bufs, momentum, None)
    _checks.bf16_step(op, x, bf16)
    return x.new_empty((_checks.batches(op, x, batch_size, lrs),))


@torch.library.register_fake("fastmlp::mlp_adam_steps")
def _(x, target, batch_size, weights, biases, exp_avgs, exp_avg_sqs, steps, lrs, beta1, beta2, eps, weight_decay,
      decoupled_weight_decay=False, bf16=False):
    op = "fastmlp::mlp_adam_steps"
    _checks.adam_args(op, x, target, weights, biases, exp_avgs, exp_avg_sqs, steps, beta1, beta2, eps, None)
    _checks.bf16_step(op, x, bf16)
    return x.new_empty((_checks.batches(op, x, batch_size, lrs),))


# ---- autograd ------------------------------------------------------------------------------


def _needs(ctx):
    return [
        bool(ctx.needs_input_grad[0]),
        bool(ctx.needs_input_grad[1]),
        bool(ctx.has_bias and ctx.needs_input_grad[2]),
    ]


def _grads_or_none(grads, needs):
    return tuple(g if need else None for g, need in zip(grads, needs))


def _setup_linear_relu(ctx, inputs, output):
    x, w, b = inputs
    _, mask = output
    ctx.has_bias = b is not None
    ctx.mark_non_differentiable(mask)
    ctx.save_for_backward(x, w, mask)


# The backward formulas call the ops through `ops` (default: torch.ops.fastmlp); fastmlp/_functorch.py
# passes differentiable Python wrappers instead, for torch.func transforms.


def _backward_linear_relu(ctx, gy, _gmask, ops=None):
    x, w, mask = ctx.saved_tensors
    needs = _needs(ctx)
    grads = (ops or torch.ops.fastmlp).linear_relu_bwd(gy, x, w, mask, needs)
    return _grads_or_none(grads, needs)


def _setup_linear(ctx, inputs, output):
    x, w, b = inputs
    ctx.has_bias = b is not None
    ctx.save_for_backward(x, w)


def _backward_linear(ctx, gy, ops=None):
    x, w = ctx.saved_tensors
    needs = _needs(ctx)
    grads = (ops or torch.ops.fastmlp).linear_bwd(gy, x, w, needs)
    return _grads_or_none(grads, needs)



def _setup_backward_op(ctx, inputs, output):
    gy, x, w = inputs[:3]
    ctx.relu = len(inputs) == 5  # linear_relu_bwd(gy, x, w, mask, needs) or linear_bwd(gy, x, w, needs)
    ctx.computed = list(inputs[-1])
    ctx.save_for_backward(gy, x, w, *([inputs[3]] if ctx.relu else []))


def _backward_of_backward(ctx, ggx, ggw, ggb, ops=None):
    """The backward ops' own derivatives, with the mask held fixed (the formulas: csrc/autograd.cpp)."""
    gy, x, w, *mask = ctx.saved_tensors
    linear = (ops or torch.ops.fastmlp).linear_fwd
    on = ref.unpack_bits(mask[0], w.shape[0]) if ctx.relu else None
    given = [c and g is not None for c, g in zip(ctx.computed, (ggx, ggw, ggb))]
    dz = torch.where(on, gy, 0) if ctx.relu else gy
    d_gy = d_x = d_w = None
    if ctx.needs_input_grad[0]:
        s = torch.zeros_like(gy)
        if given[0]:
            s = s + linear(ggx, w, None)
        if given[1]:
            s = s + linear(x, ggw, None)
        if given[2]:
            s = s + ggb
        d_gy = torch.where(on, s, 0) if ctx.relu else s
    if ctx.needs_input_grad[1] and given[1]:
        d_x = linear(dz, ggw.t(), None)
    if ctx.needs_input_grad[2] and given[0]:
        d_w = linear(dz.t(), ggx.t(), None)
    return (d_gy, d_x, d_w) + (None,) * (2 if ctx.relu else 1)  # mask, needs


MLP_FORWARD_NEEDS_NO_GRAD = (
    "fastmlp::mlp_forward is inference only (no backward), but an input requires grad; call it under "
    "torch.no_grad() / torch.inference_mode(), or use the layer ops (FusedMLP does this choice itself)"
)


def _refuse_grad(ctx, inputs, output):  # runs at the forward, only when autograd records the op
    raise RuntimeError(MLP_FORWARD_NEEDS_NO_GRAD)


def _no_backward(ctx, *grads):  # never reached: _refuse_grad raised at the forward
    raise RuntimeError(MLP_FORWARD_NEEDS_NO_GRAD)


def _register_fallback_autograd() -> None:
    """The autograd of the fallback's ops. The compiled extension registers the same formulas in C++
    (csrc/autograd.cpp), which spares each fused layer a round trip through Python."""
    register = torch.library.register_autograd
    register("fastmlp::linear_relu_fwd", _backward_linear_relu, setup_context=_setup_linear_relu)
    register("fastmlp::linear_fwd", _backward_linear, setup_context=_setup_linear)
    for name in ("fastmlp::linear_relu_bwd", "fastmlp::linear_bwd"):
        register(name, _backward_of_backward, setup_context=_setup_backward_op)
    register("fastmlp::mlp_forward", _no_backward, setup_context=_refuse_grad)


if _C is None:
    _register_fallback_autograd()
