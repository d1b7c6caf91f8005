"""Stage 2's attacker-defender race, cheap enough to run for thousands of steps on a CPU.

* :func:`patch_attack`: masked PGD on the patch content ``z`` (``x' = x*(1-m) + m*z``, ``z`` in
  [0, 1], so eps 1.0 means "anything inside the patch"), batched in plain PyTorch through the
  defense (PatchZero in BPDA mode: the exact hard mask forward, its soft version backward) and the
  frozen model, without ART's numpy round trips. ``method="apgd"`` adds AutoPGD's step control
  (momentum 0.75, per-clip step halving at checkpoints when the loss stalls). ART stays the judge in
  evaluation; ``tests/test_race.py`` checks the two agree.
* :class:`PatchPool`: warm-started adversaries, as in accumulated-perturbation adversarial training
  (ATTA). Each entry is one training clip's patch (content, place, size) that continues its attack
  for a few iterations whenever it is drawn again, against the current detector, so a patch drawn
  ``k`` times has ``k x iters`` iterations behind it; part of the pool is refreshed with new places
  every step to keep it diverse.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

CHECKPOINT = 5  # AutoPGD: iterations between step-size checks (fixed, so continued attacks are exact)


@dataclass
class AttackState:
    """AutoPGD's per-clip state, kept between calls so a continued attack is one long attack."""

    step: Tensor  # (N,) step size
    best_loss: Tensor  # (N,) best loss so far
    best_z: Tensor  # (N, 3, T, H, W) content reaching it
    previous: Tensor  # (N, 3, T, H, W) the iterate before the last (momentum)
    current: Tensor  # (N, 3, T, H, W) the last iterate, where a continued attack goes on from
    done: int = 0  # iterations done
    checkpoint_loss: Tensor | None = None  # best loss at the last checkpoint
    improved: Tensor | None = None  # (N,) iterations since the last checkpoint that raised the loss


def _objective(model: nn.Module, defense: nn.Module | None, x: Tensor, y: Tensor, mask: Tensor, z: Tensor) -> Tensor:
    adv = x * (1 - mask) + mask * z
    logits = model(defense(adv) if defense is not None else adv)
    return F.cross_entropy(logits, y, reduction="none")


def patch_attack(
    model: nn.Module,
    defense: nn.Module | None,
    x: Tensor,
    y: Tensor,
    mask: Tensor,
    z: Tensor,
    iters: int,
    step: float = 0.2,
    method: str = "pgd",
    state: AttackState | None = None,
) -> tuple[Tensor, Tensor, AttackState | None]:
    """Continue an untargeted masked attack on clips ``x`` (N, 3, T, H, W), labels ``y`` (N,), masks
    (N, 1, T, H, W), from content ``z`` for ``iters`` iterations: ``(z, loss (N,), state)``.

    ``pgd``: ``z <- clip(z + step * sign(grad), 0, 1)``, the paper's masked PGD. ``apgd``: AutoPGD's
    update with momentum and a per-clip step (starting at ``2 * step``) halved at checkpoints every
    :data:`CHECKPOINT` iterations where fewer than 3/4 of the steps since raised the loss; it returns
    the best content found. Given the returned ``state`` it goes on from its last iterate (``z`` is
    ignored): continuing is the same as one longer attack. The model and the defense are not changed (their parameters get
    no gradient).
    """
    frozen = [p for m in (model, defense) if m is not None for p in m.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        if method == "pgd":
            return (*_pgd(model, defense, x, y, mask, z, iters, step), None)
        if method == "apgd":
            return _apgd(model, defense, x, y, mask, z, iters, step, state)
        raise ValueError(f"unknown attack method {method!r} (pgd, apgd)")
    finally:
        for p in frozen:
            p.requires_grad_(True)


def _grad(model: nn.Module, defense: nn.Module | None, x: Tensor, y: Tensor, mask: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
    z = z.detach().requires_grad_(True)
    loss = _objective(model, defense, x, y, mask, z)
    (grad,) = torch.autograd.grad(loss.sum(), z)
    return loss.detach(), grad * mask


def _pgd(model: nn.Module, defense: nn.Module | None, x: Tensor, y: Tensor, mask: Tensor, z: Tensor, iters: int, step: float) -> tuple[Tensor, Tensor]:
    z = z.detach()
    for _ in range(iters):
        _, grad = _grad(model, defense, x, y, mask, z)
        z = (z + step * grad.sign()).clamp(0, 1)
    with torch.no_grad():
        loss = _objective(model, defense, x, y, mask, z)
    return z, loss


def _apgd(
    model: nn.Module, defense: nn.Module | None, x: Tensor, y: Tensor, mask: Tensor, z: Tensor, iters: int, step: float,
    state: AttackState | None,
) -> tuple[Tensor, Tensor, AttackState]:
    z = z.detach()
    n = len(x)
    if state is None:
        with torch.no_grad():
            loss = _objective(model, defense, x, y, mask, z)
        state = AttackState(torch.full((n,), 2 * step), loss, z.clone(), z.clone(), z)
        state.checkpoint_loss, state.improved = loss.clone(), torch.zeros(n)
    z = state.current
    every = CHECKPOINT
    shape = (n,) + (1,) * (z.dim() - 1)
    for _ in range(iters):
        loss, grad = _grad(model, defense, x, y, mask, z)
        eta = state.step.view(shape)
        candidate = (z + eta * grad.sign()).clamp(0, 1)
        moved = (z + 0.75 * (candidate - z) + 0.25 * (z - state.previous)).clamp(0, 1)
        state.previous = z
        z = moved
        with torch.no_grad():
            new_loss = _objective(model, defense, x, y, mask, z)
        better = new_loss > state.best_loss
        state.improved = state.improved + better.float()
        state.best_z = torch.where(better.view(shape), z, state.best_z)
        state.best_loss = torch.where(better, new_loss, state.best_loss)
        state.done += 1
        if state.done % every == 0:
            stalled = (state.improved < 0.75 * every) | (state.best_loss <= state.checkpoint_loss)
            state.step = torch.where(stalled, state.step / 2, state.step)
            z = torch.where(stalled.view(shape), state.best_z, z)  # restart a stalled clip from its best
            state.checkpoint_loss, state.improved = state.best_loss.clone(), torch.zeros(n)
    state.current = z
    return state.best_z, state.best_loss, state


@dataclass
class PoolEntry:
    """One warm-started adversary: a training clip's index, its patch mask and content, its history."""

    video: int
    mask: Tensor  # (1, T, H, W) float 0/1
    content: Tensor  # (3, T, H, W) float [0, 1]
    iters: int = 0
    draws: int = 0
    fooled: bool = False


class PatchPool:
    """Warm-started BPDA patches (ATTA): draw, continue each attack a few iterations, store back.

    ``make(video, rng)`` builds a fresh entry (a new place, size and random content) for a training
    clip. Draws are uniform over the pool; :meth:`refresh` replaces entries with fresh ones.
    """

    def __init__(self, entries: list[PoolEntry], make: Callable[[int, np.random.Generator], PoolEntry], n_videos: int) -> None:
        self.entries, self.make, self.n_videos = entries, make, n_videos

    @classmethod
    def fresh(cls, size: int, make: Callable[[int, np.random.Generator], PoolEntry], n_videos: int, rng: np.random.Generator) -> PatchPool:
        videos = rng.choice(n_videos, size=size, replace=size > n_videos)
        return cls([make(int(v), rng) for v in videos], make, n_videos)

    def draw(self, k: int, rng: np.random.Generator) -> list[int]:
        return [int(i) for i in rng.choice(len(self.entries), size=k, replace=False)]

    def refresh(self, k: int, rng: np.random.Generator) -> None:
        for i in self.draw(k, rng):
            self.entries[i] = self.make(int(rng.integers(self.n_videos)), rng)

    def success(self) -> float:
        """Fraction of drawn-at-least-once entries whose last update fooled the defended model."""
        drawn = [e for e in self.entries if e.draws]
        return sum(e.fooled for e in drawn) / len(drawn) if drawn else 0.0

    def state_dict(self) -> dict[str, Tensor]:
        return {
            "video": torch.tensor([e.video for e in self.entries]),
            "mask": torch.stack([e.mask for e in self.entries]).to(torch.uint8),
            "content": torch.stack([e.content for e in self.entries]),  # float: a resumed race is exact
            "iters": torch.tensor([e.iters for e in self.entries]),
            "draws": torch.tensor([e.draws for e in self.entries]),
            "fooled": torch.tensor([e.fooled for e in self.entries]),
        }

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.entries = [
            PoolEntry(int(v), m.float(), c.clone(), int(i), int(d), bool(f))
            for v, m, c, i, d, f in zip(state["video"], state["mask"], state["content"], state["iters"], state["draws"], state["fooled"])
        ]
