"""The evaluation grid behind the paper's Tables 3, 4 and 5a: defenses x attack settings x videos.

:func:`evaluate` runs every defense under every attack setting of a recipe and appends per-sample
results to ``samples.jsonl`` as they complete, so an interrupted run resumes where it stopped.

Attack modes per defense. ``do`` (defense-oblivious) patches are crafted once against the bare model
and shared by every defense, so the columns compare on the same inputs. ``bpda`` (adaptive) patches
are crafted through the defense: PatchZero's own BPDA, and a straight-through estimator (exact
forward, identity backward) for JPEG and H.264. ``none`` and ``gt`` get the ``do`` patch only: an
adaptive attack on the bare model *is* the DO attack, and the GT mask repaints the whole patch, so
its output does not depend on the patch's pixels at all.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..attacks import METHODS, MODES, MaskedAttack, MaskedFrameAttack, patch_mask
from ..data import BoxClips, recipe_clips
from ..defenses import ADAPTIVE, DEFENSES, GTMask, build_defenses
from ..errors import ConfigError, InputError
from ..metrics import PixelCounts, topk_correct
from ..models import build_model
from ..patchzero import build_defense
from ..recipes import AttackSection, Recipe, recipe_to_dict
from .adaptive import check_variants, variant
from .report import Report, SampleLog, fingerprint_of, record_key, results_fingerprints


@dataclass(frozen=True)
class AttackSetting:
    """One column of the grid: no attack (all ``None``) or a method, a patch area and a mode."""

    method: str | None = None
    area: float | None = None
    mode: str | None = None
    variant: str = ""  # an adaptive variant (:mod:`.adaptive`); "" = the plain attack

    @property
    def key(self) -> str:
        if self.method is None:
            return "clean"
        return f"{self.method}-{self.area:g}-{self.mode}" + (f"-{self.variant}" if self.variant else "")


CLEAN = AttackSetting()


def _check(recipe: Recipe) -> None:
    ev, at = recipe.evaluate, recipe.attack
    for where, values, allowed in (
        ("evaluate.defenses", ev.defenses, DEFENSES),
        ("attack.methods", at.methods, METHODS),
        ("attack.modes", at.modes, MODES),
    ):
        for v in values:
            if v not in allowed:
                raise ConfigError(f"{where}: unknown {v!r} (expected one of: {', '.join(allowed)})")
        if len(set(values)) != len(values):
            raise ConfigError(f"{where}: duplicate entries in {values}")
    for a in at.areas:
        if not 0 < a < 1:
            raise ConfigError(f"attack.areas: {a} is not a fraction of the frame in (0, 1)")
    if ev.max_videos is not None and ev.max_videos < 1:
        raise ConfigError(f"evaluate.max_videos: expected >= 1, got {ev.max_videos}")
    check_variants(ev.bpda_variants, ev.transfer_detector)


def grid(recipe: Recipe) -> list[tuple[str, AttackSetting]]:
    """Every ``(defense, setting)`` cell the recipe asks for, in the order they are computed."""
    at = recipe.attack
    cells = [(d, CLEAN) for d in recipe.evaluate.defenses]
    for method, area in product(at.methods, at.areas):
        cells += [(d, AttackSetting(method, area, "do")) for d in recipe.evaluate.defenses]
        if "bpda" in at.modes:
            cells += [(d, AttackSetting(method, area, "bpda")) for d in recipe.evaluate.defenses if d in ADAPTIVE]
            if "patchzero" in recipe.evaluate.defenses:
                cells += [("patchzero", AttackSetting(method, area, "bpda", v)) for v in recipe.evaluate.bpda_variants]
    if "do" not in at.modes:
        cells = [(d, s) for d, s in cells if s.mode != "do" or d not in ADAPTIVE]
    return cells


def _seed(*parts: Any) -> int:
    """A 31-bit seed from any hashable parts (stable across runs and platforms)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:4], "little") & 0x7FFFFFFF


def video_masks(videos: Sequence[int], shape: tuple[int, int, int], area: float, seed: int, moving: bool = False) -> Tensor:
    """True patch masks ``(N, 1, T, H, W)`` for the given video indices.

    Each video's patch location depends only on ``(seed, video, area)``: the same for every defense,
    mode and batch composition.
    """
    masks = [patch_mask(shape, area, np.random.default_rng(_seed(seed, v, area)), moving=moving) for v in videos]
    return torch.from_numpy(np.stack(masks)[:, None]).float()


def _video_name(dataset: Any, index: int) -> str:
    """A stable name for a video: its file stem for :class:`~streamguard.data.UCF101Clips`, else its index."""
    videos = getattr(getattr(dataset, "clips", dataset), "videos", None)
    return Path(videos[index][0]).stem if videos is not None else str(index)


def load_dataset(recipe: Recipe) -> Any:
    """The recipe's evaluation clips (``data.split``, ``data.subset``)."""
    return recipe_clips(recipe.data, recipe.data.split, subset=recipe.data.subset)


@dataclass
class _Batch:
    videos: list[int]
    names: list[str]
    x: Tensor  # (N, 3, T, H, W)
    y: Any  # (N,) labels; frame detectors: N lists of T {"boxes", "labels"} dicts


class _Grid:
    """One evaluation run: computes the missing cells of each chunk of videos and logs them."""

    def __init__(self, recipe: Recipe, model: nn.Module, defenses: dict[str, nn.Module], log: SampleLog) -> None:
        self.recipe, self.model, self.defenses, self.log = recipe, model, defenses, log
        self.cells = grid(recipe)
        self.device = next(model.parameters()).device
        self.transfer = self._transfer_detector()

    def _transfer_detector(self) -> nn.Module | None:
        """The "transfer" variant's detector: ``evaluate.transfer_detector`` with the recipe's defense settings."""
        ev = self.recipe.evaluate
        if "transfer" not in ev.bpda_variants or "patchzero" not in self.defenses:
            return None
        return build_defense(self.recipe.defense, weights=ev.transfer_detector, mean=self.model.spec.mean).to(self.device).eval()

    def missing(self, defense: str, setting: AttackSetting, videos: Sequence[int]) -> list[int]:
        return [v for v in videos if record_key(defense, setting.key, v) not in self.log.done]

    def run_chunk(self, chunk: int, batch: _Batch, on_cell: Callable[[], None]) -> None:
        at = self.recipe.attack
        shape = tuple(batch.x.shape[2:])
        for defense, setting in self.cells:
            if setting == CLEAN and self.missing(defense, setting, batch.videos):
                self.score(defense, setting, batch, batch.x, torch.zeros_like(batch.x[:, :1]))
                on_cell()
        for mi, method in enumerate(at.methods):
            for ai, area in enumerate(at.areas):
                mask = video_masks(batch.videos, shape, area, at.seed, at.moving)
                for mode, name in [("do", ""), ("bpda", ""), *(("bpda", v) for v in self.recipe.evaluate.bpda_variants)]:
                    setting = AttackSetting(method, area, mode, name)
                    todo = [d for d, s in self.cells if s == setting and self.missing(d, s, batch.videos)]
                    # DO: one patch against the bare model for every defense; BPDA: one per defense
                    shared = self.attack(setting, None, batch, mask, _seed(at.seed, chunk, mi, ai)) if mode == "do" and todo else None
                    for defense in todo:
                        seed = _seed(at.seed, chunk, mi, ai, defense)
                        x_adv = shared if shared is not None else self.attack(setting, self.defenses[defense], batch, mask, seed)
                        self.score(defense, setting, batch, x_adv, mask)
                        on_cell()

    def attack(self, setting: AttackSetting, defense: nn.Module | None, batch: _Batch, mask: Tensor, seed: int) -> Tensor:
        with variant(setting.variant, defense, self.recipe.attack, self.transfer) as (through, section):
            return self.generate(setting, through if setting.mode == "bpda" else None, section, batch, mask, seed)

    def generate(self, setting: AttackSetting, defense: nn.Module | None, section: AttackSection, batch: _Batch,
                 mask: Tensor, seed: int) -> Tensor:  # fmt: skip
        attack = MaskedAttack.from_section(self.model, section, setting.method, setting.mode, defense=defense, seed=seed,
                                           device=str(self.device))  # fmt: skip
        return torch.from_numpy(attack.generate(batch.x.numpy(), batch.y.numpy(), mask.numpy()))

    @torch.no_grad()
    def score(self, defense: str, setting: AttackSetting, batch: _Batch, x: Tensor, mask: Tensor) -> None:
        d = self.defenses[defense]
        d.reset()
        x = x.to(self.device)
        if isinstance(d, GTMask):
            x_clean, pred_mask = d.sanitize(x, mask=mask.to(self.device))
        else:
            x_clean, pred_mask = d.sanitize(x)
        outcomes = self.outcomes(x_clean, batch)
        todo = set(self.missing(defense, setting, batch.videos))
        records = []
        for i, v in enumerate(batch.videos):
            if v not in todo:
                continue
            rec = {
                "defense": defense,
                "attack": setting.key,
                "method": setting.method,
                "area": setting.area,
                "mode": setting.mode,
                "video": v,
                "name": batch.names[i],
                **outcomes[i],
            }
            if defense == "patchzero":
                counts = PixelCounts.from_masks(pred_mask[i].cpu() > 0.5, mask[i] > 0.5)
                rec["pixels"] = [counts.tp, counts.fp, counts.fn, counts.tn]
            records.append(rec)
        self.log.append(records)

    def outcomes(self, x_clean: Tensor, batch: _Batch) -> list[dict[str, Any]]:
        """Per clip: label, prediction, top-1 and top-5 hits of the classifier on sanitized clips."""
        logits = self.model(x_clean).float().cpu()
        top1, top5, preds = topk_correct(logits, batch.y, 1), topk_correct(logits, batch.y, 5), logits.argmax(1)
        return [
            {"label": int(y), "pred": int(p), "correct": bool(c1), "top5": bool(c5)}
            for y, p, c1, c5 in zip(batch.y, preds, top1, top5)
        ]


def _box_lists(d: dict[str, Tensor]) -> dict[str, list]:
    return {k: v.detach().cpu().tolist() for k, v in d.items() if k in ("boxes", "labels", "scores")}


class _FrameGrid(_Grid):
    """The same grid for a per-frame detector: masked PGD on the detector's loss for the true boxes
    (:class:`~streamguard.attacks.MaskedFrameAttack`), scored by box AP over every frame."""

    def generate(self, setting: AttackSetting, defense: nn.Module | None, section: AttackSection, batch: _Batch,
                 mask: Tensor, seed: int) -> Tensor:  # fmt: skip
        attack = MaskedFrameAttack.from_section(self.model, section, setting.mode, defense=defense, seed=seed,
                                                device=str(self.device))  # fmt: skip
        return torch.from_numpy(attack.generate(batch.x.numpy(), batch.y, mask.numpy()))

    def outcomes(self, x_clean: Tensor, batch: _Batch) -> list[dict[str, Any]]:
        """Per clip: the detector's boxes on each sanitized frame and the true boxes."""
        t = x_clean.shape[2]
        frames = x_clean.transpose(1, 2).flatten(0, 1)
        preds = [p for start in range(0, len(frames), t) for p in self.model(list(frames[start : start + t]))]
        return [
            {"frames": [_box_lists(p) for p in preds[i * t : (i + 1) * t]], "targets": [_box_lists(g) for g in targets]}
            for i, targets in enumerate(batch.y)
        ]


def _order(n: int, max_videos: int | None, seed: int) -> list[int]:
    """A seeded permutation of the data set, cut to ``max_videos``: a longer run extends a shorter one."""
    return [int(v) for v in np.random.default_rng(seed).permutation(n)[:max_videos]]


def evaluation_videos(recipe: Recipe, dataset: Any) -> list[tuple[int, str]]:
    """``(index, name)`` of the videos :func:`evaluate` runs on ``dataset``, in its seeded order."""
    return [(v, _video_name(dataset, v)) for v in _order(len(dataset), recipe.evaluate.max_videos, recipe.data.seed)]


def _chunks(videos: list[int], size: int) -> Iterator[tuple[int, list[int]]]:
    for c in range(0, len(videos), size):
        yield c // size, videos[c : c + size]


def parse_shard(text: str) -> tuple[int, int]:
    """``"K/N"`` as ``(K, N)`` with ``0 <= K < N``; ``ConfigError`` otherwise."""
    k, sep, n = text.partition("/")
    try:
        shard = (int(k), int(n)) if sep else None
    except ValueError:
        shard = None
    if shard is None:
        raise ConfigError(f"--shard {text!r}: expected K/N, e.g. 0/4")
    check_shard(shard)
    return shard


def check_shard(shard: tuple[int, int]) -> None:
    k, n = shard
    if not (n >= 1 and 0 <= k < n):
        raise ConfigError(f"shard {k}/{n}: expected 0 <= K < N and N >= 1")


def shard_dir(output: str | Path, shard: tuple[int, int]) -> Path:
    """Where shard ``(K, N)`` of an evaluation writes: ``<output>/shard-K-of-N``."""
    return Path(output) / f"shard-{shard[0]}-of-{shard[1]}"


def shard_chunks(videos: list[int], size: int, shard: tuple[int, int] | None) -> list[tuple[int, list[int]]]:
    """The chunks of ``size`` videos (in evaluation order) that shard ``(K, N)`` runs: every N-th one from K.

    Sharding is by chunk, not by video, because a chunk is one attack batch: its index seeds the
    attacks (``_seed(attack.seed, chunk, ...)``) and its videos are attacked together, so only a
    shard that keeps the single run's chunks (indices and composition) reproduces its results.
    """
    chunks = list(_chunks(videos, size))
    if shard is None:
        return chunks
    check_shard(shard)
    return [(c, ids) for c, ids in chunks if c % shard[1] == shard[0]]


def evaluate(
    recipe: Recipe,
    *,
    on_progress: Callable[[int, int], None] | None = None,
    resume: bool = True,
    model: nn.Module | None = None,
    patchzero: nn.Module | None = None,
    dataset: Any = None,
    device: str | torch.device = "cpu",
    shard: tuple[int, int] | None = None,
) -> Report:
    """Run the recipe's defenses × attacks grid on its clip classifier or per-frame detector; returns
    the :class:`Report` and writes it to ``evaluate.output/report.json``.

    Per-sample results are appended to ``evaluate.output/samples.jsonl`` as each cell of a chunk of
    ``attack.batch`` videos completes; with ``resume`` the samples already there are not recomputed.
    ``model``, ``patchzero`` and ``dataset`` (a sequence of ``(clip (3, T, H, W), label)``) replace the
    ones the recipe names. ``on_progress(done, total)`` counts per-sample records. Models, defenses and
    attacks run on ``device``.

    Results are deterministic given the recipe (seeds: ``attack.seed`` for patch locations and attack
    initialisations, ``data.seed`` for the video order) and the video count.

    ``shard=(K, N)`` runs only every N-th chunk of ``attack.batch`` videos from chunk K
    (:func:`shard_chunks`: the same chunks, seeds and results as a single run) and writes to
    ``evaluate.output/shard-K-of-N/``; its report's settings say so under ``"shard"`` (with the
    whole run's video order), and :func:`~streamguard.evaluation.report.merge_reports` joins the N
    shard reports into the single run's report.
    """
    _check(recipe)
    if shard is not None:
        check_shard(shard)
    if model is None:
        model = build_model(recipe.model.name, recipe.model.num_classes, recipe.model.weights)
    frames = model.spec.task == "frame"
    if frames and set(recipe.attack.methods) != {"pgd"}:
        raise ConfigError(f"attack.methods: a frame detector is attacked with masked PGD only, got {recipe.attack.methods}")
    if frames and any("restarts" in v.split("+") for v in recipe.evaluate.bpda_variants):
        raise ConfigError("evaluate.bpda_variants: 'restarts' needs a random start, which the frame detector's attack has not")
    model = model.to(device).eval()
    defenses = {name: d.to(device) for name, d in build_defenses(recipe, model, patchzero).items()}
    if dataset is None:
        dataset = BoxClips(load_dataset(recipe), model.spec.num_classes) if frames else load_dataset(recipe)
    videos = [v for v, _ in evaluation_videos(recipe, dataset)]
    if not videos:
        raise InputError(f"{recipe.data.root}: no test videos")

    parts = results_fingerprints(recipe, model, defenses)
    settings = {
        "recipe": recipe_to_dict(recipe),
        "fingerprint": fingerprint_of(parts),
        "parts": parts,
        "seed": recipe.attack.seed,
        "data_seed": recipe.data.seed,
        "model": model.spec.name,
        "cells": [[d, s.key] for d, s in grid(recipe)],
    }
    chunks = shard_chunks(videos, recipe.attack.batch, shard)
    order, videos = videos, [v for _, ids in chunks for v in ids]
    if shard is not None:
        settings["shard"] = {"index": shard[0], "count": shard[1], "order": order}
    out = Path(recipe.evaluate.output) if shard is None else shard_dir(recipe.evaluate.output, shard)
    log = SampleLog(out / "samples.jsonl", parts, {"recipe": settings["recipe"]}, resume)
    runner = (_FrameGrid if frames else _Grid)(recipe, model, defenses, log)
    wanted, cells = set(videos), {(d, s.key) for d, s in runner.cells}
    total = len(cells) * len(videos)

    def progress() -> None:  # the log may hold other videos' and defenses' records too: those are not this run's
        if on_progress is not None:
            on_progress(sum(1 for d, a, v in log.done if v in wanted and (d, a) in cells), total)

    progress()
    for chunk, ids in chunks:
        todo = [v for v in ids if any(runner.missing(d, s, [v]) for d, s in runner.cells)]
        if todo:
            runner.run_chunk(chunk, _load_batch(dataset, todo), progress)

    samples = [r for r in log.records if r["video"] in wanted and r["defense"] in defenses]
    position = {v: i for i, v in enumerate(videos)}
    samples.sort(key=lambda r: (position[r["video"]], r["defense"], r["attack"]))
    report = Report({**settings, "videos": videos}, samples)
    report.save(out / "report.json")
    return report


def _load_batch(dataset: Any, videos: list[int]) -> _Batch:
    items = [dataset[v] for v in videos]
    x = torch.stack([torch.as_tensor(c, dtype=torch.float32) for c, _ in items])
    labels = [label for _, label in items]
    y = labels if isinstance(labels[0], list) else torch.tensor([int(label) for label in labels])
    return _Batch(videos, [_video_name(dataset, v) for v in videos], x, y)
