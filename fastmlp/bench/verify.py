"""What a benchmark checks before it times anything: every variant computes what PyTorch computes.

A variant that fails its check is reported as wrong (with what differed) and gets no timing and no
ratio; the run then exits non-zero.

Layers are checked against a float64 truth with rigorous float32 error bounds, elementwise:
a GEMM of n products in float32 is within (n + 2) * eps * (|A| @ |B|) of the exact sum (plus the
bias, likewise). Gradients are checked against the truth computed with the variant's own ReLU mask,
so that an element whose pre-activation is within rounding of 0 (it may land on either side in
float32) counts as a mask flip, apart from real errors, instead of spoiling every gradient it feeds.

Training variants are checked against the eager PyTorch step after the same steps from the same
weights: per-step losses within LOSS_TOL * max(1, |loss|), and each parameter's total update within
UPDATE_TOL of PyTorch's update (L2 norms). Not rounding-level tolerances: no check can avoid mask
flips (a pre-activation within rounding of 0 lands on either side, and PyTorch's own float32 result
moves with buffer alignment), after which that sample's gradient through that unit differs and
momentum carries it on. The tolerances sit between the worst correct run and a step at 0.9x the
learning rate (measured: BENCHMARKS.md, "How the benchmark checks"); an idle step is 100% off.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

EPS32 = torch.finfo(torch.float32).eps
LOSS_TOL = 1e-3
UPDATE_TOL = 0.05
# The same check for bfloat16 runs (--precision bf16) against PyTorch under autocast. Measured over 41
# steps (both datasets, 4 seeds; BENCHMARKS.md): correct runs (fastmlp's widened and AMX-emulated
# paths) within 3e-3 in a loss and 1.5% in an update; a step at 0.9x the learning rate 5.9e-2..0.15
# and 10-20%; the float32 trainer 3e-3..1.1e-2 and 5-13%.
LOSS_TOL_BF16 = 1.5e-2
UPDATE_TOL_BF16 = 0.05
# Whole epochs cannot be compared step for step: over hundreds of steps float32 rounding differences
# grow chaotically (BENCHMARKS.md). Trainer epochs are held to the same learning outcome instead.
EPOCH_LOSS_RTOL = 0.05
EPOCH_ACCURACY_TOL = 0.02


@dataclass
class LayerCheck:
    """The outcome of check_layer: real errors and mask flips, counted over output and gradients."""

    errors: int = 0
    mask_flips: int = 0
    elements: int = 0
    worst: str = ""  # where the largest error relative to its bound was, when errors > 0
    details: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.errors == 0

    def as_dict(self) -> dict:
        return {"ok": self.ok, "errors": self.errors, "mask_flips": self.mask_flips, "elements": self.elements,
                "worst": self.worst}


def _count(check: LayerCheck, name: str, got: torch.Tensor, want: torch.Tensor, bound: torch.Tensor):
    got = got.double()
    if got.shape != want.shape:
        check.errors += max(1, want.numel())
        check.details.append(f"{name}: shape {tuple(got.shape)}, expected {tuple(want.shape)}")
        return
    err = (got - want).abs()
    bad = ~(err <= bound)  # NaN counts as bad
    n = int(bad.sum())
    check.elements += want.numel()
    if n:
        check.errors += n
        ratio = torch.where(bad, err / bound.clamp_min(1e-300), torch.zeros_like(err)).nan_to_num(float("inf"))
        i = int(ratio.flatten().argmax())
        check.details.append(f"{name}: {n} of {want.numel()} elements outside the error bound (worst at flat index "
                             f"{i}: {got.flatten()[i].item():.6g} vs {want.flatten()[i].item():.6g}, "
                             f"bound {bound.flatten()[i].item():.3g})")


def check_layer(x, weight, bias, gy, y, gx, gw, gb, relu: bool = True, low: float = 0.0) -> LayerCheck:
    """Checks y = relu(x @ weight.T + bias) (no relu when relu is False) and the gradients gx, gw, gb
    of sum(y * gy), as computed by a float32 variant (any may be None: not checked). low: the unit
    roundoff of a lower precision the variant rounds its operands and outputs to (bfloat16 under
    autocast: 2^-8); each bound then grows by 3 * low times the sum of the terms' magnitudes (two
    rounded factors per product, one rounded result)."""
    x64, w64, gy64 = x.detach().double(), weight.detach().double(), gy.double()
    b64 = None if bias is None else bias.detach().double()
    m, k = x64.shape
    n = w64.shape[0]
    check = LayerCheck()
    z = x64 @ w64.T
    terms = x64.abs() @ w64.abs().T
    zb = ((k + 2) * EPS32 + 3 * low) * terms
    if b64 is not None:
        z = z + b64
        zb = zb + (2 * EPS32 + 3 * low) * b64.abs()
    y = y.detach()
    if relu:
        on = y > 0  # the variant's own mask (y = relu(z) > 0 exactly where its z > 0)
        flip = on != (z > 0)
        near = z.abs() <= zb
        check.mask_flips = int((flip & near).sum())
        real_flip = flip & ~near
        if int(real_flip.sum()):
            check.errors += int(real_flip.sum())
            check.details.append(f"mask: {int(real_flip.sum())} outputs on the wrong side of the ReLU")
        _count(check, "output", y, torch.where(on, z, torch.zeros_like(z)), zb)
        dz = gy64 * on
    else:
        _count(check, "output", y, z, zb)
        dz = gy64
    if gx is not None:
        _count(check, "grad_input", gx, dz @ w64, ((n + 2) * EPS32 + 3 * low) * (dz.abs() @ w64.abs()) + 1e-300)
    if gw is not None:
        _count(check, "grad_weight", gw, dz.T @ x64, ((m + 2) * EPS32 + 3 * low) * (dz.abs().T @ x64.abs()) + 1e-300)
    if gb is not None:
        _count(check, "grad_bias", gb, dz.sum(0), ((m + 2) * EPS32 + 3 * low) * dz.abs().sum(0) + 1e-300)
    if check.details:
        check.worst = "; ".join(check.details)
    return check


def check_output(out, reference, truth, factor: float = 4.0) -> str:
    """"" when a float32 output is as close to the float64 truth as PyTorch's own float32 result
    (`reference`) is, up to `factor` times its error (plus 1e-6 of the largest value); else what
    differed. For a whole network, whose rounding no simple elementwise bound follows."""
    if tuple(out.shape) != tuple(truth.shape):
        return f"output shape {tuple(out.shape)}, expected {tuple(truth.shape)}"
    truth = truth.double()
    theirs = float((reference.double() - truth).abs().max()) if truth.numel() else 0.0
    ours = float((out.detach().double() - truth).abs().max()) if truth.numel() else 0.0
    tol = factor * theirs + 1e-6 * max(float(truth.abs().max()) if truth.numel() else 0.0, 1.0)
    if not ours <= tol:
        return f"output off the float64 truth by up to {ours:.3g} (PyTorch's float32: {theirs:.3g}; tolerance {tol:.3g})"
    return ""


def check_training(start: dict, ref_losses, ref_state: dict, losses, state: dict, loss_tol: float = LOSS_TOL,
                   update_tol: float = UPDATE_TOL) -> list[str]:
    """What differs between a variant's run and the reference run, both from the parameters `start`
    (state_dicts) over the same steps: [] when the losses and every parameter's update agree."""
    problems = []
    ref_losses = [float(v) for v in ref_losses]
    losses = [float(v) for v in losses]
    if len(losses) != len(ref_losses):
        return [f"{len(losses)} losses for {len(ref_losses)} steps"]
    for i, (a, b) in enumerate(zip(losses, ref_losses)):
        if not abs(a - b) <= loss_tol * max(1.0, abs(b)):
            problems.append(f"loss of step {i + 1}: {a:.7g} vs {b:.7g} (tolerance {loss_tol:g} x max(1, |loss|))")
            break
    for name, s0 in start.items():
        if name not in state:
            problems.append(f"parameter {name} missing")
            continue
        ref_update = ref_state[name].double() - s0.double()
        update = state[name].detach().cpu().double() - s0.double()
        scale = float(ref_update.norm())
        diff = float((update - ref_update).norm())
        if not diff <= update_tol * scale:
            share = f"{100 * diff / scale:.3g}%" if scale else "all"
            problems.append(f"update of {name}: off by {share} of PyTorch's (L2 norms; tolerance {100 * update_tol:g}%)")
    return problems


def check_epoch(entry: dict, ref: dict) -> list[str]:
    """A trainer epoch's history entry against the reference trainer's for the same epoch."""
    problems = []
    a, b = entry["train_loss"], ref["train_loss"]
    if not abs(a - b) <= EPOCH_LOSS_RTOL * abs(b):
        problems.append(f"epoch {entry['epoch']} train loss {a:.4f} vs {b:.4f} (tolerance {EPOCH_LOSS_RTOL:g} relative)")
    a, b = entry.get("val_accuracy"), ref.get("val_accuracy")
    if b is not None and not (a is not None and abs(a - b) <= EPOCH_ACCURACY_TOL):
        problems.append(f"epoch {entry['epoch']} validation accuracy {a} vs {b:.4f} (tolerance {EPOCH_ACCURACY_TOL:g})")
    return problems
