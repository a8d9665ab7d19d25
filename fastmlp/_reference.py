"""The ops in plain PyTorch: the fallback when the extension is unavailable, the CUDA path when the
hand-written CUDA kernels are not built or are disabled (FASTMLP_CUDA_KERNELS=0), and the executable definition the
kernels are tested against."""

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
    dz = gy * unpack_bits(mask, w.shape[0]).to(gy.dtype)
    return linear_bwd(dz, x, w, needs)


def mlp_sgd_step(x, target, weights, biases, weight_bufs, bias_bufs, lr, momentum, weight_decay, lr_scale=None):
    """Forward, mean cross-entropy, backward and torch.optim.SGD's update, all in place."""
    if lr_scale is not None:
        if lr_scale.numel() != 1 or lr_scale.dtype != x.dtype or lr_scale.device != x.device:
            raise RuntimeError(
                f"fastmlp::mlp_sgd_step: lr_scale must be a one-element {x.dtype} tensor on {x.device}, got "
                f"{lr_scale.dtype} of shape {tuple(lr_scale.shape)} on {lr_scale.device}"
            )
        lr = lr * float(lr_scale)
    if target.dtype != torch.int64:
        raise RuntimeError(f"fastmlp::mlp_sgd_step: target must be int64 class indices, got {target.dtype}")
    classes = weights[-1].shape[0]
    bad = (target < 0) | (target >= classes)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise RuntimeError(
            f"fastmlp::mlp_sgd_step: target[{i}] = {int(target[i])} is not a class index in [0, {classes})"
        )
    with torch.no_grad():
        n_layers = len(weights)
        inputs, masks = [x], []
        for i, w in enumerate(weights):
            z = torch.nn.functional.linear(inputs[-1], w, biases[i] if biases else None)
            if i + 1 < n_layers:
                masks.append(z > 0)
                z = torch.relu(z)
            inputs.append(z)
        logits = inputs[-1]
        loss = torch.nn.functional.cross_entropy(logits, target)
        dz = torch.softmax(logits, dim=1)
        dz[torch.arange(len(target), device=x.device), target] -= 1
        dz /= len(target)
        for i in reversed(range(n_layers)):
            w = weights[i]
            grads = [(w, dz.t() @ inputs[i], weight_bufs[i] if momentum else None)]
            if biases:
                grads.append((biases[i], dz.sum(0), bias_bufs[i] if momentum else None))
            if i > 0:
                dz = (dz @ w) * masks[i - 1]
            for param, grad, buf in grads:
                grad = grad.add(param, alpha=weight_decay) if weight_decay else grad
                if buf is not None:
                    grad = buf.mul_(momentum).add_(grad)
                param.sub_(grad, alpha=lr)
        return loss
