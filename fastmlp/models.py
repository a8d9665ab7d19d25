"""The two MLPs of the classic PyTorch course, on fastmlp's fused layers or in plain PyTorch.

    mnist_mlp()                  # FusedMLP([784, 128, 64, 10])
    fashion_mlp(backend="torch") # nn.Sequential(Linear(784, 256), ReLU(), Linear(256, 10))
    mnist_mlp(dropout=0.2)       # dropout after each hidden activation

Both backends have the same parameters, initialisation (for the same torch seed) and state_dict keys
("0.weight", "0.bias", "2.weight", ...), with or without dropout, so checkpoints load into plain_mlp(sizes).
"""

from collections import OrderedDict

from torch import nn

from .modules import FusedLinearReLU, FusedMLP, Linear, plain_mlp

MNIST_SIZES = (784, 128, 64, 10)
FASHION_SIZES = (784, 256, 10)
SIZES = {"mnist": MNIST_SIZES, "fashion-mnist": FASHION_SIZES}
BACKENDS = ("fused", "torch")


def mlp(sizes, backend: str = "fused", dropout: float = 0.0) -> nn.Sequential:
    """FusedMLP(sizes) for backend "fused", its plain-PyTorch twin plain_mlp(sizes) for "torch".

    dropout > 0 adds nn.Dropout(dropout) after every hidden ReLU, in the parameter-free slots "1", "3", ...
    (fused: Dropout there; torch: Sequential(ReLU, Dropout) there), so the state_dict keys do not change.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if dropout == 0.0:
        return FusedMLP(sizes) if backend == "fused" else plain_mlp(sizes)
    layers = OrderedDict()
    pairs = list(zip(sizes[:-1], sizes[1:]))
    for i, (fan_in, fan_out) in enumerate(pairs):
        last = i == len(pairs) - 1
        if backend == "fused":
            layers[str(2 * i)] = (Linear if last else FusedLinearReLU)(fan_in, fan_out)
            if not last:
                layers[str(2 * i + 1)] = nn.Dropout(dropout)
        else:
            layers[str(2 * i)] = nn.Linear(fan_in, fan_out)
            if not last:
                layers[str(2 * i + 1)] = nn.Sequential(nn.ReLU(), nn.Dropout(dropout))
    return nn.Sequential(layers)


def mnist_mlp(backend: str = "fused", dropout: float = 0.0) -> nn.Sequential:
    """MNIST: 784-128-64-10, ReLU after both hidden layers."""
    return mlp(MNIST_SIZES, backend, dropout)


def fashion_mlp(backend: str = "fused", dropout: float = 0.0) -> nn.Sequential:
    """Fashion-MNIST: 784-256-10, ReLU after the hidden layer."""
    return mlp(FASHION_SIZES, backend, dropout)


def model_for(dataset: str, backend: str = "fused", dropout: float = 0.0) -> nn.Sequential:
    """The model of `dataset` ("mnist" or "fashion-mnist")."""
    if dataset not in SIZES:
        raise ValueError(f"unknown dataset {dataset!r}; choose from {', '.join(SIZES)}")
    return mlp(SIZES[dataset], backend, dropout)
