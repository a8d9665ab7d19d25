"""The ops in plain PyTorch: the fallback when the extension is unavailable, the CUDA path unless the
hand-written CUDA kernels are enabled (FASTMLP_CUDA_KERNELS=1), and the executable definition the
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
