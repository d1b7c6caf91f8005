"""Metrics, baseline defenses, and the evaluation grid behind the paper's Tables 4 and 5a.

* Metrics: top-k accuracy, detection AP / AP50 / AP75 (torchmetrics, pycocotools backend) and the
  patch detector's pixel metrics (:class:`PixelCounts`).
* Baselines implement the same preprocessing protocol as :class:`~streamguard.detector.PatchZero`:
  ``sanitize(x) -> (x_clean, mask)`` without gradients, ``reset()``, and ``forward(x)`` for attacks
  through the defense. Adversarial training, the other baseline of the paper, changes the
  downstream model's weights rather than its input: train it with the training recipe and evaluate it
  with ``model.weights`` pointing at the result and the ``none`` defense.
* :func:`evaluate` runs every defense under every attack setting of a recipe and appends per-sample
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
import io
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Any

import av
import numpy as np
import torch
from rich.table import Table
from torch import Tensor, nn

from .attacks import MaskedAttack, MaskedFrameAttack, patch_mask
from .checkpoints import DEFAULT_DETECTOR, atomic_write_text
from .data import BoxClips, recipe_clips
from .detector import load_defense
from .errors import ConfigError, InputError
from .models import build_model
from .recipes import Recipe, recipe_to_dict

# ---------------------------------------------------------------- metrics


def topk_correct(logits: Tensor, labels: Tensor, k: int) -> Tensor:
    """``(N, K)`` logits, ``(N,)`` labels -> ``(N,)`` bool: the label is among the ``k`` highest scores."""
    k = min(k, logits.shape[1])
    return (logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1)


def topk_accuracy(logits: Tensor, labels: Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Fraction of samples whose label is in the top ``k`` predictions, for each ``k``."""
    return {k: topk_correct(logits, labels, k).float().mean().item() for k in ks}


def detection_ap(preds: list[dict[str, Tensor]], targets: list[dict[str, Tensor]]) -> dict[str, float]:
    """COCO box AP (mean over IoU 0.50:0.95), AP50 and AP75.

    ``preds``: per image ``{"boxes" (M, 4) xyxy, "scores" (M,), "labels" (M,)}`` (torchvision's
    detector output); ``targets``: ``{"boxes", "labels"}``.
    """
    from torchmetrics.detection import MeanAveragePrecision

    metric = MeanAveragePrecision(iou_type="bbox", backend="pycocotools")
    metric.update(preds, targets)
    result = metric.compute()
    return {"ap": result["map"].item(), "ap50": result["map_50"].item(), "ap75": result["map_75"].item()}


def _ratio(num: int, den: int) -> float:
    return num / den if den else float("nan")


@dataclass(frozen=True)
class PixelCounts:
    """Confusion counts of predicted vs. true patch pixels, summed over a data set (``a + b``).

    Ratios with an empty denominator (precision with no predicted pixel, recall on benign clips) are NaN.
    """

    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    @classmethod
    def from_masks(cls, pred: Tensor, true: Tensor) -> PixelCounts:
        """Counts from 0/1 masks of any (equal) shape."""
        p, t = pred.bool(), true.bool()
        return cls(int((p & t).sum()), int((p & ~t).sum()), int((~p & t).sum()), int((~p & ~t).sum()))

    def __add__(self, other: PixelCounts) -> PixelCounts:
        return PixelCounts(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn, self.tn + other.tn)

    @property
    def precision(self) -> float:
        return _ratio(self.tp, self.tp + self.fp)

    @property
    def recall(self) -> float:
        return _ratio(self.tp, self.tp + self.fn)

    @property
    def accuracy(self) -> float:
        return _ratio(self.tp + self.tn, self.tp + self.fp + self.fn + self.tn)

    @property
    def f1(self) -> float:
        return _ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn)

    @property
    def fpr(self) -> float:
        return _ratio(self.fp, self.fp + self.tn)


# ---------------------------------------------------------------- baselines


class Preprocessor(nn.Module):
    """A baseline defense: a non-differentiable ``transform`` of the pixels.

    ``forward`` is the straight-through (BPDA) version used by attacks: exact forward, identity backward.
    It always is; ``bpda`` only marks the module as attackable in ``MaskedAttack(mode="bpda")``.
    """

    bpda = True

    def transform(self, x: Tensor) -> Tensor:
        return x

    def reset(self) -> None:
        """Baselines keep no state between videos."""

    @torch.no_grad()
    def sanitize(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``x`` ``(N, 3, T, H, W)`` or ``(N, 3, H, W)`` in [0, 1] -> ``(x_clean, mask)``; baselines mark no pixel."""
        return self.transform(x), torch.zeros_like(x[:, :1])

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            y = self.transform(x)
        return x + (y - x).detach()


class NoDefense(Preprocessor):
    """The undefended model: the identity."""

    def forward(self, x: Tensor) -> Tensor:
        return x


class GTMask(Preprocessor):
    """Repaint the *true* patch region with the dataset mean: the approach's upper bound.

    The true mask ``(N, 1, T, H, W)`` / ``(N, 1, H, W)`` is given per call (``sanitize(x, mask=m)``) or
    set for the following calls with :meth:`set_mask` (``forward`` for attacks uses the latter).
    """

    def __init__(self, mean: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32), persistent=False)
        self.true_mask: Tensor | None = None

    def set_mask(self, mask: Tensor | None) -> None:
        self.true_mask = mask

    def reset(self) -> None:
        self.true_mask = None

    def repaint(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        mask = self.true_mask if mask is None else mask
        if mask is None:
            raise InputError("GTMask needs the true patch mask: call set_mask(m) or pass sanitize(x, mask=m)")
        if mask.shape[0] != x.shape[0] or mask.shape[2:] != x.shape[2:]:
            raise InputError(f"GTMask: mask of shape {tuple(mask.shape)} does not match clips of shape {tuple(x.shape)}")
        mean = self.mean.view((1, 3) + (1,) * (x.dim() - 2)).to(x)
        mask = mask.to(x)
        return x * (1 - mask) + mean * mask

    @torch.no_grad()
    def sanitize(self, x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        x_clean = self.repaint(x, mask)
        return x_clean, (self.true_mask if mask is None else mask).to(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.repaint(x)


class JpegDefense(Preprocessor):
    """JPEG compression of every frame (ART's ``JpegCompression``; Dziugaite et al. 2016)."""

    def __init__(self, quality: int = 75) -> None:
        super().__init__()
        from art.defences.preprocessor import JpegCompression

        if not 1 <= quality <= 95:
            raise ConfigError(f"evaluate.jpeg_quality: expected 1..95, got {quality}")
        self.quality = quality
        self.jpeg = JpegCompression(clip_values=(0.0, 1.0), quality=quality, channels_first=True, apply_predict=True)

    def transform(self, x: Tensor) -> Tensor:
        out, _ = self.jpeg(x.detach().clamp(0, 1).cpu().numpy().astype(np.float32))
        return torch.from_numpy(np.ascontiguousarray(out)).to(x)


def h264_roundtrip(frames: np.ndarray, crf: int, preset: str = "medium", fps: int = 25) -> np.ndarray:
    """Encode ``(T, H, W, 3)`` uint8 RGB frames with libx264 (yuv420p, CRF) in memory and decode them back.

    Odd sizes are edge-padded to even (4:2:0 needs it) and cropped back. One encoder thread and
    x264's C code path (``asm=0``): its SIMD macroblock-tree code occasionally gives a different
    bitstream for the same input, which would make evaluations irreproducible.
    """
    t, h, w, _ = frames.shape
    padded = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = padded.shape[2], padded.shape[1], "yuv420p"
        stream.options = {"crf": str(crf), "preset": preset, "threads": "1", "x264-params": "asm=0"}
        for frame in padded:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        out.mux(stream.encode())
    buf.seek(0)
    with av.open(buf, "r") as inp:
        decoded = np.stack([f.to_ndarray(format="rgb24") for f in inp.decode(video=0)])
    if len(decoded) != t:
        raise InputError(f"H.264 round trip returned {len(decoded)} frames for {t}")
    return decoded[:, :h, :w]


class VideoCompression(Preprocessor):
    """H.264 re-encoding of each clip (libx264 through PyAV, in memory, at a given CRF).

    Frames ``(N, 3, H, W)`` are encoded as one-frame videos (intra coding only).
    """

    def __init__(self, crf: int = 28, preset: str = "medium") -> None:
        super().__init__()
        if not 0 <= crf <= 51:
            raise ConfigError(f"evaluate.h264_crf: expected 0..51, got {crf}")
        self.crf, self.preset = crf, preset

    def transform(self, x: Tensor) -> Tensor:
        clips = x if x.dim() == 5 else x[:, :, None]
        u8 = (clips.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 4, 1).cpu().numpy()
        out = np.stack([h264_roundtrip(c, self.crf, self.preset) for c in u8])
        y = torch.from_numpy(out).permute(0, 4, 1, 2, 3).to(x) / 255
        return y if x.dim() == 5 else y[:, :, 0]


# ---------------------------------------------------------------- the grid

DEFENSES = ("none", "gt", "jpeg", "h264", "patchzero")
METHODS = ("pgd", "apgd", "cw")
MODES = ("do", "bpda")
ADAPTIVE = ("jpeg", "h264", "patchzero")  # defenses attacked through in bpda mode


@dataclass(frozen=True)
class AttackSetting:
    """One column of the grid: no attack (all ``None``) or a method, a patch area and a mode."""

    method: str | None = None
    area: float | None = None
    mode: str | None = None

    @property
    def key(self) -> str:
        return "clean" if self.method is None else f"{self.method}-{self.area:g}-{self.mode}"


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


def grid(recipe: Recipe) -> list[tuple[str, AttackSetting]]:
    """Every ``(defense, setting)`` cell the recipe asks for, in the order they are computed."""
    at = recipe.attack
    cells = [(d, CLEAN) for d in recipe.evaluate.defenses]
    for method, area in product(at.methods, at.areas):
        cells += [(d, AttackSetting(method, area, "do")) for d in recipe.evaluate.defenses]
        if "bpda" in at.modes:
            cells += [(d, AttackSetting(method, area, "bpda")) for d in recipe.evaluate.defenses if d in ADAPTIVE]
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


def _weights_digest(modules: Sequence[nn.Module]) -> str:
    """sha256 of the modules' parameters and buffers, so that a retrained model or detector behind
    the same name or path never resumes its predecessor's results."""
    digest = hashlib.sha256()
    for module in modules:
        for name, tensor in module.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _fingerprint(recipe: Recipe, modules: Sequence[nn.Module]) -> str:
    """What decides the per-sample results: the weights and the recipe but its output folder and video count."""
    d = recipe_to_dict(recipe)
    keep = {k: d[k] for k in ("model", "defense", "data", "attack")}
    keep["evaluate"] = {k: v for k, v in d["evaluate"].items() if k not in ("output", "max_videos")}
    keep["weights"] = _weights_digest(modules)
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def _write_atomic(path: str | os.PathLike[str], text: str) -> Path:
    atomic_write_text(path, text)
    return Path(path)


def _record_key(defense: str, attack: str, video: int) -> tuple[str, str, int]:
    return defense, attack, video


@dataclass
class Report:
    """Everything one evaluation produced: settings and one record per (defense, attack, video).

    A record: ``{"defense", "attack", "method", "area", "mode", "video", "name"}`` and, for a clip
    classifier, ``"label", "pred", "correct", "top5"``; for a frame detector, ``"frames"`` (its boxes,
    scores and labels per frame) and ``"targets"`` (the true boxes and labels); plus ``"pixels": [tp,
    fp, fn, tn]`` for PatchZero.
    """

    settings: dict[str, Any]
    samples: list[dict[str, Any]] = field(default_factory=list)
    path: Path | None = None

    def records(self, defense: str, attack: str) -> list[dict[str, Any]]:
        return [r for r in self.samples if r["defense"] == defense and r["attack"] == attack]

    def accuracy(self, defense: str, attack: str, k: int = 1) -> float | None:
        """Top-1 (``k=1``) or top-5 (``k=5``) accuracy of one cell; ``None`` if it was not run."""
        recs = self.records(defense, attack)
        if not recs:
            return None
        return sum(r["correct" if k == 1 else "top5"] for r in recs) / len(recs)

    def box_ap(self, defense: str, attack: str) -> dict[str, float] | None:
        """A frame detector's AP / AP50 / AP75 over every frame of one cell; ``None`` if it was not run."""
        recs = self.records(defense, attack)
        if not recs:
            return None
        preds = [{k: torch.tensor(v).reshape(-1, 4) if k == "boxes" else torch.tensor(v) for k, v in p.items()}
                 for r in recs for p in r["frames"]]  # fmt: skip
        targets = [{k: torch.tensor(v).reshape(-1, 4) if k == "boxes" else torch.tensor(v, dtype=torch.int64) for k, v in g.items()}
                   for r in recs for g in r["targets"]]  # fmt: skip
        return detection_ap(preds, targets)

    def pixel_counts(self, attacks: Sequence[str]) -> PixelCounts:
        """PatchZero's pixel counts summed over the given attack keys (``"clean"`` for benign clips)."""
        total = PixelCounts()
        for r in self.samples:
            if r["defense"] == "patchzero" and r["attack"] in attacks:
                total = total + PixelCounts(*r["pixels"])
        return total

    def to_dict(self) -> dict[str, Any]:
        return {**self.settings, "samples": self.samples}

    def save(self, path: str | os.PathLike[str]) -> Path:
        self.path = _write_atomic(path, json.dumps(self.to_dict(), indent=1))
        return self.path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Report:
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise InputError(f"cannot read report {path}: {err}") from None
        samples = d.pop("samples", [])
        return cls(d, samples, path)


class _SampleLog:
    """``samples.jsonl``: a header line (recipe fingerprint), then one JSON record per line, appended."""

    def __init__(self, path: Path, fingerprint: str, header: dict[str, Any], resume: bool) -> None:
        self.path = path
        self.records: list[dict[str, Any]] = []
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume and path.is_file():
            self.records = self._read(fingerprint)
        else:
            path.write_text(json.dumps({"header": header}) + "\n")
        self.done = {_record_key(r["defense"], r["attack"], r["video"]) for r in self.records}

    def _read(self, fingerprint: str) -> list[dict[str, Any]]:
        text = self.path.read_text()
        if not text.endswith("\n"):  # killed mid-line: drop the partial record
            text = text[: text.rfind("\n") + 1]
            self.path.write_text(text)
        lines = text.splitlines()
        try:
            header = json.loads(lines[0])["header"]
            records = [json.loads(line) for line in lines[1:]]
        except (IndexError, KeyError, json.JSONDecodeError):
            raise InputError(f"{self.path}: not a StreamGuard sample log; remove it or use --no-resume") from None
        if header.get("fingerprint") != fingerprint:
            raise ConfigError(
                f"{self.path} holds results of different settings; use --no-resume or another --output"
            )
        return records

    def append(self, records: list[dict[str, Any]]) -> None:
        with open(self.path, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
            f.flush()
            os.fsync(f.fileno())
        self.records += records
        self.done |= {_record_key(r["defense"], r["attack"], r["video"]) for r in records}


def _video_name(dataset: Any, index: int) -> str:
    """A stable name for a video: its file stem for :class:`~streamguard.data.UCF101Clips`, else its index."""
    videos = getattr(getattr(dataset, "clips", dataset), "videos", None)
    return Path(videos[index][0]).stem if videos is not None else str(index)


def load_dataset(recipe: Recipe) -> Any:
    """The recipe's evaluation clips (``data.split``, ``data.subset``)."""
    return recipe_clips(recipe.data, recipe.data.split, subset=recipe.data.subset)


def build_defenses(recipe: Recipe, model: nn.Module, patchzero: nn.Module | None = None) -> dict[str, nn.Module]:
    """The recipe's defenses by name; PatchZero is loaded from ``defense.weights`` unless given."""
    ev = recipe.evaluate
    makers: dict[str, Callable[[], nn.Module]] = {
        "none": NoDefense,
        "gt": lambda: GTMask(model.spec.mean),
        "jpeg": lambda: JpegDefense(ev.jpeg_quality),
        "h264": lambda: VideoCompression(ev.h264_crf),
        "patchzero": lambda: patchzero if patchzero is not None else _load_patchzero(recipe, model.spec.mean),
    }
    return {name: makers[name]().eval() for name in ev.defenses}


def _load_patchzero(recipe: Recipe, mean: Sequence[float]) -> nn.Module:
    """``defense.weights`` (default: the shipped detector), repainting with the downstream model's mean."""
    d = recipe.defense
    return load_defense(
        d.weights or DEFAULT_DETECTOR, threshold=d.threshold, dilate=d.dilate, temporal=d.temporal, ema=d.ema, mean=tuple(mean)
    )


@dataclass
class _Batch:
    videos: list[int]
    names: list[str]
    x: Tensor  # (N, 3, T, H, W)
    y: Any  # (N,) labels; frame detectors: N lists of T {"boxes", "labels"} dicts


class _Grid:
    """One evaluation run: computes the missing cells of each chunk of videos and logs them."""

    def __init__(self, recipe: Recipe, model: nn.Module, defenses: dict[str, nn.Module], log: _SampleLog) -> None:
        self.recipe, self.model, self.defenses, self.log = recipe, model, defenses, log
        self.cells = grid(recipe)
        self.device = next(model.parameters()).device

    def missing(self, defense: str, setting: AttackSetting, videos: Sequence[int]) -> list[int]:
        return [v for v in videos if _record_key(defense, setting.key, v) not in self.log.done]

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
                for mode in MODES:
                    setting = AttackSetting(method, area, mode)
                    todo = [d for d, s in self.cells if s == setting and self.missing(d, s, batch.videos)]
                    # DO: one patch against the bare model for every defense; BPDA: one per defense
                    shared = self.attack(setting, None, batch, mask, _seed(at.seed, chunk, mi, ai)) if mode == "do" and todo else None
                    for defense in todo:
                        seed = _seed(at.seed, chunk, mi, ai, defense)
                        x_adv = shared if shared is not None else self.attack(setting, self.defenses[defense], batch, mask, seed)
                        self.score(defense, setting, batch, x_adv, mask)
                        on_cell()

    def attack(self, setting: AttackSetting, defense: nn.Module | None, batch: _Batch, mask: Tensor, seed: int) -> Tensor:
        attack = MaskedAttack.from_section(
            self.model, self.recipe.attack, setting.method, setting.mode, defense=defense, seed=seed, device=str(self.device)
        )
        x_adv = attack.generate(batch.x.numpy(), batch.y.numpy(), mask.numpy())
        return torch.from_numpy(x_adv)

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

    def attack(self, setting: AttackSetting, defense: nn.Module | None, batch: _Batch, mask: Tensor, seed: int) -> Tensor:
        attack = MaskedFrameAttack.from_section(
            self.model, self.recipe.attack, setting.mode, defense=defense, seed=seed, device=str(self.device)
        )
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


def _chunks(videos: list[int], size: int) -> Iterator[tuple[int, list[int]]]:
    for c in range(0, len(videos), size):
        yield c // size, videos[c : c + size]


def evaluate(
    recipe: Recipe,
    *,
    on_progress: Callable[[int, int], None] | None = None,
    resume: bool = True,
    model: nn.Module | None = None,
    patchzero: nn.Module | None = None,
    dataset: Any = None,
    device: str | torch.device = "cpu",
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
    """
    _check(recipe)
    if model is None:
        model = build_model(recipe.model.name, recipe.model.num_classes, recipe.model.weights)
    frames = model.spec.task == "frame"
    if frames and set(recipe.attack.methods) != {"pgd"}:
        raise ConfigError(f"attack.methods: a frame detector is attacked with masked PGD only, got {recipe.attack.methods}")
    model = model.to(device).eval()
    defenses = {name: d.to(device) for name, d in build_defenses(recipe, model, patchzero).items()}
    if dataset is None:
        dataset = BoxClips(load_dataset(recipe), model.spec.num_classes) if frames else load_dataset(recipe)
    videos = _order(len(dataset), recipe.evaluate.max_videos, recipe.data.seed)
    if not videos:
        raise InputError(f"{recipe.data.root}: no test videos")

    fingerprint = _fingerprint(recipe, [model, *defenses.values()])
    settings = {
        "recipe": recipe_to_dict(recipe),
        "fingerprint": fingerprint,
        "seed": recipe.attack.seed,
        "data_seed": recipe.data.seed,
        "model": model.spec.name,
        "cells": [[d, s.key] for d, s in grid(recipe)],
    }
    out = Path(recipe.evaluate.output)
    log = _SampleLog(out / "samples.jsonl", fingerprint, {"fingerprint": fingerprint, "recipe": settings["recipe"]}, resume)
    runner = (_FrameGrid if frames else _Grid)(recipe, model, defenses, log)
    wanted = set(videos)
    total = len(runner.cells) * len(videos)

    def progress() -> None:
        if on_progress is not None:
            on_progress(sum(1 for _, _, v in log.done if v in wanted), total)

    progress()
    for chunk, ids in _chunks(videos, recipe.attack.batch):
        todo = [v for v in ids if any(runner.missing(d, s, [v]) for d, s in runner.cells)]
        if todo:
            runner.run_chunk(chunk, _load_batch(dataset, todo), progress)

    samples = [r for r in log.records if r["video"] in wanted]
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


# ---------------------------------------------------------------- tables

METHOD_NAMES = {"pgd": "MPGD", "apgd": "MAPGD", "cw": "MCW"}
TABLE4_ROWS = (
    ("Undefended", "none", None),
    ("GT Mask", "gt", None),
    ("JPEG", "jpeg", None),
    ("Video compression", "h264", None),
    ("PatchZero (DO)", "patchzero", "do"),
    ("PatchZero (BPDA)", "patchzero", "bpda"),
)


def _attack_columns(report: Report) -> list[tuple[str, str, float]]:
    at = report.settings["recipe"]["attack"]
    return [(f"{METHOD_NAMES[m]} {a * 100:g}%", m, a) for m, a in product(at["methods"], at["areas"])]


def _pct(value: float | None) -> str:
    return "–" if value is None or value != value else f"{100 * value:.1f}"


def table4_rows(report: Report) -> tuple[list[str], list[list[str]]]:
    """Header and rows of Table 4: top-1 (top-5) accuracy, %.

    Baselines show their worst case over the attack modes they were run under.
    """
    columns = _attack_columns(report)
    header = ["Defense", "No attack"] + [name for name, _, _ in columns]
    rows = []
    for label, defense, mode in TABLE4_ROWS:
        if report.accuracy(defense, CLEAN.key) is None:
            continue
        cells = [_cell(report, defense, [CLEAN.key])]
        for _, method, area in columns:
            modes = [mode] if mode else list(MODES)
            cells.append(_cell(report, defense, [AttackSetting(method, area, m).key for m in modes]))
        if mode and all(c == "–" for c in cells[1:]) and columns:
            continue
        rows.append([label, *cells])
    return header, rows


def _cell(report: Report, defense: str, attacks: list[str]) -> str:
    runs = [(report.accuracy(defense, a, 1), report.accuracy(defense, a, 5)) for a in attacks]
    runs = [r for r in runs if r[0] is not None]
    if not runs:
        return "–"
    top1, top5 = min(runs)
    return f"{_pct(top1)} ({_pct(top5)})"


TABLE3_ROWS = (
    ("Undefended", "none", None),
    ("GT Mask", "gt", None),
    ("PatchZero (DO)", "patchzero", "do"),
    ("PatchZero (BPDA)", "patchzero", "bpda"),
)


def is_frame_report(report: Report) -> bool:
    return bool(report.samples) and "frames" in report.samples[0]


def table3_rows(report: Report) -> tuple[list[str], list[list[str]]]:
    """Header and rows of Table 3 (per-frame detector): box AP / AP50 / AP75, %, per defense and attack."""
    columns = _attack_columns(report)
    header = ["Defense", "No attack"] + [name for name, _, _ in columns]
    rows = []
    for label, defense, mode in TABLE3_ROWS:
        if not report.records(defense, CLEAN.key):
            continue
        cells = [_ap_cell(report, defense, [CLEAN.key])]
        for _, method, area in columns:
            cells.append(_ap_cell(report, defense, [AttackSetting(method, area, m).key for m in ([mode] if mode else MODES)]))
        if mode and all(c == "–" for c in cells[1:]) and columns:
            continue
        rows.append([label, *cells])
    return header, rows


def _ap_cell(report: Report, defense: str, attacks: list[str]) -> str:
    runs = [ap for a in attacks if (ap := report.box_ap(defense, a)) is not None]
    if not runs:
        return "–"
    worst = min(runs, key=lambda r: r["ap"])
    return " / ".join(_pct(worst[k]) for k in ("ap", "ap50", "ap75"))


def table5a_rows(report: Report) -> tuple[list[str], list[list[str]]]:
    """Header and rows of Table 5a: PatchZero's pixel metrics per attack setting, per mode and on benign clips, %."""
    header = ["Attack", "Precision", "Recall", "Accuracy", "F1", "FPR"]
    rows = []
    keys_by_mode: dict[str, list[str]] = {m: [] for m in MODES}
    for _, method, area in _attack_columns(report):
        for mode in MODES:
            key = AttackSetting(method, area, mode).key
            if report.records("patchzero", key):
                keys_by_mode[mode].append(key)
                rows.append(_pixel_row(f"{METHOD_NAMES[method]} {area * 100:g}% ({mode.upper()})", report.pixel_counts([key])))
    for mode, keys in keys_by_mode.items():
        if keys:
            rows.append(_pixel_row(f"All {mode.upper()}", report.pixel_counts(keys)))
    if report.records("patchzero", CLEAN.key):
        rows.append(_pixel_row("Benign (no attack)", report.pixel_counts([CLEAN.key])))
    return header, rows


def _pixel_row(label: str, c: PixelCounts) -> list[str]:
    return [label, _pct(c.precision), _pct(c.recall), _pct(c.accuracy), _pct(c.f1), _pct(c.fpr)]


def _rich(title: str, header: list[str], rows: list[list[str]]) -> Table:
    table = Table(title=title)
    for i, name in enumerate(header):
        table.add_column(name, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    return table


def table4(report: Report) -> Table:
    """Top-1 (top-5) accuracy of every defense under every attack, shaped like the paper's Table 4."""
    return _rich("Table 4: top-1 (top-5) accuracy, %", *table4_rows(report))


def table3(report: Report) -> Table:
    """Box AP / AP50 / AP75 of the per-frame detector behind each defense, shaped like the paper's Table 3."""
    return _rich("Table 3: box AP / AP50 / AP75, %", *table3_rows(report))


def table5a(report: Report) -> Table:
    """PatchZero's pixel precision, recall, accuracy, F1 and false-positive rate, like the paper's Table 5a."""
    return _rich("Table 5a: PatchZero pixel metrics, %", *table5a_rows(report))


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join([" --- "] + [" ---: "] * (len(header) - 1)) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


def save_markdown(report: Report, path: str | os.PathLike[str]) -> Path:
    """Write :func:`report_markdown` to ``path``."""
    return _write_atomic(path, report_markdown(report))


def report_markdown(report: Report) -> str:
    """Both tables as GitHub markdown, for the README."""
    n = len(report.settings.get("videos", []))
    where = f"{report.settings['model']}, {n} videos, seed {report.settings['seed']}"
    if is_frame_report(report):
        frames = sum(len(r["frames"]) for r in report.records("none", CLEAN.key))
        parts = [f"**Table 3** — box AP / AP50 / AP75, % ({where}, {frames} frames)\n", markdown_table(*table3_rows(report))]
    else:
        parts = [
            f"**Table 4** — top-1 (top-5) accuracy, % ({where}; baselines: worst of DO/BPDA)\n",
            markdown_table(*table4_rows(report)),
        ]
    header, rows = table5a_rows(report)
    if rows:
        parts += ["\n**Table 5a** — PatchZero pixel metrics, %\n", markdown_table(header, rows)]
    return "\n".join(parts)


__all__ = [
    "topk_correct",
    "topk_accuracy",
    "detection_ap",
    "PixelCounts",
    "Preprocessor",
    "NoDefense",
    "GTMask",
    "JpegDefense",
    "VideoCompression",
    "h264_roundtrip",
    "AttackSetting",
    "grid",
    "video_masks",
    "Report",
    "load_dataset",
    "build_defenses",
    "evaluate",
    "table3",
    "table3_rows",
    "is_frame_report",
    "table4",
    "table5a",
    "table4_rows",
    "table5a_rows",
    "markdown_table",
    "report_markdown",
    "save_markdown",
]
