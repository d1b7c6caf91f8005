"""Training: the benchmark's downstream classifier, and the PatchZero detector's two stages.

* :func:`train_classifier` trains the downstream clip classifier (``tiny3d`` on SynthMotion) and
  :func:`train_frame_detector` the per-frame object detector (Faster R-CNN on SynthMotion's boxes) –
  for the benchmark only: PatchZero never retrains the model it protects.
* :func:`build_attack_cache` + :func:`train_detector_stage1`: masked PGD / AutoPGD patches made
  against the downstream model alone (DO), cached on disk, mixed 1:1 with benign clips.
* :func:`train_detector_stage2`: BPDA adaptive attacks generated online against the detector being
  trained, until the attacker-defender race converges.

Every run is resumable and exact. All randomness of step ``s`` (data order, augmentation, patch
masks, attack seeds, dropout) is a pure function of ``(train.seed, s)``, so a run killed after ``K``
steps and resumed from its checkpoint reaches bit-identical weights to an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from .checkpoints import atomic_save, atomic_write_text, load_checkpoint, save_checkpoint
from .errors import CheckpointError, ConfigError, InputError
from .recipes import Recipe, recipe_to_dict

ProgressFn = Callable[[int, int, dict[str, float]], None]

_SALT = {
    "classifier": 1, "benign": 2, "attacked": 3, "augment": 4, "cache": 5, "stage2": 6, "eval": 7, "torch": 8, "frames": 9,
}  # fmt: skip


@dataclass
class TrainResult:
    """What a finished run left behind: the final checkpoint, its hash and the last metrics."""

    path: Path
    sha256: str
    steps: int
    metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    stopped_early: bool = False


# ---------------------------------------------------------------- determinism


def _seed_for(seed: int, salt: str, *keys: int) -> int:
    """A 32-bit seed (numpy's global RNG takes no more) that depends only on ``(seed, salt, *keys)``."""
    return int(np.random.SeedSequence([seed, _SALT[salt], *keys]).generate_state(1)[0])


def _rng(seed: int, salt: str, *keys: int) -> np.random.Generator:
    return np.random.default_rng(_seed_for(seed, salt, *keys))


@lru_cache(maxsize=8)
def _permutation(n: int, seed: int, salt: str, epoch: int) -> np.ndarray:
    return _rng(seed, salt, epoch).permutation(n)


def step_indices(n: int, batch: int, seed: int, step: int, salt: str = "classifier") -> np.ndarray:
    """Dataset indices of ``step``'s batch: epoch-wise permutations, a pure function of ``(seed, step)``.

    Sample ``p = step * batch + i`` is element ``p % n`` of epoch ``p // n``'s permutation.
    """
    positions = step * batch + np.arange(batch)
    return np.array([_permutation(n, seed, salt, int(p // n))[p % n] for p in positions], dtype=np.int64)


class _StepBatches:
    """``DataLoader`` batch sampler: the batches of steps ``start .. total-1`` (order survives workers)."""

    def __init__(self, n: int, batch: int, seed: int, start: int, total: int, salt: str) -> None:
        self.n, self.batch, self.seed, self.start, self.total, self.salt = n, batch, seed, start, total, salt

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start, self.total):
            yield step_indices(self.n, self.batch, self.seed, step, self.salt).tolist()

    def __len__(self) -> int:
        return max(0, self.total - self.start)


def _loader(ds: Dataset, batch: int, seed: int, start: int, total: int, salt: str, workers: int) -> Iterator[Any]:
    sampler = _StepBatches(len(ds), batch, seed, start, total, salt)
    collate = getattr(ds, "collate", None)  # a data set whose items the default cannot batch says how
    return iter(DataLoader(ds, batch_sampler=sampler, num_workers=workers, collate_fn=collate))


def _device(device: str | torch.device | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


class _StepRNG:
    """Seed torch's and numpy's global RNGs (dropout, ART) from ``(seed, *keys)``; restore them after."""

    def __init__(self, seed: int, device: torch.device, *keys: int) -> None:
        self.fork = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
        self.value = _seed_for(seed, "torch", *keys)

    def __enter__(self) -> None:
        self.fork.__enter__()
        self.numpy_state = np.random.get_state()
        torch.manual_seed(self.value)
        np.random.seed(self.value)  # ART draws random inits from numpy's global RNG

    def __exit__(self, *exc: Any) -> None:
        np.random.set_state(self.numpy_state)
        self.fork.__exit__(*exc)


# ---------------------------------------------------------------- resumable state


def _rng_state() -> tuple[dict[str, Tensor], dict[str, Any]]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    tensors = {"torch_rng": torch.get_rng_state(), "numpy_rng": torch.from_numpy(keys.astype(np.int64))}
    meta = {"numpy_rng": [kind, pos, has_gauss, gauss], "python_rng": [version, list(internal), gauss_next]}
    return tensors, meta


def _set_rng_state(tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_rng"])
    kind, pos, has_gauss, gauss = meta["numpy_rng"]
    np.random.set_state((kind, tensors["numpy_rng"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = meta["python_rng"]
    random.setstate((version, tuple(internal), gauss_next))


@dataclass
class _Run:
    """One resumable run: its state file, what it trains, and the settings a resume must match."""

    path: Path
    model: nn.Module
    optimizer: torch.optim.Optimizer
    config: dict[str, Any]
    step: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def save(self) -> None:
        tensors, rng_meta = _rng_state()
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), **tensors}
        order = {"scheme": "epoch-permutation", "seed": self.config["seed"], "step": self.step}
        meta = {"step": self.step, "config": self.config, "extra": self.extra, "data_order": order, **rng_meta}
        save_checkpoint(self.path, state, meta)

    def restore(self) -> None:
        if not self.path.is_file():
            raise CheckpointError(f"nothing to resume: {self.path} does not exist (run without --resume)")
        state, meta = load_checkpoint(self.path)
        for key, value in self.config.items():
            if meta["config"].get(key) != value:
                raise ConfigError(
                    f"cannot resume from {self.path}: it was trained with {key}={meta['config'].get(key)!r}, "
                    f"the recipe says {value!r}"
                )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        _set_rng_state(state, meta)
        self.step, self.extra = int(meta["step"]), dict(meta["extra"])


def _run_config(recipe: Recipe, **extra: Any) -> dict[str, Any]:
    t = recipe.train
    d = recipe.data
    return {"seed": t.seed, "batch": t.batch, "lr": t.lr, "data": [d.kind, d.root, d.clip_len, d.size], **extra}


def _write_sidecar(path: Path, sha256: str, meta: dict[str, Any]) -> None:
    """``<checkpoint>.json``: command, seed, metrics and sha256, as ``weights/manifest.json`` wants them."""
    text = json.dumps({"file": path.name, "sha256": sha256, **meta}, indent=2, default=str)
    atomic_write_text(path.with_name(path.name + ".json"), text)


def _train_loop(
    run: _Run,
    total: int,
    seed: int,
    device: torch.device,
    step_fn: Callable[[int], dict[str, float]],
    eval_fn: Callable[[int], dict[str, float]] | None,
    eval_every: int,
    checkpoint_every: int,
    on_progress: ProgressFn | None,
    should_stop: Callable[[dict[str, Any]], bool] = lambda extra: False,
) -> dict[str, float]:
    """Steps ``run.step .. total-1``; evaluate, checkpoint and report progress; returns the last metrics."""
    metrics: dict[str, float] = dict(run.extra.get("last", {}))
    while run.step < total and not should_stop(run.extra):
        with _StepRNG(seed, device, 0, run.step):
            metrics = step_fn(run.step)
        run.step += 1
        if eval_fn is not None and (run.step % eval_every == 0 or run.step == total):
            with _StepRNG(seed, device, 1, run.step):
                scores = eval_fn(run.step)
            metrics.update(scores)
            run.extra.setdefault("history", []).append({"step": run.step, **scores})
        run.extra["last"] = metrics
        if run.step % checkpoint_every == 0 or run.step == total or should_stop(run.extra):
            run.save()
        if on_progress is not None:
            on_progress(run.step, total, metrics)
    return metrics


def _start(run: _Run, resume: bool) -> None:
    run.path.parent.mkdir(parents=True, exist_ok=True)
    if resume:
        run.restore()


# ---------------------------------------------------------------- data


def _dataset(recipe: Recipe, split: str, clip_len: int | None = None, subset: int | None = None) -> Any:
    from .data import recipe_clips

    return recipe_clips(recipe.data, split, clip_len=clip_len, subset=subset)


def augment_clips(x: Tensor, clip_len: int, gen: torch.Generator, colour: float = 0.2, shift: int = 0) -> Tensor:
    """Temporal, spatial and colour jitter of ``(B, 3, W, H, W)`` windows -> ``(B, 3, clip_len, H, W)``.

    No flips: SynthMotion's classes are motion directions, which a flip changes. Each clip gets a
    random start inside its window, a random translation of up to ``shift`` pixels (the same for
    all its frames, so the motion is unchanged), a random RGB channel order, and random brightness,
    contrast and saturation factors in ``[1 - colour, 1 + colour]``: appearance carries no class
    information, so the network should not be able to rely on it.
    """
    b, _, window, _, _ = x.shape
    starts = torch.randint(0, window - clip_len + 1, (b,), generator=gen).tolist()
    orders = [torch.randperm(3, generator=gen) for _ in range(b)]
    shifts = torch.randint(-shift, shift + 1, (b, 2), generator=gen).tolist()
    x = torch.stack([
        torch.roll(x[i, order, s : s + clip_len], (dy, dx), (2, 3))
        for i, (order, s, (dy, dx)) in enumerate(zip(orders, starts, shifts))
    ])  # fmt: skip
    f = 1 + colour * (2 * torch.rand(3, b, 1, 1, 1, 1, generator=gen) - 1)
    x = x * f[0]
    mean = x.mean(dim=(1, 2, 3, 4), keepdim=True)
    x = (x - mean) * f[1] + mean
    grey = x.mean(dim=1, keepdim=True)
    x = (x - grey) * f[2] + grey
    return x.clamp(0, 1)


def mirror_clips(x: Tensor, y: Tensor, labels: Mapping[str, Sequence[int]], gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Apply each label-changing symmetry to half of the ``(B, 3, T, H, W)`` clips, independently.

    ``labels[name][i]`` is class ``i``'s label after symmetry ``name`` (``"hflip"``: mirror left-right,
    ``"reverse"``: play backwards; :func:`streamguard.data.symmetry_labels`).
    """
    x, y = x.clone(), y.clone()
    for name, perm in labels.items():
        pick = torch.rand(len(x), generator=gen) < 0.5
        dim = {"hflip": 4, "reverse": 2}[name]
        x[pick] = x[pick].flip(dim)
        y[pick] = torch.as_tensor(perm, dtype=y.dtype)[y[pick]]
    return x, y


class InMemory(Dataset):
    """Caches a clip dataset's items as uint8 on first access (exact: decoded frames are uint8).

    SynthMotion fits in memory many times over; decoding it again at every step made training
    data-bound on both the CPU and the GPU.
    """

    def __init__(self, ds: Dataset) -> None:
        self.ds = ds
        self.items: dict[int, tuple[Tensor, int]] = {}

    def __len__(self) -> int:
        return len(self.ds)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        if i not in self.items:
            clip, label = self.ds[i]
            self.items[i] = ((clip * 255).round().to(torch.uint8), label)
        clip, label = self.items[i]
        return clip.float() / 255, label

    def __getattr__(self, name: str) -> Any:
        if name == "ds":
            raise AttributeError(name)
        return getattr(self.ds, name)


def _one_cycle(step: int, total: int, peak: float, warmup: float = 0.1) -> float:
    """Linear warm-up to ``peak`` then cosine decay to zero: the learning rate of ``step``."""
    ramp = max(1, int(total * warmup))
    if step < ramp:
        return peak * (step + 1) / ramp
    return float(peak * 0.5 * (1 + np.cos(np.pi * (step - ramp) / max(1, total - ramp))))


def _frames(x: Tensor) -> Tensor:
    """``(B, C, T, H, W)`` -> ``(B*T, C, H, W)``."""
    b, c, t, h, w = x.shape
    return x.transpose(1, 2).reshape(b * t, c, h, w)


def pixel_scores(logits: Tensor, target: Tensor) -> dict[str, float]:
    """Pixel precision / recall / F1 of ``logits > 0`` against a 0/1 mask, pooled over the batch."""
    pred = logits > 0
    truth = target > 0.5
    tp = (pred & truth).sum().item()
    fp = (pred & ~truth).sum().item()
    fn = (~pred & truth).sum().item()
    return {
        "precision": tp / (tp + fp) if tp + fp else 1.0,
        "recall": tp / (tp + fn) if tp + fn else 1.0,
        "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0,
    }


@torch.no_grad()
def top1(model: nn.Module, ds: Any, batch: int, device: torch.device, defense: nn.Module | None = None) -> float:
    """Top-1 accuracy of ``model`` (behind ``defense`` if given) on every clip of ``ds``."""
    model.eval()
    correct = 0
    for x, y in DataLoader(ds, batch_size=batch):
        x = x.to(device)
        if defense is not None:
            x = defense(x)
        correct += (model(x).argmax(1).cpu() == y).sum().item()
    return correct / max(1, len(ds))


# ---------------------------------------------------------------- downstream classifier


def _adamw(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)


def _synth_train_recipe(recipe: Recipe, videos: int | None) -> Recipe:
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
    from .data import symmetry_labels
    from .models import _set_spec, build_model

    t, c, dev = recipe.train, recipe.train.classifier, _device(device)
    d = recipe.data
    window = min(d.frames // d.stride, 2 * d.clip_len) if d.kind == "synthmotion" else d.clip_len
    train_ds = _dataset(_synth_train_recipe(recipe, synth_train_videos), "train", clip_len=window)
    test_ds = _dataset(recipe, "test", subset=recipe.data.subset)
    if d.kind == "synthmotion":
        train_ds, test_ds = InMemory(train_ds), InMemory(test_ds)
    num_classes = recipe.model.num_classes or len(train_ds.classes)
    kw: dict[str, Any] = {}
    if recipe.model.name == "tiny3d":
        kw = {"clip_len": recipe.data.clip_len, "size": recipe.data.size, "mean": tuple(train_ds.mean)}
        if c.vortex:
            kw["vortex"] = tuple(c.vortex)
    kw.update(model_kwargs or {})
    with _StepRNG(t.seed, dev, 3, 0):
        model = build_model(recipe.model.name, num_classes, **kw).to(dev)
    if len(train_ds.classes) == num_classes:
        _set_spec(model, dataclasses.replace(model.spec, class_names=tuple(train_ds.classes)))
    mirror = {name: symmetry_labels(d.kind, name, train_ds.classes) for name in c.symmetries}
    optimizer = _adamw(model, c.lr)
    config = _run_config(
        recipe, model=recipe.model.name, synth_train_videos=synth_train_videos, symmetries=c.symmetries, vortex=c.vortex
    )
    run = _Run(Path(t.output) / "classifier-state.pt", model, optimizer, config)
    _start(run, resume)
    batches = _loader(train_ds, c.batch, t.seed, run.step, c.steps, "classifier", 0 if d.kind == "synthmotion" else d.workers)

    def step_fn(step: int) -> dict[str, float]:
        x, y = next(batches)
        gen = torch.Generator().manual_seed(_seed_for(t.seed, "augment", step))
        x = augment_clips(x, d.clip_len, gen, shift=c.shift)
        if mirror:
            x, y = mirror_clips(x, y, mirror, gen)
        x, y = x.to(dev), y.to(dev)
        for group in optimizer.param_groups:
            group["lr"] = _one_cycle(step, c.steps, c.lr)
        model.train()
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return {"loss": loss.item(), "acc": (logits.argmax(1) == y).float().mean().item()}

    def eval_fn(step: int) -> dict[str, float]:
        return {"top1": top1(model, test_ds, recipe.pipeline.batch, dev)}

    metrics = _train_loop(run, c.steps, t.seed, dev, step_fn, eval_fn, t.eval_every, t.checkpoint_every, on_progress)
    return _save_downstream(recipe, run, model, metrics, "classifier", command)


def _save_downstream(
    recipe: Recipe, run: _Run, model: nn.Module, metrics: dict[str, float], kind: str, command: str
) -> TrainResult:
    """``<train.output>/<kind with - for _>.pt`` (``models.save_model``) and its ``.json`` sidecar."""
    from .models import save_model

    t = recipe.train
    path = Path(t.output) / f"{kind.replace('_', '-')}.pt"
    meta = {"command": command, "seed": t.seed, "steps": run.step, "metrics": metrics, "recipe": recipe_to_dict(recipe)}
    sha = save_model(model.cpu().eval(), path, **meta)
    _write_sidecar(path, sha, {"kind": kind, **meta})
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
    from .evaluation import detection_ap

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
    from .data import BoxClips
    from .models import _set_spec, build_model

    t, f, dev = recipe.train, recipe.train.frame_detector, _device(device)
    num_classes = recipe.model.num_classes or 2
    train_set = FrameTargets(BoxClips(_dataset(recipe, "train"), num_classes))
    test_clips = _dataset(recipe, "test")
    n_eval = max(1, min(len(test_clips), eval_frames // test_clips.clip_len))
    test_set = FrameTargets(BoxClips(_dataset(recipe, "test", subset=n_eval), num_classes))
    with _StepRNG(t.seed, dev, 3, 2):
        model = build_model(recipe.model.name, num_classes, **frame_detector_kwargs(recipe)).to(dev)
    names = ("background", "object") if num_classes == 2 else ("background", *test_clips.classes)
    _set_spec(model, dataclasses.replace(model.spec, class_names=names))
    optimizer = _adamw(model, f.lr)
    config = _run_config(recipe, model=recipe.model.name, frame_batch=f.batch, frame_lr=f.lr)
    run = _Run(Path(t.output) / "frame-detector-state.pt", model, optimizer, config)
    _start(run, resume)

    def step_fn(step: int) -> dict[str, float]:
        items = [train_set[int(i)] for i in step_indices(len(train_set), f.batch, t.seed, step, "frames")]
        gen = torch.Generator().manual_seed(_seed_for(t.seed, "augment", step))
        images = augment_clips(torch.stack([frame for frame, _ in items])[:, :, None], 1, gen)[:, :, 0].to(dev)
        targets = [{k: v.to(dev) for k, v in target.items()} for _, target in items]
        for group in optimizer.param_groups:
            group["lr"] = _one_cycle(step, f.steps, f.lr)
        model.train()
        losses = model(list(images), targets)
        loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return {"loss": loss.item()}

    def eval_fn(step: int) -> dict[str, float]:
        return frame_ap(model, test_set, recipe.pipeline.batch * 4, dev)

    every = (f.eval_every or t.eval_every, f.checkpoint_every or t.checkpoint_every)
    metrics = _train_loop(run, f.steps, t.seed, dev, step_fn, eval_fn, *every, on_progress)
    return _save_downstream(recipe, run, model, metrics, "frame_detector", command)


# ---------------------------------------------------------------- detector, stage 1: cached DO attacks


def _downstream(recipe: Recipe, device: torch.device) -> nn.Module:
    """The frozen downstream model the attacks target."""
    from .models import load_model

    model = load_model(recipe.model.weights or recipe.model.name, recipe.model.num_classes).to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _attack_methods(recipe: Recipe) -> list[str]:
    methods = [m for m in recipe.attack.methods if m in ("pgd", "apgd")]
    return methods or ["pgd", "apgd"]


def _masks(recipe: Recipe, shape: tuple[int, int, int], rngs: Sequence[np.random.Generator]) -> tuple[np.ndarray, list[float]]:
    """One patch mask per generator, area uniform in ``train.area_range``: ``(N, 1, T, H, W)``."""
    from .attacks import patch_mask

    lo, hi = recipe.train.area_range
    areas = [float(r.uniform(lo, hi)) for r in rngs]
    masks = [patch_mask(shape, area=a, rng=r, moving=recipe.attack.moving) for a, r in zip(areas, rngs)]
    return np.stack(masks)[:, None].astype(np.float32), areas


def _attack(
    recipe: Recipe, model: nn.Module, method: str, mode: str, defense: nn.Module | None, seed: int,
    x: Tensor, y: Tensor, mask: np.ndarray, device: torch.device,
) -> Tensor:  # fmt: skip
    """Masked ``method`` in ``mode`` on ``(N, 3, T, H, W)`` clips -> adversarial clips (CPU tensor).

    ``y``: labels ``(N,)``, or for a frame detector N lists of T ``{"boxes", "labels"}`` targets
    (masked PGD only, :class:`~streamguard.attacks.MaskedFrameAttack`).
    """
    from .attacks import MaskedAttack, MaskedFrameAttack

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
    from .checkpoints import get_weights, sha256_file

    if not recipe.model.weights:
        return recipe.model.name
    weights = get_weights(recipe.model.weights)
    return weights.sha256 or sha256_file(weights.path)


def _cache_config(recipe: Recipe, n_videos: int) -> dict[str, Any]:
    a, t, d = recipe.attack, recipe.train, recipe.data
    return {
        "model": _model_identity(recipe), "data": [d.kind, d.root, d.fold, d.clip_len, d.size],
        "videos": n_videos, "per_video": t.attacked_per_video, "area_range": t.area_range, "methods": _attack_methods(recipe),
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
    dev = _device(device)
    ds = _dataset(recipe, "train", subset=recipe.train.cache_videos)
    cache, per = Path(recipe.train.cache), recipe.train.attacked_per_video
    config = _cache_config(recipe, len(ds))
    _check_cache_config(cache, config)
    for tmp in cache.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)
    total, methods, batch = len(ds) * per, _attack_methods(recipe), recipe.attack.batch
    todo = [k for k in range(total) if not _entry_path(cache, k).is_file()]
    model = _downstream(recipe, dev) if todo else None
    done, fooled = total - len(todo), 0
    for chunk in (todo[i : i + batch] for i in range(0, len(todo), batch)):
        for method_id, method in enumerate(methods):
            ks = [k for k in chunk if k % len(methods) == method_id]
            if ks:
                fooled += _cache_entries(recipe, model, ds, cache, ks, method, dev)
        done += len(chunk)
        if on_progress is not None:
            on_progress(done, total, {"fooled": fooled / max(1, done - (total - len(todo)))})
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
    mask, areas = _masks(recipe, tuple(x.shape[2:]), [_rng(seed, "cache", k) for k in ks])
    with _StepRNG(seed, device, 2, ks[0]):
        adv = _attack(recipe, model, method, "do", None, _seed_for(seed, "cache", ks[0], 1), x, y, mask, device)
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


def _detector(recipe: Recipe, detector_kwargs: dict[str, Any] | None) -> nn.Module:
    from .detector import PSPNet

    return PSPNet(recipe.defense.backbone, aux=True, **{"width": recipe.defense.width, **(detector_kwargs or {})})


def _patchzero(recipe: Recipe, detector: nn.Module, mean: Sequence[float], bpda: bool = False) -> nn.Module:
    from .detector import PatchZero

    d = recipe.defense
    size = None if d.input_size is None else (d.input_size, d.input_size)
    return PatchZero(
        detector, mean, threshold=d.threshold, dilate=d.dilate, temporal=d.temporal, ema=d.ema, input_size=size, bpda=bpda
    )


def _detector_step(
    detector: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, mask: Tensor, aux_weight: float
) -> dict[str, float]:
    """One Adam step of the detector on the frames of clips ``x`` ``(B, 3, T, H, W)`` / masks ``(B, 1, T, H, W)``."""
    from .detector import detector_loss

    frames, target = _frames(x), _frames(mask)
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
    from .detector import save_defense

    defense = _patchzero(recipe, detector.cpu().eval(), mean)
    sha = save_defense(defense, path, **meta)
    _write_sidecar(path, sha, {"kind": "detector", **meta})
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
    t, dev = recipe.train, _device(device)
    benign_ds = _dataset(recipe, "train")
    cached_videos = len(benign_ds) if t.cache_videos is None else len(_dataset(recipe, "train", subset=t.cache_videos))
    attacked_ds = AttackCache(t.cache, cached_videos * t.attacked_per_video)
    mean = _downstream(recipe, torch.device("cpu")).spec.mean
    with _StepRNG(t.seed, dev, 3, 1):
        detector = _detector(recipe, detector_kwargs).to(dev)
    optimizer = torch.optim.Adam(detector.parameters(), lr=t.lr)
    config = _run_config(recipe, stage=1, backbone=recipe.defense.backbone)
    run = _Run(Path(t.output) / "detector-stage1-state.pt", detector, optimizer, config)
    _start(run, resume)
    n_adv = t.batch // 2
    workers = recipe.data.workers
    benign = _loader(benign_ds, t.batch - n_adv, t.seed, run.step, t.steps, "benign", workers)
    attacked = _loader(attacked_ds, n_adv, t.seed, run.step, t.steps, "attacked", workers)

    def step_fn(step: int) -> dict[str, float]:
        xb, _ = next(benign)
        xa, ma = next(attacked)
        x = torch.cat([xb, xa]).to(dev)
        mask = torch.cat([torch.zeros_like(xb[:, :1]), ma]).to(dev)
        return _detector_step(detector, optimizer, x, mask, t.aux_weight)

    metrics = _train_loop(run, t.steps, t.seed, dev, step_fn, None, t.eval_every, t.checkpoint_every, on_progress)
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
    mask, _ = _masks(recipe, tuple(x.shape[2:]), [_rng(seed, "eval", i) for i in range(len(ds))])
    defense.eval()
    adv = _attack(recipe, model, "pgd", "bpda", defense, _seed_for(seed, "eval", len(ds)), x, y, mask, device)
    with torch.no_grad():
        clean = (model(defense(x.to(device))).argmax(1).cpu() == y).float().mean().item()
        robust = (model(defense(adv.to(device))).argmax(1).cpu() == y).float().mean().item()
    return {"clean_acc": clean, "robust_acc": robust}


def robust_ap50(
    recipe: Recipe, model: nn.Module, defense: nn.Module, ds: Any, seed: int, device: torch.device
) -> dict[str, float]:
    """:func:`robust_accuracy` for a frame detector: box AP50 over every frame of ``ds``'s clips
    (``BoxClips``) behind ``defense``, clean and under masked BPDA PGD."""
    from .evaluation import detection_ap

    x, clip_targets = ds.collate([ds[i] for i in range(len(ds))])
    targets = [t for frames in clip_targets for t in frames]
    mask, _ = _masks(recipe, tuple(x.shape[2:]), [_rng(seed, "eval", i) for i in range(len(ds))])
    defense.eval()
    adv = _attack(recipe, model, "pgd", "bpda", defense, _seed_for(seed, "eval", len(ds)), x, clip_targets, mask, device)

    @torch.no_grad()
    def ap50(clips: Tensor) -> float:
        preds = [p for clip in clips for p in model(list(defense(clip[None].to(device))[0].transpose(0, 1)))]
        return detection_ap([{k: v.cpu() for k, v in p.items()} for p in preds], targets)["ap50"]

    return {"clean_ap50": ap50(x), "robust_ap50": ap50(adv)}


def _task_clips(recipe: Recipe, model: nn.Module, split: str, subset: int | None = None) -> Any:
    """The recipe's clips for ``model``: ``(clip, label)``, or for a frame detector ``(clip, targets)``."""
    from .data import BoxClips

    clips = _dataset(recipe, split, subset=subset)
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
    from .detector import load_defense

    t, dev = recipe.train, _device(device)
    model = _downstream(recipe, dev)
    train_ds = _task_clips(recipe, model, "train")
    n_test = len(_dataset(recipe, "test"))
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
    config = _run_config(recipe, stage=2, backbone=recipe.defense.backbone, init=str(init))
    run = _Run(Path(t.output) / "detector-stage2-state.pt", detector, optimizer, config)
    _start(run, resume)
    batches = _loader(train_ds, t.batch, t.seed, run.step, t.steps, "stage2", recipe.data.workers)
    methods, n_adv = _attack_methods(recipe), max(1, t.batch // 2)

    def step_fn(step: int) -> dict[str, float]:
        x, y = next(batches)
        rngs = [_rng(t.seed, "stage2", step, i) for i in range(n_adv)]
        mask, _ = _masks(recipe, tuple(x.shape[2:]), rngs)
        detector.eval()
        method = methods[step % len(methods)]
        adv = _attack(recipe, model, method, "bpda", bpda, _seed_for(t.seed, "stage2", step), x[:n_adv], y[:n_adv], mask, dev)
        clips = torch.cat([adv, x[n_adv:]]).to(dev)
        masks = torch.cat([torch.from_numpy(mask), torch.zeros_like(x[n_adv:, :1])]).to(dev)
        return _detector_step(detector, optimizer, clips, masks, t.aux_weight)

    def eval_fn(step: int) -> dict[str, float]:
        scores = robust(recipe, model, bpda, eval_ds, t.seed, dev)
        best = run.extra.get("best", -1.0)
        run.extra["stale"] = 0 if scores[score] > best else run.extra.get("stale", 0) + 1
        run.extra["best"] = max(best, scores[score])
        return scores

    metrics = _train_loop(
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
