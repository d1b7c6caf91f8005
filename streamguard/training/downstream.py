"""The benchmark's downstream models: the clip classifier and the per-frame Faster R-CNN.

For the benchmark only: PatchZero never retrains the model it protects.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from ..errors import ConfigError
from ..metrics import top1
from ..recipes import Recipe, recipe_to_dict
from .augment import augment_clips, mirror_clips
from .core import (
    InMemory,
    ProgressFn,
    Run,
    StepRNG,
    TrainResult,
    adamw,
    one_cycle_lr,
    pick_device,
    recipe_dataset,
    run_config,
    seed_for,
    start_run,
    step_indices,
    step_loader,
    train_loop,
    write_sidecar,
)
from .distributed import data_parallel, init_distributed


def synth_train_recipe(recipe: Recipe, videos: int | None) -> Recipe:
    if videos is None:
        return recipe
    if recipe.data.kind != "synthmotion":
        raise ConfigError(f"synth_train_videos needs data.kind = 'synthmotion', got {recipe.data.kind!r}")
    d = recipe.data
    data = dataclasses.replace(d, root=f"{d.root}-train{videos}", videos_per_class=videos, seed=d.seed + 1)
    return dataclasses.replace(recipe, data=data)


def train_classifier(
    recipe: Recipe,
    *,
    on_progress: ProgressFn | None = None,
    resume: bool = False,
    model_kwargs: dict[str, Any] | None = None,
    synth_train_videos: int | None = None,
    command: str = "",
    device: str | None = None,
) -> TrainResult:
    """Train ``recipe.model.name`` on ``recipe.data``'s train split; evaluate top-1 on its test split.

    ``synth_train_videos=N`` (SynthMotion only) trains instead on the train split of a larger tree,
    ``<data.root>-train<N>``, generated with ``N`` videos per class and seed ``data.seed + 1`` (its
    appearance draws never repeat the benchmark's): with 9 videos per class a 3D CNN memorizes
    appearance instead of learning motion.

    AdamW at ``train.lr`` on ``train.batch`` clips per step for ``train.steps`` steps, temporal and
    colour jitter (:func:`augment_clips`), and with ``train.classifier.symmetries`` mirrored or reversed
    clips with their labels swapped (:func:`mirror_clips`). tiny3d gets the data's clip length, size, mean and std,
    and with ``train.classifier.vortex`` its rotation-sense features (:class:`~streamguard.models.VortexPool`).
    Writes ``<train.output>/classifier.pt`` (``models.save_model``: loads with ``load_model``) and a
    ``.json`` sidecar; the resumable state is ``<train.output>/classifier-state.pt``.
    """
    from ..data import symmetry_labels
    from ..models import build_model, set_spec

    t, c = recipe.train, recipe.train.classifier
    ddp, dev = init_distributed(pick_device(device))
    d = recipe.data
    window = min(d.frames // d.stride, 2 * d.clip_len) if d.kind == "synthmotion" else d.clip_len
    train_ds = recipe_dataset(synth_train_recipe(recipe, synth_train_videos), "train", clip_len=window)
    test_ds = recipe_dataset(recipe, "test", subset=recipe.data.subset)
    if d.kind == "synthmotion":
        train_ds, test_ds = InMemory(train_ds), InMemory(test_ds)
    num_classes = recipe.model.num_classes or len(train_ds.classes)
    kw: dict[str, Any] = {}
    if recipe.model.name == "tiny3d":
        kw = {"clip_len": recipe.data.clip_len, "size": recipe.data.size, "mean": tuple(train_ds.mean)}
        if c.vortex:
            kw["vortex"] = tuple(c.vortex)
    kw.update(model_kwargs or {})
    with StepRNG(t.seed, dev, 3, 0):
        model = build_model(recipe.model.name, num_classes, **kw).to(dev)
    if len(train_ds.classes) == num_classes:
        set_spec(model, dataclasses.replace(model.spec, class_names=tuple(train_ds.classes)))
    mirror = {name: symmetry_labels(d.kind, name, train_ds.classes) for name in c.symmetries}
    optimizer = adamw(model, c.lr)
    config = run_config(
        recipe, model=recipe.model.name, synth_train_videos=synth_train_videos, symmetries=c.symmetries, vortex=c.vortex
    )
    run = Run(Path(t.output) / "classifier-state.pt", model, optimizer, config, main=ddp.main)
    start_run(run, resume)
    net = data_parallel(model, ddp, dev)
    rows, weight = ddp.rows(c.batch), ddp.weight(c.batch)
    batches = step_loader(train_ds, c.batch, t.seed, run.step, c.steps, "classifier", 0 if d.kind == "synthmotion" else d.workers)

    def step_fn(step: int) -> dict[str, float]:
        x, y = next(batches)
        gen = torch.Generator().manual_seed(seed_for(t.seed, "augment", step))
        x = augment_clips(x, d.clip_len, gen, shift=c.shift)
        if mirror:
            x, y = mirror_clips(x, y, mirror, gen)
        x, y = x[rows].to(dev), y[rows].to(dev)
        for group in optimizer.param_groups:
            group["lr"] = one_cycle_lr(step, c.steps, c.lr)
        model.train()
        logits = net(x)
        loss = F.cross_entropy(logits, y) * weight
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return {"loss": ddp.mean(loss.item()), "acc": ddp.mean((logits.argmax(1) == y).float().mean().item() * weight)}

    def eval_fn(step: int) -> dict[str, float]:
        return {"top1": top1(model, test_ds, recipe.pipeline.batch, dev)}

    progress = on_progress if ddp.main else None
    metrics = train_loop(run, c.steps, t.seed, dev, step_fn, eval_fn, t.eval_every, t.checkpoint_every, progress)
    return _save_downstream(recipe, run, model, metrics, "classifier", command)


def _save_downstream(
    recipe: Recipe, run: Run, model: nn.Module, metrics: dict[str, float], kind: str, command: str
) -> TrainResult:
    """``<train.output>/<kind with - for _>.pt`` (``models.save_model``) and its ``.json`` sidecar."""
    from ..models import save_model

    t = recipe.train
    path = Path(t.output) / f"{kind.replace('_', '-')}.pt"
    meta = {"command": command, "seed": t.seed, "steps": run.step, "metrics": metrics, "recipe": recipe_to_dict(recipe)}
    if not run.main:  # under torchrun rank 0 writes it
        return TrainResult(path, "", run.step, metrics, run.extra.get("history", []))
    sha = save_model(model.cpu().eval(), path, **meta)
    write_sidecar(path, sha, {"kind": kind, **meta})
    return TrainResult(path, sha, run.step, metrics, run.extra.get("history", []))


# ---------------------------------------------------------------- downstream per-frame detector

# A small-image Faster R-CNN: one object per SynthMotion frame needs far fewer proposals than COCO,
# and sampling fewer of them makes a CPU training step ~4x faster.
SMALL_FRAME_RCNN = {
    "rpn_pre_nms_top_n_train": 300, "rpn_post_nms_top_n_train": 100, "rpn_batch_size_per_image": 64,
    "box_batch_size_per_image": 64, "box_detections_per_img": 20,
}  # fmt: skip


class FrameTargets(Dataset):
    """Every frame of a :class:`~streamguard.data.BoxClips` set, decoded once and kept as uint8:
    ``ds[i] -> (frame (3, H, W) float in [0, 1], {"boxes", "labels"})``, frame ``i % T`` of clip ``i // T``."""

    def __init__(self, clips: Any) -> None:
        items = [clips[i] for i in range(len(clips))]
        self.frames = torch.stack([(c * 255).round().to(torch.uint8).transpose(0, 1) for c, _ in items]).flatten(0, 1)
        self.targets = [t for _, targets in items for t in targets]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[Tensor, dict[str, Tensor]]:
        return self.frames[i].float() / 255, self.targets[i]


@torch.no_grad()
def frame_ap(model: nn.Module, frames: FrameTargets, batch: int, device: torch.device) -> dict[str, float]:
    """COCO AP / AP50 / AP75 of a frame detector on every frame of ``frames``."""
    from ..metrics import detection_ap

    model.eval()
    preds = []
    for start in range(0, len(frames), batch):
        x = [frames[i][0].to(device) for i in range(start, min(start + batch, len(frames)))]
        preds += [{k: v.cpu() for k, v in p.items()} for p in model(x)]
    return detection_ap(preds, frames.targets)


def frame_detector_kwargs(recipe: Recipe) -> dict[str, Any]:
    """Builder arguments of the recipe's frame detector: frames resized to ``model.input_size``."""
    size = recipe.model.input_size or recipe.data.size
    return {"min_size": size, "max_size": size, **SMALL_FRAME_RCNN}


def train_frame_detector(
    recipe: Recipe,
    *,
    on_progress: ProgressFn | None = None,
    resume: bool = False,
    eval_frames: int = 192,
    command: str = "",
    device: str | None = None,
) -> TrainResult:
    """Train the recipe's Faster R-CNN from scratch on the object boxes of ``recipe.data``'s frames.

    AdamW at ``train.frame_detector.lr`` (warm-up then cosine) on ``train.frame_detector.batch``
    frames per step, drawn from the frames of every train clip (``data.clip_len`` centred frames per
    video), with colour jitter (boxes do not move). One "object" class when ``model.num_classes`` is
    2, else the classInd ids. Every ``train.frame_detector.eval_every`` steps (default
    ``train.eval_every``): AP / AP50 / AP75 on ``eval_frames``
    frames of the test split. Writes ``<train.output>/frame-detector.pt`` (loads with
    ``load_model``) and its ``.json`` sidecar.
    """
    from ..data import BoxClips
    from ..models import build_model, set_spec

    t, f = recipe.train, recipe.train.frame_detector
    ddp, dev = init_distributed(pick_device(device))
    num_classes = recipe.model.num_classes or 2
    train_set = FrameTargets(BoxClips(recipe_dataset(recipe, "train"), num_classes))
    test_clips = recipe_dataset(recipe, "test")
    n_eval = max(1, min(len(test_clips), eval_frames // test_clips.clip_len))
    test_set = FrameTargets(BoxClips(recipe_dataset(recipe, "test", subset=n_eval), num_classes))
    with StepRNG(t.seed, dev, 3, 2):
        model = build_model(recipe.model.name, num_classes, **frame_detector_kwargs(recipe)).to(dev)
    names = ("background", "object") if num_classes == 2 else ("background", *test_clips.classes)
    set_spec(model, dataclasses.replace(model.spec, class_names=names))
    optimizer = adamw(model, f.lr)
    config = run_config(recipe, model=recipe.model.name, frame_batch=f.batch, frame_lr=f.lr)
    run = Run(Path(t.output) / "frame-detector-state.pt", model, optimizer, config, main=ddp.main)
    start_run(run, resume)
    net = data_parallel(model, ddp, dev)
    rows, weight = ddp.rows(f.batch), ddp.weight(f.batch)

    def step_fn(step: int) -> dict[str, float]:
        items = [train_set[int(i)] for i in step_indices(len(train_set), f.batch, t.seed, step, "frames")]
        gen = torch.Generator().manual_seed(seed_for(t.seed, "augment", step))
        images = augment_clips(torch.stack([frame for frame, _ in items])[:, :, None], 1, gen)[:, :, 0][rows].to(dev)
        targets = [{k: v.to(dev) for k, v in target.items()} for _, target in items[rows]]
        for group in optimizer.param_groups:
            group["lr"] = one_cycle_lr(step, f.steps, f.lr)
        model.train()
        losses = net(list(images), targets)
        loss = sum(losses.values()) * weight
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return {"loss": ddp.mean(loss.item())}

    def eval_fn(step: int) -> dict[str, float]:
        return frame_ap(model, test_set, recipe.pipeline.batch * 4, dev)

    every = (f.eval_every or t.eval_every, f.checkpoint_every or t.checkpoint_every)
    metrics = train_loop(run, f.steps, t.seed, dev, step_fn, eval_fn, *every, on_progress if ddp.main else None)
    return _save_downstream(recipe, run, model, metrics, "frame_detector", command)
