"""Video data on disk: UCF101 (:class:`UCF101Clips`) and the generated SynthMotion benchmark.

**UCF101 layout** (what :class:`UCF101Clips` reads and what :func:`make_synthmotion` writes)::

    root/ClassName/v_ClassName_gXX_cYY.avi
    root/ucfTrainTestlist/classInd.txt       "1 ApplyEyeMakeup"
    root/ucfTrainTestlist/trainlist0{1,2,3}.txt  "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1"
    root/ucfTrainTestlist/testlist0{1,2,3}.txt   "ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi"

The split files may also sit directly in ``root``.

**SynthMotion** is a CPU-scale action benchmark: one textured object (a random shape filled with a
random colour texture or a photo crop) moves over a natural-image background that pans slowly.
Every class is one kind of motion (:data:`SYNTH_CLASSES`) and appearance is random, so the class is
only in the motion. Each video has a sidecar ``<video>.boxes.json`` with the object's per-frame
box (xyxy, pixels of the written frame), and the tree has a ``synthmotion.json`` with the settings
and the background provenance. Generation is a pure function of the seed: every video draws from
``SeedSequence([seed, class, video])``, so the result does not depend on ``workers``.

Videos are MPEG-4 Part 2 in AVI (fourcc XVID, like UCF101) at a fixed quantizer (``qmin = qmax
= 3``), yuv420p, single-threaded: the encoder is deterministic, so the same seed gives the same
bytes and the same decoded frames (with the same FFmpeg build), at ~1/20 of a lossless file's size.

Backgrounds are the photographs bundled with scikit-image (``skimage.data``, no network needed).
Per scikit-image's ``data/README`` and the functions' docstrings they are public domain, CC0, or
carry no known copyright restrictions; :data:`BACKGROUNDS` records the source and licence of each
and ``synthmotion.json`` repeats it. Images with unclear terms (e.g. the Middlebury motorcycle
pair, the scikit-image logo) are left out.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import av
import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from .checkpoints import atomic_write_text
from .errors import ConfigError, InputError, StreamGuardError
from .recipes import DataSection

SPLIT_DIR = "ucfTrainTestlist"
UCF101_MEAN = (114.7748 / 255, 107.7354 / 255, 99.4750 / 255)  # ActivityNet mean used by MARS

SYNTH_CLASSES: tuple[str, ...] = (
    "MoveLeft",
    "MoveRight",
    "MoveUp",
    "MoveDown",
    "RotateClockwise",
    "RotateCounterClockwise",
    "ZoomIn",
    "ZoomOut",
    "Bounce",
    "Circle",
    "Diagonal",
    "Shake",
)
SYNTH_FPS = 25
# Label-changing symmetries of SynthMotion: the class each class becomes when a clip is mirrored
# left-right or played backwards (classes not named keep their label). A training clip and its
# mirror look alike but differ in label exactly where the class is a direction, which is what the
# classifier must learn (augmentation ``[train.classifier] symmetries``).
SYNTH_SYMMETRIES: dict[str, dict[str, str]] = {
    "hflip": {"MoveLeft": "MoveRight", "RotateClockwise": "RotateCounterClockwise"},
    "reverse": {"MoveLeft": "MoveRight", "MoveUp": "MoveDown", "RotateClockwise": "RotateCounterClockwise",
                "ZoomIn": "ZoomOut"},
}  # fmt: skip
# UCF101's actions keep their label when mirrored (the usual flip augmentation), not when reversed.
UCF101_SYMMETRIES: dict[str, dict[str, str]] = {"hflip": {}}
SYNTH_QSCALE = 3

# name -> (skimage.data function, licence as stated in its docstring / data README)
BACKGROUNDS: dict[str, tuple[str, str]] = {
    "astronaut": ("skimage.data.astronaut", "public domain (NASA)"),
    "coffee": ("skimage.data.coffee", "CC0 (Rachel Michetti)"),
    "chelsea": ("skimage.data.chelsea", "CC0 (Stefan van der Walt)"),
    "rocket": ("skimage.data.rocket", "public domain (SpaceX)"),
    "hubble_deep_field": ("skimage.data.hubble_deep_field", "public domain (NASA)"),
    "immunohistochemistry": ("skimage.data.immunohistochemistry", "no known copyright restrictions (CMMI)"),
    "retina": ("skimage.data.retina", "CC0 (Mikael Haggstrom, Wikimedia Commons)"),
    "coins": ("skimage.data.coins", "no known copyright restrictions (Brooklyn Museum)"),
    "camera": ("skimage.data.camera", "CC0 (Lav Varshney)"),
    "brick": ("skimage.data.brick", "CC0 (CC0Textures)"),
    "grass": ("skimage.data.grass", "CC0 (DeviantArt user linolafett)"),
    "gravel": ("skimage.data.gravel", "CC0 (CC0Textures)"),
}


# ----------------------------------------------------------------------------- UCF101 reading


def _split_dir(root: Path) -> Path:
    nested = root / SPLIT_DIR
    return nested if nested.is_dir() else root


def _read_lines(path: Path) -> list[tuple[int, list[str]]]:
    if not path.is_file():
        raise InputError(f"missing split file: {path}")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"cannot read split file {path}: {err}") from None
    return [(n, line.split()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]


def read_class_index(path: Path) -> list[str]:
    """Class names ordered by their ``classInd.txt`` id (ids 1..K, contiguous)."""
    classes: dict[int, str] = {}
    for n, fields in _read_lines(path):
        if len(fields) != 2 or not fields[0].isdigit():
            raise InputError(f"{path}:{n}: expected '<id> <ClassName>', got {' '.join(fields)!r}")
        classes[int(fields[0])] = fields[1]
    if sorted(classes) != list(range(1, len(classes) + 1)):
        raise InputError(f"{path}: class ids must be 1..{len(classes)}")
    return [classes[i] for i in range(1, len(classes) + 1)]


def read_split(root: Path, split: str, fold: int, classes: list[str]) -> list[tuple[Path, int]]:
    """``(video path, 0-based label)`` for every line of ``{split}list0{fold}.txt``."""
    path = _split_dir(root) / f"{split}list0{fold}.txt"
    lookup = {name.lower(): i for i, name in enumerate(classes)}
    videos = []
    for n, fields in _read_lines(path):
        rel = fields[0]
        folder = rel.replace("\\", "/").split("/")[0].lower()
        if len(fields) > 1:
            if not fields[1].isdigit() or not 1 <= int(fields[1]) <= len(classes):
                raise InputError(f"{path}:{n}: bad class id {fields[1]!r}")
            label = int(fields[1]) - 1
        elif folder in lookup:
            label = lookup[folder]
        else:
            raise InputError(f"{path}:{n}: class folder {folder!r} is not in classInd.txt")
        videos.append((root / rel, label))
    for video, _ in videos:
        if not video.is_file():
            raise InputError(f"{path}: listed video not found: {video}")
    return videos


def _error_text(err: Exception) -> str:
    return getattr(err, "strerror", None) or str(err)


def _open_video(path: Path) -> tuple[Any, Any]:
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError, ValueError) as err:
        raise InputError(f"cannot read video {path}: {_error_text(err)}") from None
    if not container.streams.video:
        container.close()
        raise InputError(f"no video stream in {path}")
    return container, container.streams.video[0]


def _decode_frames(
    path: Path, container: Any, stream: Any, wanted: set[int] | None
) -> tuple[dict[int, np.ndarray], int]:
    """Decode the frames with the given indices (all when None) as (H, W, 3) uint8 RGB.

    Decoding stops after the last wanted frame. Returns the frames and how many were decoded.
    """
    last = max(wanted) if wanted else -1
    frames: dict[int, np.ndarray] = {}
    count = 0
    try:
        for count, frame in enumerate(container.decode(stream), 1):
            if wanted is None or count - 1 in wanted:
                frames[count - 1] = frame.to_ndarray(format="rgb24")
            if wanted is not None and count - 1 >= last:
                break
    except (av.FFmpegError, OSError, ValueError) as err:
        if not frames:
            raise InputError(f"cannot decode video {path}: {_error_text(err)}") from None
    if count == 0:
        raise InputError(f"no decodable frames in {path}")
    return frames, count


def clip_indices(num_frames: int, clip_len: int, stride: int, start: int | None) -> np.ndarray:
    """Frame indices of a clip; ``start=None`` centres it. Short videos loop (indices wrap)."""
    span = (clip_len - 1) * stride + 1
    if start is None:
        start = max(num_frames - span, 0) // 2
    return (start + stride * np.arange(clip_len)) % num_frames


def center_crop_resize(image: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) -> (size, size, 3): shorter side to ``size``, then the central square."""
    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = image[top : top + side, left : left + side]
    if side == size:
        return np.ascontiguousarray(square)
    interp = cv2.INTER_AREA if side > size else cv2.INTER_LINEAR
    return cv2.resize(square, (size, size), interpolation=interp)


class UCF101Clips(Dataset):
    """Fixed-length clips from a tree in UCF101's layout (UCF101 itself or SynthMotion).

    ``dataset[i] -> (clip, label)``: clip ``(3, clip_len, size, size)`` float32 RGB in [0, 1],
    label the 0-based class index (``classInd`` id - 1). ``start="center"`` takes the middle of
    the video, ``"random"`` draws the start from the dataset's generator (seeded with ``seed``,
    reseeded per DataLoader worker by :func:`make_loader`). ``subset=N`` keeps a fixed random
    subset of N videos drawn with ``seed`` (the paper evaluates 202 UCF101 test videos).
    ``mean`` is the dataset's per-channel RGB mean in [0, 1] (exposed as ``.mean``); by default the
    one recorded in ``synthmotion.json``, else the ActivityNet mean MARS uses for UCF101.

    Every file is checked at construction (root, ``classInd.txt``, the split file, every listed
    video): a missing one raises :class:`InputError` naming it. A video that cannot be decoded
    raises :class:`InputError` naming it when loaded.
    """

    def __init__(
        self,
        root: str | Path,
        split: Literal["train", "test"] = "test",
        fold: int = 1,
        clip_len: int = 16,
        size: int = 112,
        stride: int = 1,
        start: Literal["center", "random"] = "center",
        subset: int | None = None,
        seed: int = 0,
        mean: tuple[float, float, float] | None = None,
    ) -> None:
        _check_options(split=split, fold=fold, clip_len=clip_len, size=size, stride=stride, start=start)
        self.root = Path(root)
        if not self.root.is_dir():
            raise InputError(f"data root not found: {self.root}")
        self.split, self.fold, self.clip_len, self.size = split, fold, clip_len, size
        self.stride, self.start, self.seed = stride, start, seed
        self.classes = read_class_index(_split_dir(self.root) / "classInd.txt")
        videos = read_split(self.root, split, fold, self.classes)
        if subset is not None:
            if not 1 <= subset <= len(videos):
                raise ConfigError(f"subset: {subset} is outside 1..{len(videos)} ({split} fold {fold})")
            keep = np.random.default_rng(seed).choice(len(videos), subset, replace=False)
            videos = [videos[i] for i in sorted(keep)]
        self.videos: list[tuple[Path, int]] = videos
        self.mean = tuple(mean) if mean is not None else _recorded_mean(self.root)
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.videos)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        clip, label, _ = self.load(index)
        return clip, label

    def load(self, index: int) -> tuple[torch.Tensor, int, np.ndarray]:
        """``(clip (3, T, S, S), label, frame indices (T,))``; indices say which source frames."""
        path, label = self.videos[index]
        frames, indices = self._read(path)
        clip = np.stack([center_crop_resize(f, self.size) for f in frames])  # (T, S, S, 3)
        clip = torch.from_numpy(np.ascontiguousarray(clip.transpose(3, 0, 1, 2))).float().div_(255)
        return clip, label, indices

    def reseed(self, seed: int) -> None:
        """Restart the random-start generator (called per DataLoader worker)."""
        self.rng = np.random.default_rng([self.seed, seed])

    def _start(self, num_frames: int) -> int | None:
        if self.start == "center":
            return None
        span = (self.clip_len - 1) * self.stride + 1
        return int(self.rng.integers(0, max(num_frames - span, 0) + 1))

    def _read(self, path: Path) -> tuple[list[np.ndarray], np.ndarray]:
        container, stream = _open_video(path)
        with container:
            num_frames = stream.frames  # from the container header; 0 when it has none
            if num_frames > 0:
                indices = clip_indices(num_frames, self.clip_len, self.stride, self._start(num_frames))
                frames, _ = _decode_frames(path, container, stream, set(indices.tolist()))
                if all(i in frames for i in indices):
                    return [frames[i] for i in indices], indices
        container, stream = _open_video(path)  # header missing or wrong: count by decoding
        with container:
            frames, num_frames = _decode_frames(path, container, stream, None)
        indices = clip_indices(num_frames, self.clip_len, self.stride, self._start(num_frames))
        return [frames[i] for i in indices], indices


def _check_options(**opts: Any) -> None:
    if opts["split"] not in ("train", "test"):
        raise ConfigError(f"split: expected 'train' or 'test', got {opts['split']!r}")
    if opts["fold"] not in (1, 2, 3):
        raise ConfigError(f"fold: expected 1, 2 or 3, got {opts['fold']!r}")
    if opts["start"] not in ("center", "random"):
        raise ConfigError(f"start: expected 'center' or 'random', got {opts['start']!r}")
    for name in ("clip_len", "size", "stride"):
        if not isinstance(opts[name], int) or opts[name] < 1:
            raise ConfigError(f"{name}: expected a positive int, got {opts[name]!r}")


def _recorded_mean(root: Path) -> tuple[float, float, float]:
    meta = root / "synthmotion.json"
    if meta.is_file():
        try:
            return tuple(json.loads(meta.read_text())["mean"])
        except (ValueError, KeyError, TypeError):
            raise InputError(f"{meta}: not a valid synthmotion.json") from None
    return UCF101_MEAN


class _Loader(DataLoader):
    """A DataLoader whose worker errors surface as the original one-line StreamGuardError.

    On an error the workers are shut down at once: torch's clean-up of a failed iterator left to
    the garbage collector stalls for ~10 s.
    """

    def __iter__(self) -> Iterator[Any]:
        iterator = super().__iter__()
        try:
            yield from iterator
        except BaseException as err:
            getattr(iterator, "_shutdown_workers", lambda: None)()
            lines = [line for line in str(err).splitlines() if line.strip()]
            if not isinstance(err, StreamGuardError) or len(lines) <= 1:
                raise
            prefix = f"{type(err).__module__}.{type(err).__qualname__}: "
            raise type(err)(lines[-1].removeprefix(prefix)) from None


def _worker_init(worker_id: int) -> None:
    info = get_worker_info()
    if info is not None and hasattr(info.dataset, "reseed"):
        info.dataset.reseed(info.seed)


def make_loader(dataset: Dataset, batch: int, workers: int = 0, seed: int = 0, shuffle: bool = False) -> DataLoader:
    """A DataLoader of ``(clips (N, 3, T, S, S), labels (N,))`` with seeded order and workers.

    Each worker reseeds the dataset's generator from the loader's seed, so random clip starts
    are reproducible for a given ``seed`` and ``workers`` and differ between workers and epochs.
    """
    return _Loader(
        dataset,
        batch_size=batch,
        shuffle=shuffle,
        num_workers=workers,
        worker_init_fn=_worker_init,
        generator=torch.Generator().manual_seed(seed),
    )


def load_boxes(video_path: str | Path) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per-frame object boxes from ``<video>.boxes.json``.

    Returns ``boxes`` (one ``(K, 4)`` float32 xyxy array in pixels of the written frame per frame)
    and ``labels`` (one ``(K,)`` int64 array per frame). Labels are ``classInd`` ids (1..K, the
    :class:`UCF101Clips` label + 1), leaving 0 for the background as torchvision detectors expect.
    """
    boxes, labels, _ = _read_box_file(video_path)
    return boxes, labels


def _read_box_file(video_path: str | Path) -> tuple[list[np.ndarray], list[np.ndarray], dict[str, Any]]:
    """:func:`load_boxes` plus the whole parsed file (its ``width``/``height`` when recorded)."""
    path = Path(f"{video_path}.boxes.json")
    if not path.is_file():
        raise InputError(f"missing box file: {path}")
    try:
        meta = json.loads(path.read_text())
        boxes = [np.asarray(b, dtype=np.float32).reshape(-1, 4) for b in meta["boxes"]]
        labels = [np.asarray(lab, dtype=np.int64).reshape(-1) for lab in meta["labels"]]
    except (ValueError, KeyError, TypeError) as err:
        raise InputError(f"{path}: not a valid box file ({err})") from None
    if len(boxes) != len(labels) or any(len(b) != len(lab) for b, lab in zip(boxes, labels)):
        raise InputError(f"{path}: boxes and labels do not match")
    return boxes, labels, meta


def crop_resize_boxes(boxes: np.ndarray, height: int, width: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Map (K, 4) xyxy boxes of an (height, width) frame through :func:`center_crop_resize`.

    Boxes are clipped to the square; returns the float32 (K', 4) boxes with something left inside
    it and the (K,) bool mask of which input boxes those are.
    """
    side = min(height, width)
    top, left, scale = (height - side) // 2, (width - side) // 2, size / side
    out = ((boxes.reshape(-1, 4) - np.array([left, top, left, top], np.float32)) * scale).clip(0, size)
    keep = (out[:, 2] > out[:, 0]) & (out[:, 3] > out[:, 1])
    return out[keep].astype(np.float32), keep


class BoxClips(Dataset):
    """Clips with per-frame object boxes, for per-frame detectors: ``(clip, targets)``.

    ``clip``: (3, T, S, S) float32 in [0, 1] as :class:`UCF101Clips` gives it; ``targets``: T dicts
    ``{"boxes": (K, 4) float32 xyxy in clip pixels, "labels": (K,) int64}`` from each video's
    ``.boxes.json``. A detector with ``num_classes=2`` (background and "object": single frames
    cannot tell motions apart) gets label 1 for every object; any other count, the classInd id.
    """

    def __init__(self, clips: UCF101Clips, num_classes: int = 2) -> None:
        self.clips, self.class_agnostic = clips, num_classes == 2
        for path, _ in clips.videos:
            if not Path(f"{path}.boxes.json").is_file():
                raise InputError(f"missing box file: {path}.boxes.json")

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
        clip, _, indices = self.clips.load(index)
        path = self.clips.videos[index][0]
        boxes, labels, meta = _read_box_file(path)
        height, width = _frame_size(path, meta)
        targets = []
        for i in indices:
            b, keep = crop_resize_boxes(boxes[i], height, width, self.clips.size)
            lab = np.ones(len(b), np.int64) if self.class_agnostic else labels[i][keep]
            targets.append({"boxes": torch.from_numpy(b), "labels": torch.from_numpy(lab)})
        return clip, targets

    @staticmethod
    def collate(items: list[tuple[torch.Tensor, list[dict[str, torch.Tensor]]]]) -> tuple[torch.Tensor, list[list[dict[str, torch.Tensor]]]]:
        """A ``DataLoader`` batch: clips ``(B, 3, T, H, W)`` and their per-frame targets (box counts differ)."""
        return torch.stack([clip for clip, _ in items]), [targets for _, targets in items]


def _frame_size(video_path: Path, meta: dict[str, Any]) -> tuple[int, int]:
    """(height, width) recorded in a video's box file ``meta``, else read from the video's header."""
    if "height" in meta and "width" in meta:
        return int(meta["height"]), int(meta["width"])
    container, stream = _open_video(Path(video_path))
    with container:
        return int(stream.codec_context.height), int(stream.codec_context.width)


# ----------------------------------------------------------------------------- SynthMotion


ROTATION = (5.0, 10.0)  # degrees per frame of the rotate classes (SynthMotion v1)


@lru_cache(maxsize=1)
def _backgrounds() -> tuple[np.ndarray, ...]:
    import skimage.data

    images = []
    for name in BACKGROUNDS:
        image = getattr(skimage.data, name)()
        images.append(np.ascontiguousarray(np.dstack([image] * 3) if image.ndim == 2 else image[..., :3]))
    return tuple(images)


@dataclass
class _Track:
    """Object pose per frame: centre (T, 2) xy pixels, angle (T,) degrees CCW, scale (T,)."""

    center: np.ndarray
    angle: np.ndarray
    scale: np.ndarray


def _linear_path(
    rng: np.random.Generator, lo: float, hi: float, frames: int, direction: np.ndarray, size: int
) -> np.ndarray:
    """Straight path at constant speed along ``direction`` that stays in [lo, hi]^2."""
    speed = rng.uniform(2.0, 4.0) * size / 112
    extent = np.abs(direction).max()
    speed = min(speed, 0.999 * (hi - lo) / max(frames - 1, 1) / extent)
    travel = direction * speed * (frames - 1)
    start = np.array([rng.uniform(lo + max(-d, 0), hi - max(d, 0)) for d in travel])
    return start + np.outer(np.arange(frames), direction * speed)


def _track(
    name: str, rng: np.random.Generator, frames: int, size: int, radius: float, rotation: tuple[float, float] = ROTATION
) -> _Track:
    """The motion that defines class ``name``; ``radius`` bounds the object at scale 1, ``rotation``
    is the range of the rotate classes' speed in degrees per frame."""
    t = np.arange(frames, dtype=np.float64)
    angle = np.full(frames, rng.uniform(0, 360))
    scale = np.ones(frames)
    zoom = (rng.uniform(0.55, 0.7), rng.uniform(1.25, 1.4))
    r = radius * (zoom[1] if name.startswith("Zoom") else 1.0)
    lo, hi = r + 1, size - r - 1
    here = np.array([rng.uniform(lo, hi), rng.uniform(lo, hi)])
    steady = np.tile(here, (frames, 1))
    axes = {"MoveLeft": (-1, 0), "MoveRight": (1, 0), "MoveUp": (0, -1), "MoveDown": (0, 1)}
    if name in axes:
        center = _linear_path(rng, lo, hi, frames, np.array(axes[name], float), size)
    elif name == "Diagonal":
        center = _linear_path(rng, lo, hi, frames, rng.choice([-1.0, 1.0], 2) / math.sqrt(2), size)
    elif name.startswith("Rotate"):
        sign = -1 if name == "RotateClockwise" else 1
        center, angle = steady, angle + sign * rng.uniform(*rotation) * t
    elif name.startswith("Zoom"):
        ends = zoom if name == "ZoomIn" else zoom[::-1]
        center, scale = steady, np.exp(np.linspace(math.log(ends[0]), math.log(ends[1]), frames))
    elif name == "Bounce":
        height = min(rng.uniform(0.2, 0.35) * size, hi - lo)
        phase, period = rng.uniform(0, 1), rng.uniform(10, 16)
        y = hi - height * np.abs(np.sin(math.pi * (t / period + phase)))
        center = np.stack([steady[:, 0], y], 1)
    elif name == "Circle":
        orbit = min(rng.uniform(0.12, 0.2) * size, (hi - lo) / 2)
        mid = np.array([rng.uniform(lo + orbit, hi - orbit), rng.uniform(lo + orbit, hi - orbit)])
        phi = rng.uniform(0, 2 * math.pi) + rng.choice([-1, 1]) * 2 * math.pi * t / rng.uniform(16, 24)
        center = mid + orbit * np.stack([np.cos(phi), np.sin(phi)], 1)
    elif name == "Shake":
        amp, period = rng.uniform(3, 6) * size / 112, rng.uniform(4, 6)
        wave = 2 * np.abs(2 * ((t / period + rng.uniform(0, 1)) % 1) - 1) - 1  # triangle in [-1, 1]
        x = np.clip(steady[:, 0], lo + amp, hi - amp) + amp * wave
        center = np.stack([x, steady[:, 1]], 1)
    else:
        raise ConfigError(f"unknown SynthMotion class {name!r}")
    return _Track(center, angle, scale)


def _texture(rng: np.random.Generator, side: int) -> np.ndarray:
    """A random colour texture or photo crop, (side, side, 3) float32 in [0, 255]."""
    kind = rng.integers(4)
    if kind == 0:  # photo crop
        image = _backgrounds()[rng.integers(len(BACKGROUNDS))]
        crop = int(rng.uniform(0.15, 0.4) * min(image.shape[:2]))
        y, x = rng.integers(0, image.shape[0] - crop + 1), rng.integers(0, image.shape[1] - crop + 1)
        patch = cv2.resize(image[y : y + crop, x : x + crop], (side, side), interpolation=cv2.INTER_AREA)
        return patch.astype(np.float32)
    if kind == 1:  # smooth colour blobs
        grid = rng.uniform(0, 255, (int(rng.integers(2, 6)),) * 2 + (3,)).astype(np.float32)
        return cv2.resize(grid, (side, side), interpolation=cv2.INTER_CUBIC).clip(0, 255)
    a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    yy, xx = np.mgrid[:side, :side].astype(np.float32)
    period = rng.uniform(4, 10)
    if kind == 2:  # stripes at a random angle
        theta = rng.uniform(0, math.pi)
        pattern = (np.sin((xx * math.cos(theta) + yy * math.sin(theta)) * 2 * math.pi / period) > 0)
    else:  # checkerboard
        pattern = ((xx // period + yy // period) % 2) > 0
    return np.where(pattern[..., None], a, b).astype(np.float32)


def _shape_alpha(rng: np.random.Generator, side: int) -> np.ndarray:
    """A filled random shape (rectangle, ellipse, triangle, polygon), (side, side) float32 in [0, 1]."""
    mask = np.zeros((side * 4, side * 4), np.uint8)  # drawn 4x larger then reduced: anti-aliased
    c, r = side * 2, side * 2 - 4
    kind = rng.integers(4)
    if kind == 0:
        w, h = r, int(r * rng.uniform(0.6, 1.0))
        cv2.rectangle(mask, (c - w, c - h), (c + w - 1, c + h - 1), 255, -1)
    elif kind == 1:
        cv2.ellipse(mask, (c, c), (r, int(r * rng.uniform(0.6, 1.0))), 0, 0, 360, 255, -1)
    else:
        n = 3 if kind == 2 else int(rng.integers(5, 7))
        phi = rng.uniform(0, 2 * math.pi) + 2 * math.pi * np.arange(n) / n
        points = np.stack([c + r * np.cos(phi), c + r * np.sin(phi)], 1).round().astype(np.int32)
        cv2.fillPoly(mask, [points], 255)
    return cv2.resize(mask, (side, side), interpolation=cv2.INTER_AREA).astype(np.float32) / 255


def _pan_background(rng: np.random.Generator, frames: int, size: int) -> tuple[Callable[[int], np.ndarray], str]:
    """A random background crop that pans slowly: ``(frame(t) -> (size, size, 3) float32, name)``."""
    images = _backgrounds()
    index = int(rng.integers(len(images)))
    image = images[index]
    zoom = rng.uniform(1.3, 2.5)
    h, w = image.shape[:2]
    scale = zoom * size / min(h, w)
    dsize = (max(round(w * scale), size + 2), max(round(h * scale), size + 2))
    canvas = cv2.resize(image, dsize, interpolation=cv2.INTER_AREA)
    if rng.random() < 0.5:
        canvas = canvas[:, ::-1]
    canvas = np.ascontiguousarray(canvas, dtype=np.float32) * rng.uniform(0.8, 1.2)
    room = np.array([canvas.shape[1] - size - 1, canvas.shape[0] - size - 1], float)
    theta = rng.uniform(0, 2 * math.pi)
    velocity = rng.uniform(0, 0.5) * size / 112 * np.array([math.cos(theta), math.sin(theta)])
    velocity *= min(1.0, *(room / np.maximum(np.abs(velocity) * max(frames - 1, 1), 1e-9)))
    travel = velocity * (frames - 1)
    origin = np.array([rng.uniform(max(-d, 0), r - max(d, 0)) for d, r in zip(travel, room)])

    def frame(t: int) -> np.ndarray:
        ox, oy = origin + velocity * t
        shift = np.array([[1, 0, -ox], [0, 1, -oy]], np.float64)
        return cv2.warpAffine(canvas, shift, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)

    return frame, list(BACKGROUNDS)[index]


def render_video(
    class_index: int,
    seed: int | np.random.SeedSequence,
    size: int = 112,
    frames: int = 32,
    plain: int | None = None,
    rotation: tuple[float, float] = ROTATION,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Render one SynthMotion video of class ``SYNTH_CLASSES[class_index]``.

    Returns frames ``(T, size, size, 3)`` uint8 RGB, boxes ``(T, 4)`` float32 xyxy (the pixels
    where the object's coverage is at least 0.5; all -1 for a frame where it is out of view) and
    a dict with the object's track. ``plain=v`` renders the same video (same random draws) over a
    flat background of grey level ``v`` instead of the photo, which lets tests recover the
    object's exact coverage.
    """
    rng = np.random.default_rng(seed)
    name = SYNTH_CLASSES[class_index]
    side = int(rng.uniform(0.26, 0.36) * size)
    texture, alpha = _texture(rng, side), _shape_alpha(rng, side)
    sprite = np.dstack([texture * alpha[..., None], alpha])  # premultiplied RGBA
    track = _track(name, rng, frames, size, radius=side / math.sqrt(2), rotation=rotation)
    background, background_name = _pan_background(rng, frames, size)
    video = np.empty((frames, size, size, 3), np.uint8)
    boxes = np.full((frames, 4), -1, np.float32)
    for t in range(frames):
        matrix = cv2.getRotationMatrix2D(((side - 1) / 2, (side - 1) / 2), track.angle[t], track.scale[t])
        matrix[:, 2] += track.center[t] - (side - 1) / 2
        layer = cv2.warpAffine(sprite, matrix, (size, size), flags=cv2.INTER_LINEAR, borderValue=0)
        cover = layer[..., 3:]
        image = background(t) if plain is None else np.full((size, size, 3), plain, np.float32)
        image = image * (1 - cover) + layer[..., :3]
        video[t] = np.clip(image + 0.5, 0, 255).astype(np.uint8)
        inside = cover[..., 0] >= 0.5
        cols, rows = np.flatnonzero(inside.any(0)), np.flatnonzero(inside.any(1))
        if len(cols):
            boxes[t] = (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
    info = {
        "class": name,
        "background": background_name,
        "center": track.center.round(2).tolist(),
        "angle": track.angle.round(2).tolist(),
        "scale": track.scale.round(4).tolist(),
    }
    return video, boxes, info


def _video_name(class_name: str, group: int) -> str:
    return f"{class_name}/v_{class_name}_g{group:02d}_c01.avi"


def write_video(path: Path, frames: np.ndarray, fps: int = SYNTH_FPS) -> None:
    """Encode (T, H, W, 3) uint8 RGB frames deterministically (MPEG-4, fixed quantizer) to ``path``."""
    tmp = path.with_name(path.name + ".tmp")
    with av.open(str(tmp), "w", format="avi") as container:
        stream = container.add_stream("mpeg4", rate=fps, options={"qmin": str(SYNTH_QSCALE), "qmax": str(SYNTH_QSCALE)})
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.thread_count = 1
        stream.codec_context.codec_tag = "XVID"
        for image in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())
    os.replace(tmp, path)


def _make_one(job: tuple[str, int, int, int, int, int, tuple[float, float]]) -> tuple[str, list[float]]:
    """Render, encode and write one video and its box file; returns its name and RGB mean."""
    root, class_index, group, seed, size, frames, rotation = job
    seq = np.random.SeedSequence([seed, class_index, group])
    video, boxes, info = render_video(class_index, seq, size, frames, rotation=rotation)
    rel = _video_name(SYNTH_CLASSES[class_index], group)
    path = Path(root) / rel
    write_video(path, video)
    sidecar = {
        "video": path.name,
        "class": SYNTH_CLASSES[class_index],
        "class_id": class_index + 1,
        "width": size,
        "height": size,
        "boxes": [[b.tolist()] if b[0] >= 0 else [] for b in boxes],
        "labels": [[class_index + 1] if b[0] >= 0 else [] for b in boxes],
        "track": info,
    }
    atomic_write_text(Path(f"{path}.boxes.json"), json.dumps(sidecar, sort_keys=True))
    return rel, (np.mean([cv2.mean(image)[:3] for image in video], axis=0) / 255).tolist()


def _test_groups(videos_per_class: int, test_count: int, fold: int) -> set[int]:
    """Groups (1-based) in the test split of ``fold``: consecutive blocks, like UCF101's folds."""
    return {((fold - 1) * test_count + i) % videos_per_class + 1 for i in range(test_count)}


def make_synthmotion(
    root: str | Path,
    videos_per_class: int = 12,
    seed: int = 0,
    size: int = 112,
    frames: int = 32,
    test_fraction: float = 0.25,
    workers: int = 1,
    progress: Callable[[int, int], None] | None = None,
    rotation: tuple[float, float] = ROTATION,
) -> Path:
    """Generate SynthMotion in UCF101's layout under ``root`` and return ``root``.

    ``len(SYNTH_CLASSES)`` classes x ``videos_per_class`` videos (``v_Class_gXX_c01.avi``, group =
    video index), three folds whose test split is a block of ``test_fraction`` of the groups,
    ``<video>.boxes.json`` per video, ``synthmotion.json`` last (its presence marks a complete
    tree). ``progress(done, total)`` is called after each video. ``rotation``: the (low, high)
    speed of the rotate classes in degrees per frame.
    """
    if videos_per_class < 2:
        raise ConfigError(f"videos_per_class: need at least 2 (one train, one test), got {videos_per_class}")
    if size < 16 or size % 2:
        raise ConfigError(f"size: expected an even number >= 16, got {size}")
    if frames < 1:
        raise ConfigError(f"frames: expected a positive int, got {frames}")
    if not 0 < test_fraction < 1:
        raise ConfigError(f"test_fraction: expected a value in (0, 1), got {test_fraction}")
    if len(rotation) != 2 or not 0 < rotation[0] <= rotation[1] <= 45:
        raise ConfigError(f"rotation: expected [low, high] degrees per frame with 0 < low <= high <= 45, got {rotation}")
    root = Path(root)
    try:
        for name in SYNTH_CLASSES:
            (root / name).mkdir(parents=True, exist_ok=True)
        (root / SPLIT_DIR).mkdir(exist_ok=True)
    except OSError as err:
        raise InputError(f"cannot create {root}: {err}") from None
    started = time.perf_counter()
    groups = range(1, videos_per_class + 1)
    rotation = (float(rotation[0]), float(rotation[1]))
    jobs = [(str(root), c, g, seed, size, frames, rotation) for c in range(len(SYNTH_CLASSES)) for g in groups]
    means = []
    with ProcessPoolExecutor(workers) if workers > 1 else _Serial() as pool:
        for done, (_, mean) in enumerate(pool.map(_make_one, jobs), 1):
            means.append(mean)
            if progress:
                progress(done, len(jobs))
    test_count = min(max(round(videos_per_class * test_fraction), 1), videos_per_class - 1)
    _write_splits(root, videos_per_class, test_count)
    meta = {
        "name": "SynthMotion",
        "version": 1,
        "seed": seed,
        "videos_per_class": videos_per_class,
        "size": size,
        "frames": frames,
        "rotation": list(rotation),
        "fps": SYNTH_FPS,
        "test_fraction": test_fraction,
        "test_groups": {f"fold{f}": sorted(_test_groups(videos_per_class, test_count, f)) for f in (1, 2, 3)},
        "classes": list(SYNTH_CLASSES),
        "codec": f"mpeg4/XVID AVI, yuv420p, q={SYNTH_QSCALE}",
        "mean": [round(float(m), 6) for m in np.mean(means, axis=0)],
        "backgrounds": [{"name": n, "source": s, "licence": lic} for n, (s, lic) in BACKGROUNDS.items()],
        "seconds": round(time.perf_counter() - started, 2),
    }
    atomic_write_text(root / "synthmotion.json", json.dumps(meta, indent=2))
    return root


def _write_splits(root: Path, videos_per_class: int, test_count: int) -> None:
    split_dir = root / SPLIT_DIR
    atomic_write_text(split_dir / "classInd.txt", "".join(f"{i} {n}\n" for i, n in enumerate(SYNTH_CLASSES, 1)))
    for fold in (1, 2, 3):
        test = _test_groups(videos_per_class, test_count, fold)
        train_lines, test_lines = [], []
        for i, name in enumerate(SYNTH_CLASSES, 1):
            for group in range(1, videos_per_class + 1):
                rel = _video_name(name, group)
                if group in test:
                    test_lines.append(f"{rel}\n")
                else:
                    train_lines.append(f"{rel} {i}\n")
        atomic_write_text(split_dir / f"trainlist0{fold}.txt", "".join(train_lines))
        atomic_write_text(split_dir / f"testlist0{fold}.txt", "".join(test_lines))


class _Serial:
    """In-process stand-in for a process pool (``workers=1``)."""

    def __enter__(self) -> _Serial:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def map(self, fn: Callable[[Any], Any], items: list[Any]) -> Iterator[Any]:
        return map(fn, items)



def symmetry_labels(kind: str, name: str, classes: Sequence[str]) -> list[int]:
    """``perm[i]``: the label of class ``i`` after symmetry ``name`` (``"hflip"`` or ``"reverse"``) of
    data set ``kind``; raises :class:`ConfigError` for a symmetry that kind has not got."""
    table = {"synthmotion": SYNTH_SYMMETRIES, "ucf101": UCF101_SYMMETRIES}.get(kind, {})
    if name not in table:
        raise ConfigError(f"symmetry {name!r} is not label-safe for {kind} data (it has: {', '.join(table) or 'none'})")
    swaps = {**table[name], **{b: a for a, b in table[name].items()}}
    index = {c: i for i, c in enumerate(classes)}
    missing = sorted({swaps[c] for c in classes if c in swaps} - index.keys())
    if missing:
        raise ConfigError(f"symmetry {name!r} maps classes onto {', '.join(missing)}, which the data set has not got")
    return [index[swaps.get(c, c)] for c in classes]


def recipe_clips(d: DataSection, split: str, *, clip_len: int | None = None, subset: int | None = None) -> UCF101Clips:
    """The clips a recipe's ``[data]`` table names (centered starts).

    SynthMotion is generated first when its tree is not complete (``synthmotion.json``, written
    last, is missing), so an interrupted generation is redone rather than read half-written.
    """
    root = Path(d.root)
    if d.kind == "synthmotion" and not (root / "synthmotion.json").is_file():
        make_synthmotion(root, d.videos_per_class, d.seed, size=d.size, frames=d.frames, workers=max(1, d.workers),
                         rotation=tuple(d.rotation))  # fmt: skip
    return UCF101Clips(
        root, split=split, fold=d.fold, clip_len=clip_len or d.clip_len, size=d.size, stride=d.stride,
        start="center", subset=subset, seed=d.seed,
    )  # fmt: skip


__all__ = [
    "SYNTH_CLASSES",
    "SYNTH_SYMMETRIES",
    "symmetry_labels",
    "BACKGROUNDS",
    "UCF101Clips",
    "BoxClips",
    "crop_resize_boxes",
    "make_loader",
    "load_boxes",
    "make_synthmotion",
    "recipe_clips",
    "render_video",
    "write_video",
    "read_class_index",
    "read_split",
    "clip_indices",
    "center_crop_resize",
]
