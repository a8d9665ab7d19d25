"""Shared helpers for the op/module tests (kept out of conftest.py on purpose: plain imports)."""

import pytest
import torch

import fastmlp

# The "cuda" case carries the `cuda` marker: benchmarks/gpu_check.sh selects GPU tests with -m cuda, and
# conftest.py checks that the compiled CUDA kernels serve every test so marked.
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.cuda,
                                pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]),
]

# The CPU kernel families the extension compiles (csrc/cpu/dispatch.cpp), best first. "amx" is the
# avx512 kernels plus the AMX bfloat16 GEMM, "avx512-bf16" the avx512 kernels plus the AVX512-BF16 one.
COMPILED_CPU_ISAS = ("amx", "avx512-bf16", "avx512", "avx2", "generic")
# Families whose float32 kernels are another's (avx512's): only the bfloat16 tests run on them.
BF16_ONLY_ISAS = ("avx512-bf16",)


def two_fused_steps(optimizer, batch):
    """Two whole steps of a 784-256-64-10 FusedMLP from fixed seeds (SGD with momentum and weight decay,
    or AdamW): the losses, then the parameters, then every optimizer state tensor, for bitwise
    comparisons of runs under different settings (thread count, K block)."""
    make = {"sgd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-3),
            "adam": lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=1e-2)}[optimizer]
    torch.manual_seed(5)
    batches = [(torch.randn(batch, 784), torch.randint(0, 10, (batch,))) for _ in range(2)]
    torch.manual_seed(6)
    model = fastmlp.FusedMLP([784, 256, 64, 10])
    opt = make(model.parameters())
    losses = [model.train_step(x, y, opt) for x, y in batches]
    state = [t for p in model.parameters() for t in opt.state[p].values() if t.dim() > 0]
    return losses + [p.detach() for p in model.parameters()] + state


def torch_train_step(model, opt, x, y):
    """The ordinary step the fused ones must equal: cross-entropy, backward, optimizer step; the loss."""
    loss = torch.nn.functional.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.detach()


def low_precision_isas():
    """cpu_isas(), "avx512-bf16", and the bfloat16 GEMMs on their emulators ("amx-emulated",
    "avx512-bf16-emulated": any CPU): the kernel families the bfloat16 tests run on."""
    isas = cpu_isas()
    if isas == ["fallback"]:
        return isas
    return isas + _params(BF16_ONLY_ISAS) + ["amx-emulated", "avx512-bf16-emulated"]


def _params(names):
    supported = fastmlp.backend_info()["supported_cpu_isas"]
    return [pytest.param(isa, marks=pytest.mark.skipif(isa not in supported, reason=f"CPU lacks {isa}"))
            for isa in names]


def cpu_isas():
    """pytest parameters for the CPU kernels: every compiled family, those this CPU cannot run marked
    skipped ("CPU lacks avx512"), so that a run says which kernels it did not test instead of leaving
    them out; "fallback" alone without the compiled extension. The `isa` fixture (conftest.py) runs
    a test once per entry."""
    if not fastmlp.backend_info()["extension"]:
        return ["fallback"]
    return _params([isa for isa in COMPILED_CPU_ISAS if isa not in BF16_ONLY_ISAS])


def assert_close_to_truth(ours, theirs, truth, name, factor=4.0):
    """float32 tolerance derived from PyTorch's own error: our distance from the float64 truth must be
    within `factor` times PyTorch's distance from it (plus a hair for values PyTorch gets exact)."""
    assert ours.shape == truth.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(truth.shape)}"
    if truth.numel() == 0:
        return
    truth = truth.double()
    their_err = (theirs.double() - truth).abs().max().item()
    our_err = (ours.double() - truth).abs().max().item()
    scale = truth.abs().max().item()
    tol = factor * their_err + 1e-6 * max(scale, 1.0)
    assert our_err <= tol, f"{name}: max error {our_err:.3g} vs PyTorch's {their_err:.3g} (tol {tol:.3g})"
