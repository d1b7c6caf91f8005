"""Stage 1's cache of downstream-only (DO) masked PGD / AutoPGD patch attacks, on disk and resumable.

Keyed by the downstream weights' sha256 and the attack settings, so a retrained model never reuses
attacks made against an older one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from ..checkpoints import (
    atomic_save,
    atomic_write_text,
)
from ..errors import ConfigError, InputError
from ..recipes import Recipe
from .core import ProgressFn, StepRNG, keyed_rng, pick_device, recipe_dataset, seed_for
from .distributed import init_distributed

# ---------------------------------------------------------------- detector, stage 1: cached DO attacks


def load_downstream(recipe: Recipe, device: torch.device) -> nn.Module:
    """The frozen downstream model the attacks target."""
    from ..models import load_model

    model = load_model(recipe.model.weights or recipe.model.name, recipe.model.num_classes).to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def attack_methods(recipe: Recipe) -> list[str]:
    methods = [m for m in recipe.attack.methods if m in ("pgd", "apgd")]
    return methods or ["pgd", "apgd"]


def draw_masks(recipe: Recipe, shape: tuple[int, int, int], rngs: Sequence[np.random.Generator]) -> tuple[np.ndarray, list[float]]:
    """One patch mask per generator, area uniform in ``train.area_range``: ``(N, 1, T, H, W)``."""
    from ..attacks import patch_mask

    lo, hi = recipe.train.area_range
    areas = [float(r.uniform(lo, hi)) for r in rngs]
    masks = [patch_mask(shape, area=a, rng=r, moving=recipe.attack.moving) for a, r in zip(areas, rngs)]
    return np.stack(masks)[:, None].astype(np.float32), areas


def masked_attack(
    recipe: Recipe, model: nn.Module, method: str, mode: str, defense: nn.Module | None, seed: int,
    x: Tensor, y: Tensor, mask: np.ndarray, device: torch.device,
) -> Tensor:  # fmt: skip
    """Masked ``method`` in ``mode`` on ``(N, 3, T, H, W)`` clips -> adversarial clips (CPU tensor).

    ``y``: labels ``(N,)``, or for a frame detector N lists of T ``{"boxes", "labels"}`` targets
    (masked PGD only, :class:`~streamguard.attacks.MaskedFrameAttack`).
    """
    from ..attacks import MaskedAttack, MaskedFrameAttack

    if model.spec.task == "frame":
        if method != "pgd":
            raise ConfigError(f"a frame detector is attacked with masked PGD only, not {method!r}")
        attack = MaskedFrameAttack.from_section(model, recipe.attack, mode, defense=defense, seed=seed, device=str(device))
        return torch.from_numpy(attack.generate(x.cpu().numpy(), y, mask))
    attack = MaskedAttack.from_section(model, recipe.attack, method, mode, defense=defense, seed=seed, device=str(device))
    adv = attack.generate(x.cpu().numpy(), y.cpu().numpy(), mask)
    return torch.from_numpy(np.asarray(adv, dtype=np.float32))


def _model_identity(recipe: Recipe) -> str:
    """The downstream weights' sha256, so that a model retrained under the same path or name never
    reuses attacks made against its predecessor; the model's name when it has no weights."""
    from ..checkpoints import get_weights, sha256_file

    if not recipe.model.weights:
        return recipe.model.name
    weights = get_weights(recipe.model.weights)
    return weights.sha256 or sha256_file(weights.path)


def _cache_config(recipe: Recipe, n_videos: int) -> dict[str, Any]:
    a, t, d = recipe.attack, recipe.train, recipe.data
    return {
        "model": _model_identity(recipe), "data": [d.kind, d.root, d.fold, d.clip_len, d.size],
        "videos": n_videos, "per_video": t.attacked_per_video, "area_range": t.area_range, "methods": attack_methods(recipe),
        "eps": a.eps, "step": a.step, "iters": a.iters, "moving": a.moving, "seed": t.seed,
    }  # fmt: skip


def _entry_path(cache: Path, k: int) -> Path:
    return cache / f"{k:06d}.pt"


def build_attack_cache(
    recipe: Recipe,
    *,
    on_progress: ProgressFn | None = None,
    device: str | None = None,
) -> Path:
    """Attack every training clip ``train.attacked_per_video`` times and cache the results in ``train.cache``.

    Entry ``k`` (video ``k // attacked_per_video``) is ``<cache>/<k:06d>.pt`` holding uint8 ``clip``
    ``(3, T, H, W)``, uint8 ``mask`` ``(1, T, H, W)``, ``label``, ``method``, ``area`` and ``fooled``
    (the model misclassifies it). Methods alternate over ``k`` (masked PGD, masked AutoPGD), areas are
    uniform in ``train.area_range``, locations random and fixed over the clip; attacks target the
    downstream model only (DO). Entries are written atomically, so generation resumes by skipping
    the entries that exist; leftover temporary files of a killed run are removed.
    """
    ddp, dev = init_distributed(pick_device(device))
    ds = recipe_dataset(recipe, "train", subset=recipe.train.cache_videos)
    cache, per = Path(recipe.train.cache), recipe.train.attacked_per_video
    config = _cache_config(recipe, len(ds))
    if ddp.main:
        _check_cache_config(cache, config)
        for tmp in cache.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
    ddp.barrier()
    total, methods, batch = len(ds) * per, attack_methods(recipe), recipe.attack.batch
    todo = [k for k in range(total) if not _entry_path(cache, k).is_file()]
    ddp.barrier()  # every rank has the same list before any writes
    chunks = [todo[i : i + batch] for i in range(0, len(todo), batch)][ddp.rank :: ddp.world]  # under torchrun: a share each
    model = load_downstream(recipe, dev) if chunks else None
    done, fooled = total - len(todo), 0
    for chunk in chunks:
        for method_id, method in enumerate(methods):
            ks = [k for k in chunk if k % len(methods) == method_id]
            if ks:
                fooled += _cache_entries(recipe, model, ds, cache, ks, method, dev)
        done += len(chunk) * ddp.world
        if on_progress is not None and ddp.main:
            on_progress(min(done, total), total, {"fooled": fooled / max(1, (done - (total - len(todo))) // ddp.world)})
    ddp.barrier()  # the cache is complete before any rank trains on it
    return cache


def _check_cache_config(cache: Path, config: dict[str, Any]) -> None:
    path = cache / "cache.json"
    if path.is_file():
        old = json.loads(path.read_text())
        diff = [k for k in config if old.get(k) != json.loads(json.dumps(config[k]))]
        if diff:
            raise ConfigError(f"{cache}: attack cache was made with other settings ({', '.join(diff)}); use another train.cache")
        return
    atomic_write_text(path, json.dumps(config, indent=2))


def _cache_entries(
    recipe: Recipe, model: nn.Module, ds: Any, cache: Path, ks: list[int], method: str, device: torch.device
) -> int:
    """Attack and write entries ``ks`` (one method); returns how many fooled the model."""
    per, seed = recipe.train.attacked_per_video, recipe.train.seed
    clips = [ds[k // per] for k in ks]
    x = torch.stack([c for c, _ in clips])
    y = torch.tensor([int(label) for _, label in clips])
    mask, areas = draw_masks(recipe, tuple(x.shape[2:]), [keyed_rng(seed, "cache", k) for k in ks])
    with StepRNG(seed, device, 2, ks[0]):
        adv = masked_attack(recipe, model, method, "do", None, seed_for(seed, "cache", ks[0], 1), x, y, mask, device)
        with torch.no_grad():
            pred = model(adv.to(device)).argmax(1).cpu()
    for i, k in enumerate(ks):
        entry = {
            "clip": (adv[i] * 255).round().to(torch.uint8),
            "mask": torch.from_numpy(mask[i]).to(torch.uint8),
            "label": int(y[i]),
            "method": method,
            "area": areas[i],
            "fooled": bool(pred[i] != y[i]),
        }
        atomic_save(entry, _entry_path(cache, k))
    return int((pred != y).sum())


class AttackCache(Dataset):
    """The cached attacked clips: ``(clip (3, T, H, W) float [0, 1], mask (1, T, H, W) float 0/1)``."""

    def __init__(self, root: str | os.PathLike[str], expected: int | None = None) -> None:
        self.root = Path(root)
        self.paths = sorted(self.root.glob("[0-9]*.pt"))
        if not self.paths or (expected is not None and len(self.paths) < expected):
            raise InputError(
                f"attack cache {self.root} is incomplete ({len(self.paths)} of {expected} entries): "
                "run `streamguard train cache RECIPE` first"
            )

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        try:
            entry = torch.load(self.paths[i], map_location="cpu", weights_only=True)
        except Exception as err:
            reason = type(err).__name__
            raise InputError(f"attack cache entry {self.paths[i]} is unreadable ({reason}); delete it and rebuild") from None
        return entry["clip"].float() / 255, entry["mask"].float()
