"""Training under ``torchrun``: one process per device, each step's batch split across the ranks.

Every rank builds the whole step's batch (data order, augmentation and patch draws are pure
functions of ``(seed, step)``, see :mod:`.core`, and cost little next to a forward and backward
pass), keeps its contiguous share of the rows (:meth:`Dist.rows`) and runs the model on it.
``DistributedDataParallel`` averages the gradients, batch norm computes its statistics over the
whole batch (:func:`sync_batchnorm`) and dropout drops what it would in one process, so ``N`` ranks take the same steps as one process with the
recipe's batch, up to float rounding: ``--resume`` and the checkpoints are unchanged, and only rank 0
writes files or shows progress. The expensive per-row work beyond the model (stage 2's attacks)
is split the same way. Without ``torchrun`` (no ``WORLD_SIZE``) everything is a single process.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.nn.functional import all_reduce as differentiable_all_reduce

from ..errors import ConfigError


@dataclass(frozen=True)
class Dist:
    """This process's place in the job: ``rank`` of ``world`` (``Dist()`` is a single process)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        """Rank 0 writes checkpoints and reports progress."""
        return self.rank == 0

    def _bounds(self, n: int) -> list[int]:
        if n < self.world:
            raise ConfigError(f"a batch of {n} cannot be split across {self.world} ranks (torchrun --nproc_per_node)")
        return [n * r // self.world for r in range(self.world + 1)]

    def rows(self, n: int) -> slice:
        """This rank's contiguous rows of a batch of ``n`` (shares differ by at most one row)."""
        bounds = self._bounds(n)
        return slice(bounds[self.rank], bounds[self.rank + 1])

    def weight(self, n: int) -> float:
        """Scale of this rank's mean loss over its rows so that DDP's average over the ranks is the
        mean over the whole batch of ``n``: ``world x rows / n`` (1 in a single process)."""
        r = self.rows(n)
        return self.world * (r.stop - r.start) / n

    def mean(self, value: float) -> float:
        """The mean of a per-rank scalar over the ranks (for progress: rank 0 reports it)."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t.item()) / self.world

    def barrier(self) -> None:
        """Wait for every rank (a no-op in a single process)."""
        if self.world > 1:
            dist.barrier()

    def gather(self, t: Tensor, n: int) -> Tensor:
        """The whole batch of ``n`` rows, in order, from every rank's ``t`` (its :meth:`rows` of it)."""
        if self.world == 1:
            return t
        bounds = self._bounds(n)
        padded = t.new_zeros((bounds[1] + (n % self.world > 0), *t.shape[1:]))  # the largest share
        padded[: len(t)] = t
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded)
        return torch.cat([part[: bounds[r + 1] - bounds[r]] for r, part in enumerate(parts)])


def init_distributed(device: torch.device) -> tuple[Dist, torch.device]:
    """Join the ``torchrun`` job described by the environment, if any: ``(Dist, this rank's device)``.

    Back end: NCCL on CUDA (rank ``r`` uses ``cuda:LOCAL_RANK``), gloo on CPU.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(), device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size()), device


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm whose training statistics are those of the whole batch across the ranks, on any
    device (PyTorch's ``SyncBatchNorm`` runs on GPUs only). The all-reduce is differentiable, so the
    gradient is that of one process's batch norm over the whole batch."""

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input, got {x.dim()}D")

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return super().forward(x)
        dims = [d for d in range(x.dim()) if d != 1]
        count = torch.full((1,), x.numel() / x.shape[1], dtype=x.dtype, device=x.device)
        stats = differentiable_all_reduce(torch.cat([x.sum(dims), (x * x).sum(dims), count]))
        c, n = x.shape[1], stats[-1]
        mean = stats[:c] / n
        var = (stats[c : 2 * c] / n - mean**2).clamp(min=0)
        with torch.no_grad():
            self.num_batches_tracked += 1
            m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            self.running_mean.mul_(1 - m).add_(m * mean.detach())
            self.running_var.mul_(1 - m).add_(m * var.detach() * n / (n - 1))
        shape = [1, c] + [1] * (x.dim() - 2)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        return y * self.weight.view(shape) + self.bias.view(shape) if self.affine else y


class GlobalDropout(nn.Module):
    """Dropout (``feature``: whole channels, as ``Dropout2d``) whose mask is drawn for the whole batch
    across the ranks: every rank's torch RNG is seeded alike for the step, so each draws the
    mask one process would draw (same shape, same order) and keeps its own rows of it."""

    def __init__(self, p: float, feature: bool) -> None:
        super().__init__()
        self.p, self.feature = p, feature

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        sizes = [0] * dist.get_world_size()
        dist.all_gather_object(sizes, len(x))
        start = sum(sizes[: dist.get_rank()])
        shape = (sum(sizes), *(x.shape[1:2] + (1,) * (x.dim() - 2) if self.feature else x.shape[1:]))
        noise = torch.empty(shape, dtype=x.dtype, device=x.device).bernoulli_(1 - self.p).div_(1 - self.p)
        return x * noise[start : start + len(x)]


def _replace(module: nn.Module, convert: Callable[[nn.Module], nn.Module | None]) -> None:
    for name, child in module.named_children():
        new = convert(child)
        if new is None:
            _replace(child, convert)
        else:
            setattr(module, name, new)


def _global_batchnorm(child: nn.Module) -> nn.Module | None:
    if not isinstance(child, nn.modules.batchnorm._BatchNorm) or isinstance(child, GlobalBatchNorm):
        return None
    bn = GlobalBatchNorm(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
    if child.affine:
        bn.weight, bn.bias = child.weight, child.bias
    bn.running_mean, bn.running_var, bn.num_batches_tracked = child.running_mean, child.running_var, child.num_batches_tracked
    return bn.train(child.training)


def _global_dropout(child: nn.Module) -> nn.Module | None:
    if type(child) not in (nn.Dropout, nn.Dropout2d, nn.Dropout3d):
        return None
    return GlobalDropout(child.p, feature=type(child) is not nn.Dropout).train(child.training)


def sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Every batch norm of ``module`` computes whole-batch statistics across the ranks; in place
    (parameters and buffers are shared, so the state dict and its keys are unchanged)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    _replace(module, _global_batchnorm)
    return module


def data_parallel(model: nn.Module, d: Dist, device: torch.device) -> nn.Module:
    """``model`` for the training forward pass: itself in a single process, else wrapped in
    ``DistributedDataParallel`` with whole-batch batch norm and dropout masks. Keep using ``model`` itself for
    evaluation, saving and its state dict."""
    if d.world == 1:
        return model
    sync_batchnorm(model, device)
    _replace(model, _global_dropout)
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)
