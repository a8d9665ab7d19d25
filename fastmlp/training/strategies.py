"""How a Trainer takes its optimizer steps: one small object per strategy, chosen once per run
(choose_strategy), each running a whole epoch and returning its summed loss.

    ManyFusedSteps  the CPU, a FusedMLP, no dropout, one process: the many-step op (FusedMLP.train_steps)
                    once per gathered chunk of batches, each step at its scheduled learning rate, in
                    float32 or (--precision bf16) autocast's bfloat16 arithmetic
    GraphSteps      a GPU with fastmlp's CUDA kernels, same conditions, float32: the whole-step op
                    captured in a CUDA graph (CUDAGraphStep), replayed per batch
    FusedSteps      the whole-step op (FusedMLP.train_step) called per batch: elsewhere, same conditions
    AutogradSteps   forward, loss, backward and optimizer.step(): plain models, dropout, DDP, and
                    --precision bf16 on a GPU (the forward under torch.autocast, loss in float32)

Every strategy takes the same steps in the same order with the same learning rates; the fused ones
give autograd's result within float32 rounding, and ManyFusedSteps bit for bit FusedSteps'.
"""

import torch
import torch.nn.functional as F

from .. import _ops
from ..cuda_graph import CUDAGraphStep
from ..data import iterate_batches, iterate_chunks


class ManyFusedSteps:
    name = "fused steps, many per op"

    def epoch(self, trainer, order, bar, on_step) -> float:
        c, loss_sum = trainer.config, 0.0
        for x, y in iterate_chunks(trainer.splits["train"], c.batch_size, order):
            lrs = [trainer.lr_at(trainer.step + s) for s in range(-(-len(y) // c.batch_size))]
            losses = trainer.model.train_steps(x, y, trainer.optimizer, c.batch_size, lrs, c.precision).tolist()
            trainer.set_lr(lrs[-1])  # where the per-step strategies leave it
            for s, mean in enumerate(losses):
                summed = mean * min(c.batch_size, len(y) - s * c.batch_size)
                loss_sum += summed
                trainer.step += 1
                if on_step is not None:
                    on_step(trainer.step, torch.tensor(summed))
            if bar is not None:
                bar.update(len(losses))
        return loss_sum


class _PerBatch:
    """The epoch one step (one call) at a time; step() returns the batch's summed loss: a Python float
    on the CPU (a tensor op on a scalar right after a step costs more than the float), else a device
    tensor, so that no step waits for the device."""

    def epoch(self, trainer, order, bar, on_step):
        c, on_cpu = trainer.config, trainer.device.type == "cpu"
        loss_sum = 0.0 if on_cpu else torch.zeros((), dtype=torch.float64, device=trainer.device)
        for x, y in iterate_batches(trainer.splits["train"], c.batch_size, order):
            n_global = y.shape[0]
            if trainer.world > 1:  # this process's share of the global batch
                x = x.tensor_split(trainer.world)[trainer.rank]
                y = y.tensor_split(trainer.world)[trainer.rank]
            trainer.set_lr(trainer.lr_at(trainer.step))
            summed = self.step(trainer, x, y, n_global)
            loss_sum += summed if on_cpu else summed.double()
            trainer.step += 1
            if on_step is not None:
                on_step(trainer.step, torch.tensor(summed) if on_cpu else summed)
            if bar is not None:
                bar.update(1)
        return loss_sum


class FusedSteps(_PerBatch):
    name = "fused step"

    def fused_mean(self, trainer, x, y):
        return trainer.model.train_step(x, y, trainer.optimizer, trainer.config.precision)

    def step(self, trainer, x, y, n_global):
        mean = self.fused_mean(trainer, x, y)  # (a CUDA graph's output is overwritten by its next step)
        return mean.item() * n_global if trainer.device.type == "cpu" else mean * n_global


class GraphSteps(FusedSteps):
    name = "fused step in a CUDA graph"

    def __init__(self, model, optimizer, batch_size):
        self.graph = CUDAGraphStep(model, optimizer, batch_size)

    def fused_mean(self, trainer, x, y):
        return self.graph(x, y)


class AutogradSteps(_PerBatch):
    name = "autograd"

    def step(self, trainer, x, y, n_global):
        trainer.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(trainer.device.type, dtype=torch.bfloat16, enabled=trainer.config.precision == "bf16"):
            logits = trainer.net(x)
        loss = F.cross_entropy(logits.float(), y, reduction="sum")
        # Mean over the global batch: DDP averages the gradients of the `world` processes.
        (loss * (trainer.world / n_global)).backward()
        trainer.optimizer.step()
        return loss.item() if trainer.device.type == "cpu" else loss.detach()


def choose_strategy(model, config, device, world) -> type:
    """The strategy class for a run (see the module docstring). The whole step as one op applies to a
    FusedMLP without dropout in one process, in float32, or in bfloat16 on the CPU."""
    if not (hasattr(model, "train_step") and config.dropout == 0 and world == 1):
        return AutogradSteps
    if device.type == "cpu":
        return ManyFusedSteps
    if config.precision != "fp32":
        return AutogradSteps
    return GraphSteps if device.type == "cuda" and _ops.CUDA_KERNELS else FusedSteps
