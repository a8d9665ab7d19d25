"""CUDAGraphStep: FusedMLP's whole training step (the fastmlp::mlp_sgd_step or mlp_adam_step op)
captured once in a CUDA graph and replayed, so that a step costs one graph launch instead of a dozen
kernel launches and a pass through Python and the dispatcher for each."""

import torch

from . import _ops
from .modules import FusedMLP
from .step_binding import bind, step_kind, validated


class CUDAGraphStep:
    """A replayable training step for a FusedMLP on a GPU, with a torch.optim.SGD optimizer, or an
    Adam / AdamW one created with capturable=True (its step counts then live on the GPU, where the
    graph can advance them):

        step = fastmlp.CUDAGraphStep(model, optimizer, batch_size=64)
        for x, y in batches:
            loss = step(x, y)          # == model.train_step(x, y, optimizer), one graph launch

    Each call copies the batch into static input buffers, sets the learning rate on the device
    (so LR schedulers and per-step schedules work without capturing again) and replays the graph.
    The graph is captured on the first call, and again only when a hyper-parameter other than the
    learning rate changes or the parameters or optimizer state tensors are replaced (e.g.
    optimizer.load_state_dict()). Batches of another size (a last, partial batch) run through
    model.train_step() instead.

    The returned loss is a GPU tensor that the next call overwrites: read it (loss.item()) or
    clone it before calling again. Needs fastmlp's compiled CUDA kernels (fastmlp.backend("cuda")
    == "compiled"), whose step never synchronises with the host: a target outside [0, classes)
    gives a NaN loss and leaves the parameters and optimizer state unchanged.
    """

    def __init__(self, model: FusedMLP, optimizer: torch.optim.Optimizer, batch_size: int):
        if not isinstance(model, FusedMLP):
            raise TypeError(f"CUDAGraphStep needs a fastmlp.FusedMLP, got {type(model).__name__}")
        weight = model[0].weight
        if weight.device.type != "cuda":
            raise ValueError(f"CUDAGraphStep needs a model on a CUDA device, got one on {weight.device}")
        if not _ops.CUDA_KERNELS:
            raise RuntimeError(
                "CUDAGraphStep needs fastmlp's compiled CUDA kernels, which are not active here "
                "(fastmlp.backend('cuda') == 'fallback'; see fastmlp.backend_info())"
            )
        if int(batch_size) <= 0:
            raise ValueError(f"CUDAGraphStep: batch_size must be positive, got {batch_size}")
        self.kind = step_kind(optimizer, "CUDAGraphStep")
        _, _, group = validated(model, optimizer, self.kind)  # now rather than at the first step
        if self.kind == "adam" and not (group["capturable"] or group["fused"]):
            raise ValueError(
                "CUDAGraphStep needs an Adam/AdamW optimizer created with capturable=True: a captured graph "
                "cannot advance step counts kept on the CPU"
            )
        self.model, self.optimizer, self.batch_size = model, optimizer, int(batch_size)
        self._x = torch.zeros(self.batch_size, model.sizes[0], device=weight.device, dtype=weight.dtype)
        self._y = torch.zeros(self.batch_size, device=weight.device, dtype=torch.int64)
        self._lr = torch.ones(1, device=weight.device, dtype=weight.dtype)
        self._lr_value = None
        self._graph = None
        self._key = None
        self._loss = None
        self.captures = 0  # how many times the step was captured (for tests and the curious)

    def __call__(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[0] != self.batch_size:
            return self.model.train_step(x, target, self.optimizer)
        if x.shape[1] != self.model.sizes[0] or x.dtype != self._x.dtype or x.device != self._x.device:
            raise ValueError(
                f"CUDAGraphStep: x must be a {self._x.dtype} tensor of shape ({self.batch_size}, "
                f"{self.model.sizes[0]}) on {self._x.device}, got {x.dtype} {tuple(x.shape)} on {x.device}"
            )
        if target.shape != (self.batch_size,) or target.dtype != torch.int64 or target.device != self._y.device:
            raise ValueError(
                f"CUDAGraphStep: target must be an int64 tensor of shape ({self.batch_size},) on "
                f"{self._y.device}, got {target.dtype} {tuple(target.shape)} on {target.device}"
            )
        args = bind(self.model, self.optimizer, self.kind)
        key = args.graph_key()
        if key != self._key:
            self._capture(args)
            self._key = key
        if args.lr != self._lr_value:
            self._lr.fill_(args.lr)
            self._lr_value = args.lr
        self._x.copy_(x)
        self._y.copy_(target)
        self._graph.replay()
        return self._loss

    def _capture(self, args):
        self._graph = self._loss = None  # frees the previous graph's memory pool first
        graph = torch.cuda.CUDAGraph()
        # Capture records the launches without running them: nothing is updated here. The capture
        # stream must belong to the model's device, which need not be the current one.
        with torch.cuda.device(self._x.device), torch.cuda.graph(graph):
            loss = args.step(self._x, self._y, lr=1.0, lr_scale=self._lr)  # the learning rate: lr_scale
        self._graph, self._loss = graph, loss
        self.captures += 1
