"""fastmlp: hand-written fused Linear+ReLU kernels for training small MLPs fast.

    import fastmlp
    layer = fastmlp.FusedLinearReLU(784, 256)      # == nn.Sequential(nn.Linear(784, 256), nn.ReLU())
    model = fastmlp.FusedMLP([784, 128, 64, 10])   # ReLU after each hidden layer
    model = fastmlp.convert(plain_model)           # Linear->ReLU pairs become FusedLinearReLU
    fastmlp.backend()                              # what serves the ops here
"""

import torch as _torch

from . import _ops
from . import functional
from .functional import linear, linear_relu
from .cuda_graph import CUDAGraphStep
from .modules import FusedLinearReLU, FusedMLP, Linear, convert, plain_mlp

__version__ = "0.1.0"

__all__ = [
    "CUDAGraphStep",
    "FusedLinearReLU",
    "FusedMLP",
    "Linear",
    "backend",
    "backend_info",
    "convert",
    "gemm_choices",
    "functional",
    "linear",
    "linear_relu",
    "plain_mlp",
    "predict",
    "set_gemm",
    "set_cpu_isa",
]


def backend(device="cpu") -> str:
    """What serves fastmlp's ops for tensors on `device`:

    "compiled"  hand-written kernels from the compiled extension
    "fallback"  the pure-PyTorch reference (no extension; for CUDA also when the extension was built
                without its CUDA sources, or FASTMLP_CUDA_KERNELS=0 was set at import)
    """
    kind = _torch.device(device).type
    if kind == "cpu":
        return "compiled" if _ops._C is not None else "fallback"
    if kind == "cuda":
        return "compiled" if _ops.CUDA_KERNELS else "fallback"
    raise ValueError(f"fastmlp.backend: unsupported device type {kind!r} (cpu or cuda)")


def backend_info() -> dict:
    """Details behind backend(): extension status, CPU instruction set, what runs bfloat16 on the CPU
    ("cpu_bf16": AMX tiles, AVX512-BF16 dot products, or the float32 kernels on widened operands), the
    K block of the float32 CPU GEMM ("cpu_k_block": tuned per kind of CPU, FASTMLP_CPU_KBLOCK),
    which GEMMs serve the layer ops ("gemm" mode, see set_gemm; "cpu_vendor_gemm_shapes": where "auto"
    chose the vendor GEMM on the CPU; "cuda_vendor_gemm": its rule on CUDA), CUDA build."""
    info = {
        "extension": _ops._C is not None,
        "cpu": backend("cpu"),
        "cuda": backend("cuda"),
        "torch": _torch.__version__,
    }
    if _ops._C is None:
        info["fallback_reason"] = _ops.FALLBACK_REASON
    else:
        info["cpu_isa"] = _ops._C.cpu_isa()
        info["supported_cpu_isas"] = _ops._C.supported_cpu_isas().split(",")
        info["cpu_k_block"] = _ops._C.cpu_k_block()
        isa = info["cpu_isa"]
        bf16_gemm = isa.startswith("amx") or isa.startswith("avx512-bf16")
        info["cpu_bf16"] = isa if bf16_gemm else "float32 kernels (operands widened)"
        info["gemm"] = _ops._C.gemm_mode()
        vendor = sorted({f"{c['kind']} {c['rows']}x{c['inner']}->{c['cols']}" for c in gemm_choices()
                         if c["gemm"] == "vendor"})
        info["cpu_vendor_gemm_shapes"] = vendor
        info["cuda_vendor_gemm"] = {"auto": "cuBLAS for GEMMs of >= 2^28 flop", "fastmlp": "never",
                                    "vendor": "always"}[info["gemm"]]
        info["cuda_archs"] = _ops._C.cuda_arch_list()
        info["cuda_kernels_built"] = bool(getattr(_ops._C, "has_cuda_kernels", lambda: False)())
    return info


def set_cpu_isa(isa: str = "auto") -> None:
    """Select the CPU kernels: "auto" (best for this CPU), "amx" (avx512 plus AMX tiles for bfloat16),
    "avx512-bf16" (avx512 plus AVX512-BF16 dot products for bfloat16), "avx512", "avx2" or "generic";
    "amx-emulated" and "avx512-bf16-emulated" run those bfloat16 kernels on an emulator (any CPU; testing).

    Also settable before import with FASTMLP_CPU_ISA. Mainly for testing and benchmarking.
    """
    if _ops._C is None:
        raise RuntimeError(f"fastmlp.set_cpu_isa: no compiled extension ({_ops.FALLBACK_REASON})")
    _ops._C.set_cpu_isa(isa)


def set_gemm(mode: str = "auto") -> None:
    """Select the GEMM of the layer ops (linear_relu, linear, FusedMLP inference), CPU and CUDA:

    "auto"     (default) fastmlp's kernels, except where the vendor GEMM is faster: on the CPU a GEMM
               of at least 2^23 flop at a batch of at least 256 (bfloat16/float16: 2^16 flop, any
               batch) is timed once per process both ways
               (fastmlp's kernel, and ATen's GEMM, i.e. MKL or oneDNN, followed by fastmlp's own
               bias + ReLU + mask epilogue) and the faster serves that shape from then on
               (gemm_choices() lists what was timed); on CUDA a GEMM of at least 2^28 flop goes to
               cuBLAS (a rule from measurements: timing would need a host synchronisation).
               Results may then differ in rounding (within the dtype's error) between processes.
    "fastmlp"  always fastmlp's kernels: bitwise reproducible run to run.
    "vendor"   ATen's GEMM for every layer GEMM (plus fastmlp's epilogue); for comparison.

    Also settable before import with FASTMLP_GEMM. The whole-step training ops always use fastmlp's
    kernels (their weight-gradient GEMM applies the optimizer update). Forgets the choices made so far.
    """
    if _ops._C is None:
        raise RuntimeError(f"fastmlp.set_gemm: no compiled extension ({_ops.FALLBACK_REASON})")
    _ops._C.set_gemm(mode)


def gemm_choices() -> list:
    """The CPU layer GEMMs "auto" mode timed both ways in this process: dicts with kind
    ("forward", "grad_input", "grad_weight"), dtype, isa, rows, cols and inner (C is rows x cols, summed
    over inner; of the first GEMM timed: later batches in the same power-of-two range share the
    choice), threads, fastmlp_us, vendor_us (best times) and gemm (the winner). [] without the
    extension."""
    return [] if _ops._C is None else _ops._C.gemm_choices()


def __getattr__(name):
    # fastmlp.predict (fastmlp.classify.predict), imported on first use: it brings in the trainer's
    # checkpoint code, which `import fastmlp` has no need of.
    if name == "predict":
        from .classify import predict

        return predict
    raise AttributeError(f"module 'fastmlp' has no attribute {name!r}")
