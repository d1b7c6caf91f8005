"""Synthetic benign graphics: full-frame flat-shaded pictures (bands, ramps, mosaics, shapes, text).

Real video is not only camera footage: overlays, signage, cartoons, screen captures and test
cards are flat saturated colour, sharp edges and regular structure, which are exactly the
textures a patch detector trained on procedural patches learns to mark. These clips teach it
that such content filling the frame is the scene, not a patch. They are generated here from a
seed (no file), each clip a pure function of ``(seed, index)``; the lavfi test patterns stay out
of training and serve as a test (``benchmarks/generalization.py``).
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from ..resize import resize_frames

_SUPERSAMPLE = 4  # drawn at 4x and shrunk by area: antialiased edges, as a camera or a scaler gives


def _colours(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` RGB colours in [0, 255]: half saturated primaries-like, half arbitrary."""
    saturated = rng.integers(0, 2, (n, 3)) * rng.choice([191, 255], (n, 1))
    return np.where(rng.random((n, 1)) < 0.5, saturated, rng.integers(0, 256, (n, 3))).astype(np.float32)


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """One ``(h, w, 3)`` float canvas in [0, 255]: flat, a ramp, vertical or horizontal bands, or a mosaic."""
    kind = rng.integers(5)
    if kind == 0:
        return np.broadcast_to(_colours(rng, 1)[0], (h, w, 3)).copy()
    if kind == 1:
        a, b = _colours(rng, 2)
        angle = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        t = xx * np.cos(angle) + yy * np.sin(angle)
        t = (t - t.min()) / max(float(np.ptp(t)), 1.0)
        return a + (b - a) * t[..., None]
    if kind in (2, 3):
        n = int(rng.integers(3, 11))
        edges = np.sort(rng.choice(np.arange(1, n * 8), n - 1, replace=False)) / (n * 8)
        band = np.searchsorted(edges, (np.arange(w if kind == 2 else h) + 0.5) / (w if kind == 2 else h))
        colours = _colours(rng, n)[band]
        return np.broadcast_to(colours[None] if kind == 2 else colours[:, None], (h, w, 3)).copy()
    rows, cols = int(rng.integers(2, 6)), int(rng.integers(2, 6))
    tiles = _colours(rng, rows * cols).reshape(rows, cols, 3)
    return cv2.resize(tiles, (w, h), interpolation=cv2.INTER_NEAREST)


def _overlay(canvas: np.ndarray, rng: np.random.Generator) -> None:
    """Draw one flat shape, line or text string somewhere on ``canvas`` (in place)."""
    h, w = canvas.shape[:2]
    colour = tuple(int(c) for c in _colours(rng, 1)[0])
    x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
    x1, y1 = int(rng.integers(0, w)), int(rng.integers(0, h))
    kind = rng.integers(4)
    if kind == 0:
        cv2.rectangle(canvas, (x0, y0), (x1, y1), colour, -1 if rng.random() < 0.7 else int(rng.integers(2, 12)))
    elif kind == 1:
        cv2.circle(canvas, (x0, y0), int(rng.integers(h // 16, h // 2)), colour, -1 if rng.random() < 0.7 else 8)
    elif kind == 2:
        cv2.line(canvas, (x0, y0), (x1, y1), colour, int(rng.integers(2, 16)))
    else:
        text = "".join(rng.choice(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789:. "), int(rng.integers(2, 10))))
        cv2.putText(canvas, text, (x0 // 2, y0), int(rng.choice([0, 1, 2, 3, 4, 6, 7])), rng.uniform(1, 4), colour,
                    int(rng.integers(2, 8)), cv2.LINE_AA)  # fmt: skip


def graphics_clip(rng: np.random.Generator, clip_len: int, size: int) -> np.ndarray:
    """A ``(T, size, size, 3)`` uint8 clip: a background with 0-6 overlays, static, panning, or with
    one overlay (a moving shape or a changing counter) redrawn each frame."""
    big = size * _SUPERSAMPLE
    base = np.clip(_background(rng, big, 2 * big), 0, 255).astype(np.uint8)  # twice as wide, room to pan
    for _ in range(int(rng.integers(0, 7))):
        _overlay(base, rng)
    motion = rng.integers(3)
    speed = rng.uniform(1, 3) * _SUPERSAMPLE * (1 if rng.random() < 0.5 else -1)
    offset = int(rng.integers(0, big))
    changing = int(rng.integers(2**31))
    frames = []
    for t in range(clip_len):
        x = int(offset + speed * t) % big if motion == 1 else offset
        frame = np.ascontiguousarray(base[:, x : x + big])
        if motion == 2:  # a shape or string that changes every frame (a counter, a moving sprite)
            _overlay(frame, np.random.default_rng([changing, t]))
        frames.append(frame)
    video = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float()  # (T, 3, big, big)
    return resize_frames(video, (size, size)).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


class GraphicsClips(Dataset):
    """``n`` graphics clips: ``ds[i] -> (clip (3, T, size, size) float32 in [0, 1], 0)``, clip ``i`` a
    pure function of ``(seed, i)``. Label 0: like footage, graphics only serve as benign background."""

    def __init__(self, n: int, size: int = 64, clip_len: int = 16, seed: int = 0) -> None:
        self.n, self.size, self.clip_len, self.seed = n, size, clip_len, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        clip = graphics_clip(np.random.default_rng([self.seed, i]), self.clip_len, self.size)
        return torch.from_numpy(clip).permute(3, 0, 1, 2).float().div_(255).contiguous(), 0
