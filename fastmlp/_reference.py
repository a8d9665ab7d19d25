"""The ops in plain PyTorch: the fallback when the extension is unavailable, the CUDA path when the
hand-written CUDA kernels are not built or are disabled (FASTMLP_CUDA_KERNELS=0), and the executable definition the
kernels are tested against."""

import math

import torch

_BIT_WEIGHTS = {}


def _bit_weights(device):
    w = _BIT_WEIGHTS.get(device)
    if w is None:
        w = _BIT_WEIGHTS[device] = 2 ** torch.arange(8, dtype=torch.uint8, device=device)
    return w


def pack_bits(positive: torch.Tensor) -> torch.Tensor:
    """(M, N) bool -> (M, ceil(N / 8)) uint8; bit j % 8 of byte j // 8 is column j (little-endian)."""
    m, n = positive.shape
    nbytes = (n + 7) // 8
    padded = torch.zeros((m, nbytes * 8), dtype=torch.uint8, device=positive.device)
    padded[:, :n] = positive
    return (padded.view(m, nbytes, 8) * _bit_weights(positive.device)).sum(-1, dtype=torch.uint8)


def unpack_bits(mask: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of pack_bits: (M, ceil(N / 8)) uint8 -> (M, N) bool."""
    bits = (mask.unsqueeze(-1) & _bit_weights(mask.device)) != 0
    return bits.reshape(mask.shape[0], mask.shape[1] * 8)[:, :n]


def _unused(like):
    return like.new_empty((0,))


def linear_relu_fwd(x, w, b):
    z = torch.nn.functional.linear(x, w, b)
    return torch.relu(z), pack_bits(z > 0)


def linear_fwd(x, w, b):
    return torch.nn.functional.linear(x, w, b)


def linear_bwd(gy, x, w, needs):
    gx = gy @ w if needs[0] else _unused(x)
    gw = gy.t() @ x if needs[1] else _unused(x)
    gb = gy.sum(0) if needs[2] else _unused(x)
    return gx, gw, gb


def linear_relu_bwd(gy, x, w, mask, needs):
    # where(), not gy * mask: a NaN in gy where the ReLU is off gives 0, as in PyTorch.
    dz = torch.where(unpack_bits(mask, w.shape[0]), gy, 0)
    return linear_bwd(dz, x, w, needs)


def mlp_forward(x, weights, biases, relu_last=False):
    """Inference through the MLP: relu after every layer but the last (and after it too when
    relu_last), no masks."""
    h = x
    for i, w in enumerate(weights):
        h = torch.nn.functional.linear(h, w, biases[i] if len(biases) else None)
        if i + 1 < len(weights) or relu_last:
            h = h.relu()
    return h


def _check_step(op, x, target, weights, lr, lr_scale):
    """The step ops' value checks (the compiled ops make the same); returns the learning rate."""
    if lr_scale is not None:
        if lr_scale.numel() != 1 or lr_scale.dtype != x.dtype or lr_scale.device != x.device:
            raise RuntimeError(
                f"fastmlp::{op}: lr_scale must be a one-element {x.dtype} tensor on {x.device}, got "
                f"{lr_scale.dtype} of shape {tuple(lr_scale.shape)} on {lr_scale.device}"
            )
        lr = lr * float(lr_scale)
    if target.dtype != torch.int64:
        raise RuntimeError(f"fastmlp::{op}: target must be int64 class indices, got {target.dtype}")
    classes = weights[-1].shape[0]
    bad = (target < 0) | (target >= classes)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise RuntimeError(f"fastmlp::{op}: target[{i}] = {int(target[i])} is not a class index in [0, {classes})")
    return lr


def _round_bf16(t):
    """t rounded to bfloat16, in t's dtype."""
    return t.to(torch.bfloat16).to(t.dtype)


def _loss_and_grads(x, target, weights, biases, bf16=False):
    """Forward, mean cross-entropy and backward of the MLP: (loss, weight grads, bias grads). bf16:
    autocast's bfloat16 arithmetic (every GEMM operand and result rounded to bfloat16; the loss, its
    gradient's softmax and the returned gradients' dtype float32)."""
    r = _round_bf16 if bf16 else (lambda t: t)
    n_layers = len(weights)
    weights, biases = [r(w) for w in weights], [r(b) for b in biases]
    inputs, masks = [r(x)], []
    for i, w in enumerate(weights):
        z = r(torch.nn.functional.linear(inputs[-1], w, biases[i] if biases else None))
        if i + 1 < n_layers:
            masks.append(z > 0)
            z = torch.relu(z)
        inputs.append(z)
    logits = inputs[-1]
    loss = torch.nn.functional.cross_entropy(logits, target)
    dz = torch.softmax(logits, dim=1)
    dz[torch.arange(len(target), device=x.device), target] -= 1
    dz = r(dz / len(target))
    gws, gbs = [None] * n_layers, [None] * n_layers
    for i in reversed(range(n_layers)):
        gws[i] = r(dz.t() @ inputs[i])
        gbs[i] = r(dz.sum(0))
        if i > 0:
            dz = r(dz @ weights[i]) * masks[i - 1]
    return loss, gws, gbs if biases else []


def _check_bf16(op, x, bf16):
    if bf16 and x.dtype != torch.float32:
        raise RuntimeError(f"fastmlp::{op}: bf16=True needs float32 x and parameters, got {x.dtype}")


def mlp_sgd_step(x, target, weights, biases, weight_bufs, bias_bufs, lr, momentum, weight_decay, lr_scale=None,
                 bf16=False):
    """Forward, mean cross-entropy, backward and torch.optim.SGD's update, all in place."""
    lr = _check_step("mlp_sgd_step", x, target, weights, lr, lr_scale)
    _check_bf16("mlp_sgd_step", x, bf16)
    with torch.no_grad():
        loss, gws, gbs = _loss_and_grads(x, target, weights, biases, bf16)
        bufs = list(weight_bufs) + list(bias_bufs) if momentum else [None] * (len(gws) + len(gbs))
        for param, grad, buf in zip(list(weights) + list(biases), gws + gbs, bufs):
            grad = grad.add(param, alpha=weight_decay) if weight_decay else grad
            if buf is not None:
                grad = buf.mul_(momentum).add_(grad)
            param.sub_(grad, alpha=lr)
        return loss


def mlp_adam_step(x, target, weights, biases, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, eps, weight_decay,
                  decoupled_weight_decay=False, lr_scale=None, bf16=False):
    """Forward, mean cross-entropy, backward and torch.optim.Adam's (or AdamW's) update, all in place."""
    lr = _check_step("mlp_adam_step", x, target, weights, lr, lr_scale)
    _check_bf16("mlp_adam_step", x, bf16)
    for i, step in enumerate(steps):  # as csrc/checks.cpp: before any parameter changes
        if step.is_inference() and not torch.is_inference_mode_enabled():
            raise RuntimeError(f"fastmlp::mlp_adam_step: steps[{i}] is an inference tensor (made under "
                               f"torch.inference_mode()): it can only be updated in place inside inference mode")
    with torch.no_grad():
        loss, gws, gbs = _loss_and_grads(x, target, weights, biases, bf16)
        for param, grad, m, v, step in zip(list(weights) + list(biases), gws + gbs, exp_avgs, exp_avg_sqs, steps):
            step.add_(1)
            t = float(step)
            if weight_decay:
                if decoupled_weight_decay:
                    param.mul_(1 - lr * weight_decay)
                else:
                    grad = grad.add(param, alpha=weight_decay)
            m.lerp_(grad, 1 - beta1)
            v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = (v.sqrt() / math.sqrt(1 - beta2**t)).add_(eps)
            param.addcdiv_(m, denom, value=-lr / (1 - beta1**t))
        return loss


def _check_batches(op, x, target, weights, batch_size, lrs, bf16):
    """The *_steps ops' checks before the first step: returns the batches' row ranges."""
    if batch_size < 1:
        raise RuntimeError(f"fastmlp::{op}: batch_size must be >= 1, got {batch_size}")
    n = x.shape[0]
    if n == 0:
        raise RuntimeError(f"fastmlp::{op}: x must hold at least one sample")
    _check_bf16(op, x, bf16)
    count = -(-n // batch_size)
    if len(lrs) != count:
        raise RuntimeError(f"fastmlp::{op}: lrs must hold one learning rate per step ({count} batches of "
                           f"{batch_size} in {n} samples), got {len(lrs)}")
    if target.shape != (n,):
        raise RuntimeError(f"fastmlp::{op}: target must have shape ({n},), got {tuple(target.shape)}")
    _check_step(op, x, target, weights, 1.0, None)  # every label, before any parameter changes
    return [(s * batch_size, min(n, (s + 1) * batch_size)) for s in range(count)]


def mlp_sgd_steps(x, target, batch_size, weights, biases, weight_bufs, bias_bufs, lrs, momentum, weight_decay,
                  bf16=False):
    """mlp_sgd_step on each consecutive batch of batch_size rows of x, step s at learning rate lrs[s]."""
    batches = _check_batches("mlp_sgd_steps", x, target, weights, batch_size, lrs, bf16)
    losses = [mlp_sgd_step(x[lo:hi], target[lo:hi], weights, biases, weight_bufs, bias_bufs, lr, momentum,
                           weight_decay, bf16=bf16) for (lo, hi), lr in zip(batches, lrs)]
    return torch.stack(losses)


def mlp_adam_steps(x, target, batch_size, weights, biases, exp_avgs, exp_avg_sqs, steps, lrs, beta1, beta2, eps,
                   weight_decay, decoupled_weight_decay=False, bf16=False):
    """mlp_adam_step on each consecutive batch of batch_size rows of x, step s at learning rate lrs[s]."""
    batches = _check_batches("mlp_adam_steps", x, target, weights, batch_size, lrs, bf16)
    losses = [mlp_adam_step(x[lo:hi], target[lo:hi], weights, biases, exp_avgs, exp_avg_sqs, steps, lr, beta1,
                            beta2, eps, weight_decay, decoupled_weight_decay, bf16=bf16)
              for (lo, hi), lr in zip(batches, lrs)]
    return torch.stack(losses)
