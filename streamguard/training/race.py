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
* :func:`task_for`: what the attacker raises and how a clip counts as fooled, for either downstream
  kind: a clip classifier's cross-entropy (:class:`ClassifierTask`) or a per-frame detector's
  training loss for the true boxes (:class:`FrameDetectorTask`), as the paper trains one PatchZero
  per task.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

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


FOUND_SCORE = 0.5  # a frame detector's box counts from this score, as the pipeline's min_score
FOUND_IOU = 0.5


class ClassifierTask:
    """A clip classifier's side of the race: targets are labels ``(N,)``; the attack raises the
    cross-entropy; a clip is fooled when its top-1 is wrong; the score is top-1 accuracy."""

    metric = "acc"

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def loss(self, x: Tensor, y: Tensor) -> Tensor:
        """(N,) cross-entropy of clips ``x`` (N, 3, T, H, W) as the model sees them."""
        return F.cross_entropy(self.model(x), y, reduction="none")

    @torch.no_grad()
    def fooled(self, x: Tensor, y: Tensor) -> Tensor:
        return self.model(x).argmax(1) != y

    def score(self, x: Tensor, y: Tensor) -> float:
        return 1.0 - self.fooled(x, y).float().mean().item()

    @staticmethod
    def targets(items: list[tuple[Tensor, Any]], device: torch.device) -> Tensor:
        return torch.tensor([int(label) for _, label in items], device=device)


class FrameDetectorTask:
    """A per-frame detector's side (torchvision Faster R-CNN): targets are, per clip, T dicts
    ``{"boxes": (K, 4) xyxy, "labels": (K,)}``; the attack raises the detector's training loss for
    the true boxes (RPN and box heads, each clip's T frames one batch, as ART's detector attack
    does); a clip is fooled when under half of its true boxes are found (IoU 0.5, score 0.5); the
    score is box AP50 over every frame."""

    metric = "ap50"

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def loss(self, x: Tensor, targets: list[list[dict[str, Tensor]]]) -> Tensor:
        with _loss_mode(self.model):
            return torch.stack([sum(self.model(list(c.transpose(0, 1)), list(t)).values()) for c, t in zip(x, targets)])

    @torch.no_grad()
    def predict(self, x: Tensor) -> list[list[dict[str, Tensor]]]:
        return [self.model(list(c.transpose(0, 1))) for c in x]

    def fooled(self, x: Tensor, targets: list[list[dict[str, Tensor]]]) -> Tensor:
        from torchvision.ops import box_iou

        fooled = []
        for preds, truth in zip(self.predict(x), targets):
            found = total = 0
            for p, t in zip(preds, truth):
                boxes = p["boxes"][p["scores"] >= FOUND_SCORE]
                total += len(t["boxes"])
                if len(t["boxes"]) and len(boxes):
                    found += int((box_iou(t["boxes"].to(boxes), boxes).max(1).values >= FOUND_IOU).sum())
            fooled.append(found < 0.5 * total)
        return torch.tensor(fooled, device=x.device)

    def score(self, x: Tensor, targets: list[list[dict[str, Tensor]]]) -> float:
        from ..metrics import detection_ap

        preds = [{k: v.cpu() for k, v in p.items()} for clip in self.predict(x) for p in clip]
        return detection_ap(preds, [t for clip in targets for t in clip])["ap50"]

    @staticmethod
    def targets(items: list[tuple[Tensor, Any]], device: torch.device) -> list[list[dict[str, Tensor]]]:
        return [[{k: v.to(device) for k, v in t.items()} for t in frames] for _, frames in items]


Task = ClassifierTask | FrameDetectorTask


def task_for(model: nn.Module) -> Task:
    """The race's task for ``model``: by its ``spec.task`` ("frame": a per-frame detector)."""
    spec = getattr(model, "spec", None)
    return FrameDetectorTask(model) if getattr(spec, "task", "clip") == "frame" else ClassifierTask(model)


@contextmanager
def _loss_mode(model: nn.Module) -> Iterator[None]:
    """torchvision detectors give their losses only in training mode; keep batch-norm statistics
    and dropout as in evaluation, so the frozen model does not change while it is attacked."""
    was = model.training
    model.train()
    for m in model.modules():
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.Dropout)):
            m.eval()
    try:
        yield
    finally:
        model.train(was)


def _objective(task: Task, defense: nn.Module | None, x: Tensor, y: Any, mask: Tensor, z: Tensor) -> Tensor:
    adv = x * (1 - mask) + mask * z
    return task.loss(defense(adv) if defense is not None else adv, y)


def patch_attack(
    model: nn.Module,
    defense: nn.Module | None,
    x: Tensor,
    y: Any,
    mask: Tensor,
    z: Tensor,
    iters: int,
    step: float | Tensor = 0.2,
    method: str = "pgd",
    state: AttackState | None = None,
    steps: Tensor | None = None,
) -> tuple[Tensor, Tensor, AttackState | None]:
    """Continue an untargeted masked attack on clips ``x`` (N, 3, T, H, W) with targets ``y`` (labels
    (N,), or a frame detector's boxes: :func:`task_for`), masks (N, 1, T, H, W), from content ``z``
    for ``iters`` iterations: ``(z, loss (N,), state)``.

    ``pgd``: ``z <- clip(z + step * sign(grad), 0, 1)``, the paper's masked PGD (``step`` a float, or
    one per clip (N,)). ``apgd``: AutoPGD's
    update with momentum and a per-clip step (starting at ``2 * step``) halved at checkpoints every
    :data:`CHECKPOINT` iterations where fewer than 3/4 of the steps since raised the loss; it returns
    the best content found. Given the returned ``state`` it goes on from its last iterate (``z`` is
    ignored): continuing is the same as one longer attack. ``steps`` (N,) starts a fresh ``apgd`` at
    these per-clip steps instead (a pool patch's kept step; against a detector that changes between
    draws nearly every draw stalls, so such a pool freezes: docs/results.md, a race against AutoPGD).
    The model and the defense are not changed (their parameters get no gradient).
    """
    frozen = [p for m in (model, defense) if m is not None for p in m.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    task = task_for(model)
    try:
        if method == "pgd":
            return (*_pgd(task, defense, x, y, mask, z, iters, step), None)
        if method == "apgd":
            return _apgd(task, defense, x, y, mask, z, iters, step, state, steps)
        raise ValueError(f"unknown attack method {method!r} (pgd, apgd)")
    finally:
        for p in frozen:
            p.requires_grad_(True)


def _grad(task: Task, defense: nn.Module | None, x: Tensor, y: Any, mask: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
    z = z.detach().requires_grad_(True)
    loss = _objective(task, defense, x, y, mask, z)
    (grad,) = torch.autograd.grad(loss.sum(), z)
    return loss.detach(), grad * mask


def _pgd(
    task: Task, defense: nn.Module | None, x: Tensor, y: Any, mask: Tensor, z: Tensor, iters: int, step: float | Tensor
) -> tuple[Tensor, Tensor]:
    z = z.detach()
    eta = torch.as_tensor(step, dtype=z.dtype, device=z.device).reshape(-1, *(1,) * (z.dim() - 1))
    for _ in range(iters):
        _, grad = _grad(task, defense, x, y, mask, z)
        z = (z + eta * grad.sign()).clamp(0, 1)
    with torch.no_grad():
        loss = _objective(task, defense, x, y, mask, z)
    return z, loss


def _apgd(
    task: Task, defense: nn.Module | None, x: Tensor, y: Any, mask: Tensor, z: Tensor, iters: int, step: float,
    state: AttackState | None, steps: Tensor | None = None,
) -> tuple[Tensor, Tensor, AttackState]:
    z = z.detach()
    n = len(x)
    if state is None:
        with torch.no_grad():
            loss = _objective(task, defense, x, y, mask, z)
        start = torch.full((n,), 2 * step) if steps is None else steps.to(loss.device, torch.float32)
        state = AttackState(start, loss, z.clone(), z.clone(), z)
        state.checkpoint_loss, state.improved = loss.clone(), torch.zeros(n)
    z = state.current
    every = CHECKPOINT
    shape = (n,) + (1,) * (z.dim() - 1)
    for _ in range(iters):
        loss, grad = _grad(task, defense, x, y, mask, z)
        eta = state.step.view(shape)
        candidate = (z + eta * grad.sign()).clamp(0, 1)
        moved = (z + 0.75 * (candidate - z) + 0.25 * (z - state.previous)).clamp(0, 1)
        state.previous = z
        z = moved
        with torch.no_grad():
            new_loss = _objective(task, defense, x, y, mask, z)
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
    step: float = 0.0  # apgd: the step its attack has decayed to (0: not attacked yet)


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
            "step": torch.tensor([e.step for e in self.entries], dtype=torch.float64),
        }

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        steps = state.get("step", torch.zeros(len(state["video"])))  # races saved before the step was kept
        self.entries = [
            PoolEntry(int(v), m.float(), c.clone(), int(i), int(d), bool(f), float(s))
            for v, m, c, i, d, f, s in zip(
                state["video"], state["mask"], state["content"], state["iters"], state["draws"], state["fooled"], steps
            )
        ]
