"""PatchZero's two training stages.

* :func:`train_detector_stage1`: cached DO attacks (:mod:`.attack_cache`) mixed 1:1 with benign clips.
* :func:`train_detector_stage2`: BPDA adaptive attacks generated online against the detector being
  trained, until the attacker-defender race converges.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..metrics import pixel_scores
from ..recipes import Recipe, recipe_to_dict
from .attack_cache import (
    AttackCache,
    attack_methods,
    draw_masks,
    load_downstream,
    masked_attack,
)
from .augment import clip_frames
from .core import (
    ProgressFn,
    Run,
    StepRNG,
    TrainResult,
    keyed_rng,
    pick_device,
    recipe_dataset,
    run_config,
    seed_for,
    start_run,
    step_loader,
    train_loop,
    write_sidecar,
)


def _detector(recipe: Recipe, detector_kwargs: dict[str, Any] | None) -> nn.Module:
    from ..detector import PSPNet

    return PSPNet(recipe.defense.backbone, aux=True, **{"width": recipe.defense.width, **(detector_kwargs or {})})


def _patchzero(recipe: Recipe, detector: nn.Module, mean: Sequence[float], bpda: bool = False) -> nn.Module:
    """The recipe's PatchZero around ``detector``, working at the scale it is trained at (``data.size``)."""
    from ..patchzero import build_defense

    size = recipe.defense.input_size or recipe.data.size
    return build_defense(recipe.defense, detector=detector, mean=mean, bpda=bpda, input_size=size)


def _detector_step(
    detector: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, mask: Tensor, aux_weight: float
) -> dict[str, float]:
    """One Adam step of the detector on the frames of clips ``x`` ``(B, 3, T, H, W)`` / masks ``(B, 1, T, H, W)``."""
    from ..detector import detector_loss

    frames, target = clip_frames(x), clip_frames(mask)
    detector.train()
    outputs = detector(frames)
    loss = detector_loss(outputs, target, aux_weight)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    logits = outputs[0] if isinstance(outputs, (tuple, list)) else outputs
    return {"loss": loss.item(), **pixel_scores(logits.detach(), target)}


def _save_detector(
    recipe: Recipe, detector: nn.Module, mean: Sequence[float], path: Path, meta: dict[str, Any]
) -> str:
    from ..patchzero import save_defense

    defense = _patchzero(recipe, detector.cpu().eval(), mean)
    sha = save_defense(defense, path, **meta)
    write_sidecar(path, sha, {"kind": "detector", **meta})
    return sha


def train_detector_stage1(
    recipe: Recipe,
    *,
    on_progress: ProgressFn | None = None,
    resume: bool = False,
    detector_kwargs: dict[str, Any] | None = None,
    command: str = "",
    device: str | None = None,
) -> TrainResult:
    """Stage 1: the PSPNet learns DO patches from the attack cache, mixed 1:1 with benign clips.

    Each step takes ``train.batch`` clips (half benign with an all-zero mask, half from the cache),
    splits them into frames and takes one Adam step (``train.lr``) on ``detector_loss`` (main +
    ``train.aux_weight`` x aux). Writes ``<train.output>/detector-stage1.pt`` (``save_defense``).
    """
    t, dev = recipe.train, pick_device(device)
    benign_ds = recipe_dataset(recipe, "train")
    cached_videos = len(benign_ds) if t.cache_videos is None else len(recipe_dataset(recipe, "train", subset=t.cache_videos))
    attacked_ds = AttackCache(t.cache, cached_videos * t.attacked_per_video)
    mean = load_downstream(recipe, torch.device("cpu")).spec.mean
    with StepRNG(t.seed, dev, 3, 1):
        detector = _detector(recipe, detector_kwargs).to(dev)
    optimizer = torch.optim.Adam(detector.parameters(), lr=t.lr)
    config = run_config(recipe, stage=1, backbone=recipe.defense.backbone)
    run = Run(Path(t.output) / "detector-stage1-state.pt", detector, optimizer, config)
    start_run(run, resume)
    n_adv = t.batch // 2
    workers = recipe.data.workers
    benign = step_loader(benign_ds, t.batch - n_adv, t.seed, run.step, t.steps, "benign", workers)
    attacked = step_loader(attacked_ds, n_adv, t.seed, run.step, t.steps, "attacked", workers)

    def step_fn(step: int) -> dict[str, float]:
        xb, _ = next(benign)
        xa, ma = next(attacked)
        x = torch.cat([xb, xa]).to(dev)
        mask = torch.cat([torch.zeros_like(xb[:, :1]), ma]).to(dev)
        return _detector_step(detector, optimizer, x, mask, t.aux_weight)

    metrics = train_loop(run, t.steps, t.seed, dev, step_fn, None, t.eval_every, t.checkpoint_every, on_progress)
    path = Path(t.output) / "detector-stage1.pt"
    meta = {"command": command, "seed": t.seed, "stage": 1, "steps": run.step, "metrics": metrics, "recipe": recipe_to_dict(recipe)}
    sha = _save_detector(recipe, detector, mean, path, meta)
    return TrainResult(path, sha, run.step, metrics)


# ---------------------------------------------------------------- detector, stage 2: online BPDA


def robust_accuracy(
    recipe: Recipe, model: nn.Module, defense: nn.Module, ds: Any, seed: int, device: torch.device
) -> dict[str, float]:
    """Top-1 of ``model`` behind ``defense`` on clean clips and under a masked BPDA PGD attack.

    Masks and attack seeds depend only on ``seed`` and the clip index, so successive evaluations
    see the same attack problem and differ only by the detector's weights.
    """
    clips = [ds[i] for i in range(len(ds))]
    x = torch.stack([c for c, _ in clips])
    y = torch.tensor([int(label) for _, label in clips])
    mask, _ = draw_masks(recipe, tuple(x.shape[2:]), [keyed_rng(seed, "eval", i) for i in range(len(ds))])
    defense.eval()
    adv = masked_attack(recipe, model, "pgd", "bpda", defense, seed_for(seed, "eval", len(ds)), x, y, mask, device)
    with torch.no_grad():
        clean = (model(defense(x.to(device))).argmax(1).cpu() == y).float().mean().item()
        robust = (model(defense(adv.to(device))).argmax(1).cpu() == y).float().mean().item()
    return {"clean_acc": clean, "robust_acc": robust}


def robust_ap50(
    recipe: Recipe, model: nn.Module, defense: nn.Module, ds: Any, seed: int, device: torch.device
) -> dict[str, float]:
    """:func:`robust_accuracy` for a frame detector: box AP50 over every frame of ``ds``'s clips
    (``BoxClips``) behind ``defense``, clean and under masked BPDA PGD."""
    from ..metrics import detection_ap

    x, clip_targets = ds.collate([ds[i] for i in range(len(ds))])
    targets = [t for frames in clip_targets for t in frames]
    mask, _ = draw_masks(recipe, tuple(x.shape[2:]), [keyed_rng(seed, "eval", i) for i in range(len(ds))])
    defense.eval()
    adv = masked_attack(recipe, model, "pgd", "bpda", defense, seed_for(seed, "eval", len(ds)), x, clip_targets, mask, device)

    @torch.no_grad()
    def ap50(clips: Tensor) -> float:
        preds = [p for clip in clips for p in model(list(defense(clip[None].to(device))[0].transpose(0, 1)))]
        return detection_ap([{k: v.cpu() for k, v in p.items()} for p in preds], targets)["ap50"]

    return {"clean_ap50": ap50(x), "robust_ap50": ap50(adv)}


def _task_clips(recipe: Recipe, model: nn.Module, split: str, subset: int | None = None) -> Any:
    """The recipe's clips for ``model``: ``(clip, label)``, or for a frame detector ``(clip, targets)``."""
    from ..data import BoxClips

    clips = recipe_dataset(recipe, split, subset=subset)
    return BoxClips(clips, model.spec.num_classes) if model.spec.task == "frame" else clips


def _converged(patience: int) -> Callable[[dict[str, Any]], bool]:
    """Stop once robust accuracy has not risen above its best for ``patience`` evaluations in a row:
    the adaptive attack and the detector have reached a stalemate."""

    def stop(extra: dict[str, Any]) -> bool:
        return extra.get("stale", 0) >= patience

    return stop


def train_detector_stage2(
    recipe: Recipe,
    init: str | os.PathLike[str],
    *,
    on_progress: ProgressFn | None = None,
    resume: bool = False,
    eval_videos: int | None = None,
    command: str = "",
    device: str | None = None,
) -> TrainResult:
    """Stage 2: fine-tune the stage-1 detector on BPDA attacks made online against itself.

    Each step draws ``train.batch`` training clips; half get a fresh patch (area uniform in
    ``train.area_range``) attacked by masked PGD / AutoPGD (alternating by step) in BPDA mode through
    ``PatchZero(current detector)`` and the frozen downstream model; the detector then takes one Adam
    step on all of them. Every ``train.eval_every`` steps the robust score under BPDA PGD is measured
    on ``eval_videos`` (default ``train.eval_videos``) test clips; training stops after
    ``train.patience`` evaluations without a new best, or at ``train.steps``. Writes
    ``<train.output>/detector-stage2.pt``.

    The downstream model is the recipe's clip classifier (robust score: top-1, :func:`robust_accuracy`)
    or per-frame detector (masked PGD on its loss for the true boxes; robust score: box AP50,
    :func:`robust_ap50`), as the paper trains one PatchZero per task.
    """
    from ..patchzero import load_defense

    t, dev = recipe.train, pick_device(device)
    model = load_downstream(recipe, dev)
    train_ds = _task_clips(recipe, model, "train")
    n_test = len(recipe_dataset(recipe, "test"))
    eval_videos = eval_videos or recipe.train.eval_videos
    eval_ds = _task_clips(recipe, model, "test", subset=min(eval_videos, recipe.data.subset or eval_videos, n_test))
    robust, score = (robust_ap50, "robust_ap50") if model.spec.task == "frame" else (robust_accuracy, "robust_acc")
    start = load_defense(str(init))
    detector = start.detector.to(dev)
    for p in detector.parameters():
        p.requires_grad_(True)
    mean = model.spec.mean
    bpda = _patchzero(recipe, detector, mean, bpda=True).to(dev)
    optimizer = torch.optim.Adam(detector.parameters(), lr=t.lr)
    config = run_config(recipe, stage=2, backbone=recipe.defense.backbone, init=str(init))
    run = Run(Path(t.output) / "detector-stage2-state.pt", detector, optimizer, config)
    start_run(run, resume)
    batches = step_loader(train_ds, t.batch, t.seed, run.step, t.steps, "stage2", recipe.data.workers)
    methods, n_adv = attack_methods(recipe), max(1, t.batch // 2)

    def step_fn(step: int) -> dict[str, float]:
        x, y = next(batches)
        rngs = [keyed_rng(t.seed, "stage2", step, i) for i in range(n_adv)]
        mask, _ = draw_masks(recipe, tuple(x.shape[2:]), rngs)
        detector.eval()
        method = methods[step % len(methods)]
        adv = masked_attack(recipe, model, method, "bpda", bpda, seed_for(t.seed, "stage2", step), x[:n_adv], y[:n_adv], mask, dev)
        clips = torch.cat([adv, x[n_adv:]]).to(dev)
        masks = torch.cat([torch.from_numpy(mask), torch.zeros_like(x[n_adv:, :1])]).to(dev)
        return _detector_step(detector, optimizer, clips, masks, t.aux_weight)

    def eval_fn(step: int) -> dict[str, float]:
        scores = robust(recipe, model, bpda, eval_ds, t.seed, dev)
        best = run.extra.get("best", -1.0)
        run.extra["stale"] = 0 if scores[score] > best else run.extra.get("stale", 0) + 1
        run.extra["best"] = max(best, scores[score])
        return scores

    metrics = train_loop(
        run, t.steps, t.seed, dev, step_fn, eval_fn, t.eval_every, t.checkpoint_every, on_progress, _converged(t.patience)
    )
    stopped = run.step < t.steps
    path = Path(t.output) / "detector-stage2.pt"
    meta = {
        "command": command, "seed": t.seed, "stage": 2, "steps": run.step, "init": str(init), "metrics": metrics,
        "stopped_early": stopped, "recipe": recipe_to_dict(recipe),
    }  # fmt: skip
    sha = _save_detector(recipe, detector, mean, path, meta)
    return TrainResult(path, sha, run.step, metrics, run.extra.get("history", []), stopped)
