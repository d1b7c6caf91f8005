"""PatchZero's two training stages.

* :func:`train_detector_stage1`: cached DO attacks (:mod:`.attack_cache`) mixed 1:1 with benign clips.
* :func:`train_detector_stage2`: BPDA adaptive attacks generated online against the detector being
  trained, until the attacker-defender race converges.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import Subset

from ..errors import ConfigError
from ..metrics import pixel_scores
from ..patches import procedural_patch
from ..recipes import Recipe, recipe_to_dict
from .attack_cache import (
    AttackCache,
    draw_masks,
    load_downstream,
)
from .augment import clip_frames
from .core import (
    InMemory,
    ProgressFn,
    Run,
    StepRNG,
    TrainResult,
    keyed_rng,
    pick_device,
    recipe_dataset,
    run_config,
    start_run,
    step_loader,
    train_loop,
    write_sidecar,
)
from .distributed import Dist, data_parallel, init_distributed
from .race import CHECKPOINT, PatchPool, PoolEntry, patch_attack, task_for


def _detector(recipe: Recipe, detector_kwargs: dict[str, Any] | None) -> nn.Module:
    from ..detector import PSPNet

    d = recipe.defense
    return PSPNet(d.backbone, aux=True, **{"width": d.width, "refine": d.refine, **(detector_kwargs or {})})


def _patchzero(recipe: Recipe, detector: nn.Module, mean: Sequence[float], bpda: bool = False, **overrides: Any) -> nn.Module:
    """The recipe's PatchZero around ``detector``, working at the scale it is trained at (``data.size``);
    ``overrides`` as :func:`~streamguard.patchzero.build_defense`'s."""
    from ..patchzero import build_defense

    size = recipe.defense.input_size or recipe.data.size
    return build_defense(recipe.defense, detector=detector, mean=mean, bpda=bpda, input_size=size, **overrides)


VIEWS: dict[str, tuple[str, Any]] = {  # [train.race] uncompleted_view: the PatchZero setting (attribute, value) it changes
    "uncompleted": ("complete", "none"),  # the attacker who ignores the shape completion
    "spread": ("soft_reach", "patch"),  # the attacker who drives down every detection within a patch's reach
}


def race_view(defense: nn.Module, name: str) -> nn.Module:
    """``defense`` as the attacker of ``[train.race] uncompleted_view`` ``name`` sees it (:data:`VIEWS`), changed in place."""
    setattr(defense, *VIEWS[name])
    return defense


def _detector_step(
    detector: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: Tensor,
    mask: Tensor,
    aux_weight: float,
    extra_loss: Callable[[], Tensor] | None = None,
    net: nn.Module | None = None,
    ddp: Dist | None = None,
    edge: tuple[float, int] = (0.0, 2),
) -> dict[str, float]:
    """One Adam step of the detector on the frames of clips ``x`` ``(B, 3, T, H, W)`` / masks
    ``(B, 1, T, H, W)``; ``extra_loss()`` (evaluated in eval mode, e.g. stage 2's task term) is added;
    ``edge`` is ``detector_loss``'s ``(edge_weight, edge_px)``.
    Under torchrun ``net`` is the DDP-wrapped ``detector`` and this rank trains on its rows of the batch."""
    from ..detector import detector_loss

    ddp = ddp or Dist()
    rows, weight = ddp.rows(len(x)), ddp.weight(len(x))
    frames, target = clip_frames(x[rows]), clip_frames(mask[rows])
    task = None
    if extra_loss is not None:
        detector.eval()
        task = extra_loss()
    detector.train()
    outputs = (net or detector)(frames)
    loss = detector_loss(outputs, target, aux_weight, edge_weight=edge[0], edge_px=edge[1]) * weight
    if task is not None:
        loss = loss + task
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    logits = outputs[0] if isinstance(outputs, (tuple, list)) else outputs
    scores = pixel_scores(logits.detach(), target)
    return {"loss": ddp.mean(loss.item()), **{k: ddp.mean(v * weight) for k, v in scores.items()}}


def _save_detector(
    recipe: Recipe, detector: nn.Module, mean: Sequence[float], path: Path, meta: dict[str, Any]
) -> str:
    from ..patchzero import save_defense

    defense = _patchzero(recipe, copy.deepcopy(detector).cpu().eval(), mean)  # a copy: training may go on, on its device
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
    """Stage 1: the PSPNet learns patches from clips mixed 1:1 benign / patched.

    Each step takes ``train.batch`` clips: half benign (all-zero mask), half patched. Patched clips
    are DO attacks from the cache, and, with ``[train.patches] textures``, procedural patches
    (:func:`streamguard.patches.procedural_patch`) pasted on benign clips drawn at that step, a
    ``procedural`` fraction of them. With ``[train.patches] footage`` a ``footage_fraction`` of the
    benign and procedural clips are real footage (:class:`~streamguard.data.footage.FootageClips`)
    instead of SynthMotion. The frames take one Adam step (``train.lr``) on ``detector_loss`` (main
    + ``train.aux_weight`` x aux). Writes ``<train.output>/detector-stage1.pt`` (``save_defense``).
    """
    t, p = recipe.train, recipe.train.patches
    ddp, dev = init_distributed(pick_device(device))
    n_adv = t.batch // 2
    n_proc = round(n_adv * p.procedural) if p.textures else 0
    n_cache = n_adv - n_proc
    n_base = t.batch - n_cache  # benign clips, and the bases of the procedural patches
    benign_ds = recipe_dataset(recipe, "train")
    mean = load_downstream(recipe, torch.device("cpu")).spec.mean
    with StepRNG(t.seed, dev, 3, 1):
        detector = _detector(recipe, detector_kwargs).to(dev)
    optimizer = torch.optim.Adam(detector.parameters(), lr=t.lr)
    config = run_config(recipe, stage=1, backbone=recipe.defense.backbone, refine=recipe.defense.refine,
                        patches=dataclasses.asdict(p))  # fmt: skip
    run = Run(Path(t.output) / "detector-stage1-state.pt", detector, optimizer, config, main=ddp.main)
    start_run(run, resume)
    net = data_parallel(detector, ddp, dev)
    bases = benign_bases(recipe, benign_ds, n_base, run.step)
    attacked = None
    if n_cache:
        cached_videos = len(benign_ds) if t.cache_videos is None else len(recipe_dataset(recipe, "train", subset=t.cache_videos))
        cache = AttackCache(t.cache, cached_videos * t.attacked_per_video)
        attacked = step_loader(cache, n_cache, t.seed, run.step, t.steps, "attacked", recipe.data.workers)

    def step_fn(step: int) -> dict[str, float]:
        base, mask = paste_procedural(recipe, bases(), n_proc, keyed_rng(t.seed, "patches", step))
        if attacked is not None:
            xa, ma = next(attacked)
            base, mask = torch.cat([base, xa]), torch.cat([mask, ma])
        return _detector_step(detector, optimizer, base.to(dev), mask.to(dev), t.aux_weight, net=net, ddp=ddp)

    progress = on_progress if ddp.main else None
    metrics = train_loop(run, t.steps, t.seed, dev, step_fn, None, t.eval_every, t.checkpoint_every, progress)
    path = Path(t.output) / "detector-stage1.pt"
    meta = {"command": command, "seed": t.seed, "stage": 1, "steps": run.step, "metrics": metrics, "recipe": recipe_to_dict(recipe)}
    sha = _save_detector(recipe, detector, mean, path, meta) if ddp.main else ""
    return TrainResult(path, sha, run.step, metrics)


GRAPHICS_TRAIN = 100_000  # graphics clips indices 0.. are for training; held-out ones start here


def benign_bases(recipe: Recipe, benign_ds: Any, n: int, start: int) -> Callable[[], tuple[Tensor, Tensor]]:
    """``n`` benign clips per call, the batches of steps ``start ..``: ``(clips (n, 3, T, H, W),
    natural (n,) bool)``. A ``[train.patches] footage_fraction`` of them are real footage, a
    ``graphics`` fraction synthetic graphics (:class:`~streamguard.data.graphics.GraphicsClips`),
    the rest from ``benign_ds``; ``natural`` is False for the graphics, which are only ever benign:
    a flat colour square or a stripe pasted on a picture made of such shapes is no patch."""
    from ..data.footage import FootageClips
    from ..data.graphics import GraphicsClips

    t, p, d = recipe.train, recipe.train.patches, recipe.data
    n_foot = round(n * p.footage_fraction) if p.footage else 0
    n_graphics = min(round(n * p.graphics), n - n_foot)
    sources = [(benign_ds, n - n_foot - n_graphics, "benign"), (n_foot and FootageClips(p.footage, "train"), n_foot, "footage"),
               (n_graphics and GraphicsClips(GRAPHICS_TRAIN, d.size, d.clip_len, t.seed), n_graphics, "graphics")]  # fmt: skip
    loaders = [step_loader(ds, k, t.seed, start, t.steps, salt, d.workers) for ds, k, salt in sources if k]
    natural = torch.tensor([salt != "graphics" for _, k, salt in sources for _ in range(k)])
    return lambda: (torch.cat([next(it)[0][:, :, : d.clip_len] for it in loaders]), natural.clone())  # footage may be longer


def paste_procedural(recipe: Recipe, bases: tuple[Tensor, Tensor], k: int, rng: np.random.Generator) -> tuple[Tensor, Tensor]:
    """Shuffle ``bases`` (``benign_bases``' clips and flags) and paste a procedural patch on ``k`` of
    the natural ones: ``(clips (n, 3, T, H, W), masks (n, 1, T, H, W))``, the patched clips first."""
    p = recipe.train.patches
    x, natural = bases
    weights = [p.weights.get(f, 1.0) for f in p.textures] if p.weights else None
    order = rng.permutation(len(x))
    order = np.concatenate([order[natural[order].numpy()], order[~natural[order].numpy()]])
    x = x[torch.from_numpy(order)]
    mask = torch.zeros_like(x[:, :1])
    for i in range(min(k, int(natural.sum())) if p.textures else 0):
        x[i], mask[i], _ = procedural_patch(x[i], rng, p.textures, tuple(p.area_range), p.moving, p.upscale, p.codec, weights)
    return x, mask


def benign_fpr(defense: nn.Module, clips: Tensor, batch: int = 8) -> float:
    """The fraction of the pixels of benign ``clips`` ``(B, 3, T, H, W)`` that ``defense`` masks."""
    defense.eval()
    with torch.no_grad():
        masked = sum(float(defense.sanitize(clips[i : i + batch])[1].gt(0.5).sum()) for i in range(0, len(clips), batch))
    return masked / (clips[:, :1].numel())


STEP_HALVINGS = 4  # a pool patch's PGD step decays to at most 1/16 of attack.step (train.race.step_halflife)
HARD_SCAN, HARD_KEEP, HARD_EVERY = 64, 8, 25  # the race's benign mining: footage clips scanned, kept, every so many steps


def hardest_benign(defense: nn.Module, clips: Tensor, keep: int, batch: int = 8) -> Tensor:
    """Indices of the ``keep`` benign ``clips`` ``(B, 3, T, H, W)`` that ``defense`` comes nearest to
    masking, hardest first: ranked by the mean of each clip's top 2% patch probabilities, so a clip it
    almost marks counts before one it ignores."""
    defense.eval()
    with torch.no_grad():
        p = torch.cat([defense.probabilities(clips[i : i + batch]).flatten(1) for i in range(0, len(clips), batch)])
    return p.topk(max(1, p.shape[1] // 50), dim=1).values.mean(1).argsort(descending=True)[:keep]


def held_out_benign(recipe: Recipe, n: int) -> Tensor:
    """``n`` held-out benign clips: the footage's test split (when the recipe has footage) and
    graphics clips no training step draws, half each."""
    from ..data.footage import FootageClips
    from ..data.graphics import GraphicsClips

    d, p = recipe.data, recipe.train.patches
    footage = FootageClips(p.footage, "test") if p.footage else None
    n_foot = min(n // 2, len(footage)) if footage is not None else 0
    foot = [footage[int(i)][0][:, : d.clip_len] for i in np.linspace(0, len(footage) - 1, n_foot).round()] if n_foot else []
    graphics = GraphicsClips(GRAPHICS_TRAIN + n, d.size, d.clip_len, recipe.train.seed)
    return torch.stack(foot + [graphics[GRAPHICS_TRAIN + i][0] for i in range(n - n_foot)])


# ---------------------------------------------------------------- detector, stage 2: online BPDA


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
    """Stage 2: fine-tune the stage-1 detector on adaptive BPDA attacks made against itself, in the
    warm-started race of :func:`_race` (issue #16), against the recipe's downstream model: a clip
    classifier (robust top-1) or a per-frame detector (robust box AP50), as the paper trains one
    PatchZero per task. Writes ``<train.output>/detector-stage2.pt``.
    """
    ddp, dev = init_distributed(pick_device(device))
    model = load_downstream(recipe, dev)
    return _race(recipe, init, model, dev, ddp, on_progress=on_progress if ddp.main else None, resume=resume,
                 eval_videos=eval_videos, command=command)  # fmt: skip




def race_score(
    model: nn.Module, defense: nn.Module, x: Tensor, y: Any, mask: Tensor, z0: Tensor, iters: int, step: float,
    method: str = "pgd", through: nn.Module | None = None,
) -> dict[str, float]:
    """The held-out race: a fresh masked BPDA attack (``method``, from content ``z0``) through ``defense``
    (or through ``through``, e.g. the same defense without shape completion, then scored through ``defense``); the
    task's clean and robust score (``clean_acc``/``robust_acc``: top-1 of a clip classifier;
    ``clean_ap50``/``robust_ap50``: box AP50 of a frame detector) and the patch pixels' recall and
    precision under the attack, and ``clean_fpr``, the fraction of the clean clips' pixels it masks (a
    mask on a clean clip can cost the task nothing on these clips and a video on the next)."""
    from ..metrics import PixelCounts

    task = task_for(model)
    defense.eval()
    z, _, _ = patch_attack(model, (through or defense).eval(), x, y, mask, z0, iters, step, method)
    adv = x * (1 - mask) + mask * z
    with torch.no_grad():
        sanitized, clean_found = defense.sanitize(x)
        clean = task.score(sanitized, y)
        clean_adv, found = defense.sanitize(adv)
        robust = task.score(clean_adv, y)
    counts = PixelCounts.from_masks(found > 0.5, mask > 0.5)
    return {f"clean_{task.metric}": clean, f"robust_{task.metric}": robust, "race_recall": counts.recall,
            "race_precision": counts.precision, "clean_fpr": float(clean_found.gt(0.5).float().mean())}  # fmt: skip


def race_split(recipe: Recipe, n_train: int, n: int) -> tuple[list[int], list[int]]:
    """The race's split of the training videos ``0 .. n_train - 1``: ``(pool videos, validation
    videos)``, ``n`` of them (seeded by ``train.seed``) held out of the pool for :func:`held_out_race`,
    so stage 2 picks its checkpoint on clips it never attacks and never on the tables' test videos."""
    order = keyed_rng(recipe.train.seed, "validation").permutation(n_train)  # a larger n extends a smaller one
    val = sorted(int(v) for v in order[: min(n, n_train - 1)])
    held = set(val)
    return [v for v in range(n_train) if v not in held], val


def held_out_race(recipe: Recipe, model: nn.Module, n: int, device: torch.device) -> tuple[Tensor, Any, Tensor, Tensor]:
    """The race's held-out problem: ``n`` validation clips of the training split (:func:`race_split`),
    their targets, patch masks and the attack's start content, ``(x, y, mask, z0)``; a pure function of
    ``train.seed``, so every evaluation (and :func:`race_score` on other weights) sees the same problem."""
    t = recipe.train
    ds = _task_clips(recipe, model, "train")
    items = [ds[i] for i in race_split(recipe, len(ds), n)[1]]
    x, y = torch.stack([c for c, _ in items]), task_for(model).targets(items, device)
    mask = torch.from_numpy(draw_masks(recipe, tuple(x.shape[2:]), [keyed_rng(t.seed, "race", i) for i in range(len(x))])[0])
    z0 = torch.from_numpy(keyed_rng(t.seed, "race", len(x)).random(x.shape, dtype=np.float32))
    return x.to(device), y, mask.to(device), z0.to(device)


def _race(
    recipe: Recipe,
    init: str | os.PathLike[str],
    model: nn.Module,
    dev: torch.device,
    ddp: Dist,
    *,
    on_progress: ProgressFn | None,
    resume: bool,
    eval_videos: int | None,
    command: str,
) -> TrainResult:
    """The attacker-defender race against the downstream model (a clip classifier or a per-frame
    detector: :func:`~.race.task_for`), warm-started (ATTA) so that it is cheap.

    A :class:`~.race.PatchPool` of ``[train.race] pool`` patches on training clips persists across
    steps. Each step draws ``draw`` of them and continues each one's BPDA attack (plain PyTorch,
    ``iters`` iterations, ``method``) against the current detector, replaces ``refresh`` entries by
    fresh ones, and takes one Adam step of the detector on the drawn patches plus ``do`` cached DO
    clips, ``procedural`` procedural patches and ``benign`` clean clips (``detector_loss``, plus
    ``task_weight`` x the downstream loss on the sanitized attacked clips through the soft mask, so the
    detector learns to cover the pixels that matter; ``edge_weight`` on the band either side of each
    patch border, where the attacker leaks and over-masks). With ``average`` (a decay) the held-out race
    scores, and the run keeps, the exponential moving average of the detector's weights (torch's
    ``AveragedModel``), which smooths the step-to-step swings of the benign false-positive rate. With
    ``hard``, that many clean footage clips a step come from the :data:`HARD_KEEP` of :data:`HARD_SCAN`
    training clips the detector came nearest to masking when last mined (every :data:`HARD_EVERY`
    steps): hard negatives, since a race teaches the detector to mark the natural textures the attacker
    imitates; ``hard_task`` mines the task's own training clips the same way. The first ``uncompleted`` of
    the pool's slots are attacked through another view of the defense, ``uncompleted_view`` (:data:`VIEWS`):
    without shape completion (the evaluation's ``uncompleted`` attacker, who erodes the detected region
    until its box no longer covers the patch) or with the soft mask spread by the patch's side (``spread``),
    ``uncompleted_iters`` iterations a draw by ``uncompleted_method`` when set (AutoPGD in a PGD race
    restarts from the stored content: a warm start), and with ``eval_uncompleted`` so is the held-out race
    (scored through the real defense). With
    ``step_halflife`` a pool patch's PGD step halves every that many iterations it has accumulated (down to
    1/2^:data:`STEP_HALVINGS` of ``attack.step``), so a long-lived patch is refined at finer steps as
    AutoPGD's decay refines a long attack, without AutoPGD's stall test that froze the pool. Every ``train.eval_every`` steps a fresh
    ``eval_iters``-iteration attack on ``eval_videos`` held-out clips (default ``train.eval_videos``)
    scores the detector; the best robust score (top-1 or box AP50; the clean one within 2 points of
    the start's, the masked fraction of the held-out benign clips and of the clean validation clips at
    most ``max_benign_fpr``) is kept
    as ``detector-stage2.pt``, not the last. Training stops after ``train.patience`` evaluations
    without a new best, or at ``train.steps``. Resumes exactly, pool included.
    """
    from ..data.footage import FootageClips
    from ..patchzero import load_defense

    t, r = recipe.train, recipe.train.race
    if r.method == "apgd" and r.iters % CHECKPOINT:
        raise ConfigError(f"train.race.iters must be a multiple of {CHECKPOINT} with method apgd, so every draw adapts its step")
    if not 0 <= r.uncompleted <= r.pool:
        raise ConfigError(f"train.race.uncompleted must be in [0, pool = {r.pool}], got {r.uncompleted}")
    task = task_for(model)
    clips = _task_clips(recipe, model, "train")
    train_ds = InMemory(Subset(clips, race_split(recipe, len(clips), eval_videos or t.eval_videos)[0]))
    detector = load_defense(str(init)).detector.to(dev)
    for param in detector.parameters():
        param.requires_grad_(True)
    mean = model.spec.mean
    bpda = _patchzero(recipe, detector, mean, bpda=True).to(dev)
    bpda_open = race_view(_patchzero(recipe, detector, mean, bpda=True), r.uncompleted_view).to(dev)  # the slots' view
    optimizer = torch.optim.Adam(detector.parameters(), lr=t.lr)
    config = run_config(recipe, stage=2, backbone=recipe.defense.backbone, init=str(init), race=dataclasses.asdict(r))
    run = Run(Path(t.output) / "detector-stage2-state.pt", detector, optimizer, config, main=ddp.main)
    shape = tuple(train_ds[0][0].shape[1:])

    def make(video: int, rng: np.random.Generator) -> PoolEntry:
        mask, _ = draw_masks(recipe, shape, [rng])
        return PoolEntry(video, torch.from_numpy(mask[0]), torch.from_numpy(rng.random((3, *shape), dtype=np.float32)))

    pool = PatchPool.fresh(r.pool, make, len(train_ds), keyed_rng(t.seed, "pool", 0))
    ema = AveragedModel(detector, multi_avg_fn=get_ema_multi_avg_fn(r.average), use_buffers=True) if r.average else None
    start_run(run, resume)
    if run.buffers:
        pool.load_state_dict(run.buffers["pool"])
        if ema is not None:
            ema.load_state_dict(run.buffers["ema"])
    none = torch.zeros(0, dtype=torch.long)
    hard = {k: run.buffers.get(k, none) for k in ("hard", "hard_task")}  # mined clips (indices) of each source
    # gathered only when a checkpoint is written
    run.collect = lambda: {"pool": pool.state_dict(), **hard, **({"ema": ema.state_dict()} if ema is not None else {})}
    judged = ema.module if ema is not None else detector  # what the held-out race scores and what is kept
    bpda_judged = _patchzero(recipe, judged, mean, bpda=True).to(dev) if ema is not None else bpda
    judged_open = race_view(_patchzero(recipe, judged, mean, bpda=True), r.uncompleted_view).to(dev) if ema is not None else bpda_open
    net = data_parallel(detector, ddp, dev)
    share = ddp.rows(r.draw)  # this rank continues the attacks of these drawn entries; every rank keeps the whole pool
    workers = recipe.data.workers
    bases = benign_bases(recipe, train_ds, r.benign + r.procedural, run.step)
    benign_eval = held_out_benign(recipe, 32).to(dev)
    do = None
    if r.do:
        cached = len(recipe_dataset(recipe, "train")) if t.cache_videos is None else len(recipe_dataset(recipe, "train", subset=t.cache_videos))
        do = step_loader(AttackCache(t.cache, cached * t.attacked_per_video), r.do, t.seed, run.step, t.steps, "attacked", workers)
    ex, ey, emask, ez0 = held_out_race(recipe, model, eval_videos or t.eval_videos, dev)
    best_path = Path(t.output) / "detector-stage2-best.pt"
    footage = FootageClips(recipe.train.patches.footage, "train") if r.hard and recipe.train.patches.footage else None
    if r.hard and footage is None:
        raise ConfigError("train.race.hard mines real footage: set train.patches.footage")

    sources = {"hard": (footage, r.hard), "hard_task": (train_ds, r.hard_task)}

    def mined(step: int, key: str) -> Tensor:
        """This step's ``count`` clean clips of source ``key`` (footage or the task's training clips),
        from the ``HARD_KEEP`` of ``HARD_SCAN`` the detector came nearest to masking when last mined."""
        ds, count = sources[key]
        keys = () if key == "hard" else (1,)  # the footage keeps the draws it had before the task's clips were mined

        def take(idx: Sequence[int]) -> Tensor:
            return torch.stack([ds[int(i)][0][:, : shape[0]] for i in idx])  # footage may be longer

        if step % HARD_EVERY == 0 or not len(hard[key]):
            scan = keyed_rng(t.seed, "mine", step, *keys).choice(len(ds), size=min(HARD_SCAN, len(ds)), replace=False)
            hard[key] = torch.from_numpy(scan)[hardest_benign(bpda, take(scan).to(dev), HARD_KEEP).cpu()]
        pick = keyed_rng(t.seed, "hard", step, *keys).choice(len(hard[key]), size=count, replace=count > len(hard[key]))
        return take(hard[key][pick].tolist())

    def step_fn(step: int) -> dict[str, float]:
        rng = keyed_rng(t.seed, "stage2", step)
        idx = sorted(pool.draw(r.draw, rng), key=lambda i: i < r.uncompleted)  # the completion-blind slots last
        entries = [pool.entries[i] for i in idx]
        items = [train_ds[e.video] for e in entries]
        x = torch.stack([c for c, _ in items]).to(dev)
        y = task.targets(items, dev)
        m = torch.stack([e.mask for e in entries]).to(dev)
        detector.eval()
        z0 = torch.stack([e.content for e in entries]).to(dev)
        steps = torch.tensor([e.step or 2 * recipe.attack.step for e in entries])
        if r.method == "pgd":  # each patch's step, halved every step_halflife iterations it has accumulated
            ages = torch.tensor([e.iters // r.step_halflife if r.step_halflife else 0 for e in entries])
            steps = recipe.attack.step * 0.5 ** ages.clamp(max=STEP_HALVINGS)
        split = share.start + sum(i >= r.uncompleted for i in idx[share])
        blind = (r.uncompleted_iters or r.iters, r.uncompleted_method or r.method)
        zs, ss, done = [], [], []
        for rows, defense, (iters, method) in ((slice(share.start, split), bpda, (r.iters, r.method)),
                                               (slice(split, share.stop), bpda_open, blind)):  # fmt: skip
            if rows.stop > rows.start:
                kept = method == r.method == "apgd"  # the entry's decayed step goes on; otherwise apgd starts afresh
                z, _, state = patch_attack(model, defense, x[rows], y[rows], m[rows], z0[rows], iters,
                                           steps[rows].to(dev) if method == "pgd" else recipe.attack.step, method,
                                           steps=steps[rows] if kept else None)  # fmt: skip
                zs.append(z.detach())
                ss.append(state.step.to(dev) if kept else steps[rows].to(dev))
                done.append(torch.full((rows.stop - rows.start,), iters, device=dev))
        z = ddp.gather(torch.cat(zs), len(x))
        steps = ddp.gather(torch.cat(ss), len(x)).cpu()
        done = ddp.gather(torch.cat(done), len(x)).cpu()
        adv = x * (1 - m) + m * z
        with torch.no_grad():
            fooled = task.fooled(bpda(adv), y).tolist()
        for e, content, f, s, n in zip(entries, z.cpu(), fooled, steps.tolist(), done.tolist()):
            e.content, e.iters, e.draws, e.fooled = content, e.iters + int(n), e.draws + 1, bool(f)
            e.step = s if r.method == "apgd" else 0.0
        pool.refresh(int(r.refresh) + int(rng.random() < r.refresh % 1), rng)
        xb, mb = paste_procedural(recipe, bases(), r.procedural, rng)
        clips, masks = [adv, xb.to(dev)], [m, mb.to(dev)]
        if do is not None:
            xd, md = next(do)  # cached clips may be longer than the recipe's: their first frames
            clips, masks = clips + [xd[:, :, : shape[0]].to(dev)], masks + [md[:, :, : shape[0]].to(dev)]
        for key in (k for k, (_, count) in sources.items() if count):
            xh = mined(step, key).to(dev)
            clips, masks = clips + [xh], masks + [torch.zeros_like(xh[:, :1])]
        term = (lambda: r.task_weight * task.loss(bpda(adv), y).mean()) if r.task_weight else None
        metrics = _detector_step(
            detector, optimizer, torch.cat(clips), torch.cat(masks), t.aux_weight, term, net, ddp, (r.edge_weight, r.edge_px)
        )
        if ema is not None:
            ema.update_parameters(detector)
        return {**metrics, "pool_fooled": float(np.mean(fooled)), "pool_success": pool.success(),
                "pool_iters": float(np.mean([e.iters for e in pool.entries]))}  # fmt: skip

    def eval_fn(step: int) -> dict[str, float]:
        scores = race_score(model, bpda_judged, ex, ey, emask, ez0, r.eval_iters, recipe.attack.step, r.eval_method,
                            through=judged_open if r.eval_uncompleted else None)  # fmt: skip
        scores["benign_fpr"] = benign_fpr(bpda_judged, benign_eval)
        clean, robust = scores[f"clean_{task.metric}"], scores[f"robust_{task.metric}"]
        ok = clean >= run.extra["start_clean"] - 0.02 and max(scores["benign_fpr"], scores["clean_fpr"]) <= r.max_benign_fpr
        value = robust + 0.01 * scores["race_recall"] if ok else -1.0
        if value > run.extra.get("best", -1.0):
            run.extra.update(best=value, best_step=step, stale=0)
            if ddp.main:
                _save_detector(recipe, judged, mean, best_path, {"seed": t.seed, "stage": 2, "steps": step, "metrics": scores})
        else:
            run.extra["stale"] = run.extra.get("stale", 0) + 1
        return scores

    if "start_clean" not in run.extra:
        bpda.eval()
        with torch.no_grad():
            run.extra["start_clean"] = task.score(bpda(ex), ey)
    metrics = train_loop(
        run, t.steps, t.seed, dev, step_fn, eval_fn, t.eval_every, t.checkpoint_every, on_progress, _converged(t.patience)
    )
    stopped = run.step < t.steps
    if not ddp.main:
        return TrainResult(Path(t.output) / "detector-stage2.pt", "", run.step, metrics, run.extra.get("history", []), stopped)
    kept = judged  # with no checkpoint inside the guards, the last of what the race scored (the average, if any)
    if best_path.is_file():
        kept.load_state_dict(load_defense(best_path).detector.state_dict())
    best = next((h for h in run.extra.get("history", []) if h["step"] == run.extra.get("best_step")), metrics)
    path = Path(t.output) / "detector-stage2.pt"
    meta = {
        "command": command, "seed": t.seed, "stage": 2, "steps": run.step, "best_step": run.extra.get("best_step"),
        "init": str(init), "metrics": {**metrics, **best}, "stopped_early": stopped, "recipe": recipe_to_dict(recipe),
        "history": run.extra.get("history", []),
    }  # fmt: skip
    sha = _save_detector(recipe, kept, mean, path, meta)
    return TrainResult(path, sha, run.step, {**metrics, **best}, run.extra.get("history", []), stopped, run.extra.get("best_step"))
