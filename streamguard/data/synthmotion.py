"""SynthMotion, the CPU-scale action benchmark, generated in UCF101's layout.

One textured object (a random shape filled with a random colour texture or a photo crop) moves over a
natural-image background that pans slowly. Every class is one kind of motion (:data:`SYNTH_CLASSES`)
and appearance is random, so the class is only in the motion. Each video has a sidecar
``<video>.boxes.json`` with the object's per-frame box (xyxy, pixels of the written frame), and the
tree has a ``synthmotion.json`` with the settings and the background provenance. Generation is a pure
function of the seed: every video draws from ``SeedSequence([seed, class, video])``, so the result
does not depend on ``workers``.

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
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import av
import cv2
import numpy as np

from ..checkpoints import atomic_write_text
from ..errors import ConfigError, InputError
from .ucf101 import SPLIT_DIR

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
