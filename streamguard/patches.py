"""Patch families that are not attacks: procedural textures, shapes and the ways a patch reaches a camera.

A detector that has only seen one attack's patches learns that attack's signature, not "pixels that
do not belong to a natural image". These families widen what it sees in training, and measure what
it has never seen. Everything is drawn at the detector's working scale (the model's scale), from a
``numpy.random.Generator``:

* :data:`TEXTURES`: ``uniform`` and ``binary`` noise, ``blocky`` noise (2-8 px cells), ``stripes``
  (any angle, 2-8 px period), ``checker`` boards, ``fractal`` (pink) noise, saturated ``colour``
  fields. :func:`texture` renders one as ``(3, h, w)`` in [0, 1].
* :func:`shape_mask`: a ``square``, ``rect`` or ``round`` patch covering a fraction of the frame,
  fixed over the clip or moving.
* :func:`upscaled`: a texture rendered at a lower resolution and enlarged (nearest or bilinear), as a
  printed or displayed patch is seen by a camera; :func:`compressed`: a whole clip through JPEG or
  H.264, as the patch reaches us through a codec.
* :func:`paste`: ``x' = x*(1-m) + m*content`` on ``(3, T, H, W)`` clips.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np
import torch
from torch import Tensor

from .codecs import h264_roundtrip, jpeg_roundtrip
from .errors import ConfigError

TEXTURES: tuple[str, ...] = ("uniform", "binary", "blocky", "stripes", "checker", "fractal", "colour")
SHAPES: tuple[str, ...] = ("square", "rect", "round")
Codec = Literal["jpeg", "h264"]


def _saturated(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` random fully saturated, bright RGB colours in [0, 1]: (n, 3)."""
    hue = rng.random(n)
    hsv = np.stack([hue * 179, np.full(n, 255), rng.uniform(200, 255, n)], axis=1).astype(np.uint8)[None]
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0].astype(np.float32) / 255


def _two_colour(rng: np.random.Generator, pattern: np.ndarray) -> np.ndarray:
    """A 0/1 ``(h, w)`` pattern in two random colours (saturated or black/white): (3, h, w)."""
    a, b = _saturated(rng, 2) if rng.random() < 0.5 else np.array([[0, 0, 0], [1, 1, 1]], dtype=np.float32)
    return np.where(pattern[None] > 0.5, a[:, None, None], b[:, None, None]).astype(np.float32)


def texture(family: str, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """One procedural texture of ``family`` (:data:`TEXTURES`): float32 (3, h, w) in [0, 1]."""
    if family == "uniform":
        return rng.random((3, h, w), dtype=np.float32)
    if family == "binary":
        return (rng.random((3, h, w)) < 0.5).astype(np.float32)
    if family == "blocky":
        cell = int(rng.integers(2, 9))
        small = rng.random((3, -(-h // cell), -(-w // cell)), dtype=np.float32)
        return np.repeat(np.repeat(small, cell, axis=1), cell, axis=2)[:, :h, :w]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if family == "stripes":
        period, angle = rng.uniform(2, 8), rng.uniform(0, math.pi)
        phase = (xx * math.cos(angle) + yy * math.sin(angle)) / period + rng.random()
        return _two_colour(rng, (phase % 1.0) < 0.5)
    if family == "checker":
        cell = int(rng.integers(1, 7))
        return _two_colour(rng, ((yy // cell + xx // cell) % 2).astype(np.float32))
    if family == "fractal":
        return _fractal(h, w, rng)
    if family == "colour":
        base = _saturated(rng, 1)[0][:, None, None]
        return np.broadcast_to(base, (3, h, w)).astype(np.float32).copy()
    raise ConfigError(f"unknown patch texture {family!r} (choose {', '.join(TEXTURES)})")


def _fractal(h: int, w: int, rng: np.random.Generator, octaves: int = 5) -> np.ndarray:
    """Pink noise: octaves of bilinearly enlarged noise, amplitude halving per octave, contrast-stretched."""
    out = np.zeros((3, h, w), dtype=np.float32)
    for k in range(octaves):
        cells = 2 ** (k + 1)
        small = rng.random((cells, cells, 3), dtype=np.float32)
        out += cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR).transpose(2, 0, 1) / 2**k
    lo, hi = out.min(axis=(1, 2), keepdims=True), out.max(axis=(1, 2), keepdims=True)
    return ((out - lo) / np.maximum(hi - lo, 1e-6)).astype(np.float32)


def upscaled(content: np.ndarray, factor: float, rng: np.random.Generator) -> np.ndarray:
    """``content`` (3, h, w) seen ``factor`` times larger: shrunk by it, then enlarged back (nearest or
    bilinear, drawn), so its finest detail is ``factor`` pixels wide."""
    _, h, w = content.shape
    small = cv2.resize(content.transpose(1, 2, 0), (max(1, round(w / factor)), max(1, round(h / factor))),
                       interpolation=cv2.INTER_AREA)  # fmt: skip
    interp = cv2.INTER_NEAREST if rng.random() < 0.5 else cv2.INTER_LINEAR
    big = cv2.resize(small.reshape(small.shape[0], small.shape[1], -1), (w, h), interpolation=interp)
    return np.clip(big.reshape(h, w, 3).transpose(2, 0, 1), 0, 1).astype(np.float32)


def shape_mask(
    shape: Sequence[int], area: float, rng: np.random.Generator, kind: str = "square", moving: bool = False
) -> np.ndarray:
    """A ``kind`` patch (:data:`SHAPES`) covering about ``area`` of each frame: float32 (T, H, W), 1 = patch.

    ``rect`` has an aspect ratio in [1/2, 2]; ``round`` is the ellipse inscribed in such a box. The
    place is drawn once and fixed over the clip, or drifts (``moving``: about 1/20 of the frame per frame).
    """
    stamp, corners = patch_geometry(shape, area, rng, kind, moving)
    return place_patch(stamp[None], corners, shape)[0]


def patch_geometry(
    shape: Sequence[int], area: float, rng: np.random.Generator, kind: str, moving: bool
) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """The patch's 0/1 stamp (ph, pw) and its top-left corner in each of the T frames."""
    if kind not in SHAPES:
        raise ConfigError(f"unknown patch shape {kind!r} (choose {', '.join(SHAPES)})")
    if not 0 < area < 1:
        raise ConfigError(f"patch area must be a fraction of the frame in (0, 1), got {area}")
    t, h, w = (int(s) for s in shape)
    box_area = area * h * w * (4 / math.pi if kind == "round" else 1.0)
    aspect = 1.0 if kind == "square" else float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))
    ph = int(np.clip(round(math.sqrt(box_area * aspect)), 1, h))
    pw = int(np.clip(round(box_area / ph), 1, w))
    stamp = np.ones((ph, pw), dtype=np.float32)
    if kind == "round":
        yy, xx = np.mgrid[0:ph, 0:pw]
        stamp = ((((yy + 0.5) / ph - 0.5) ** 2 + ((xx + 0.5) / pw - 0.5) ** 2) <= 0.25).astype(np.float32)
    top, left = float(rng.integers(0, h - ph + 1)), float(rng.integers(0, w - pw + 1))
    vy, vx = rng.normal(0, max(1.0, min(h, w) / 20), 2) if moving else (0.0, 0.0)
    corners = []
    for _ in range(t):
        corners.append((int(round(top)), int(round(left))))
        top, vy = _bounce(top + vy, vy, h - ph)
        left, vx = _bounce(left + vx, vx, w - pw)
    return stamp, corners


def place_patch(patch: np.ndarray, corners: list[tuple[int, int]], shape: Sequence[int]) -> np.ndarray:
    """``patch`` (C, ph, pw) pasted at each frame's corner on zeros: (C, T, H, W)."""
    c, ph, pw = patch.shape
    t, h, w = (int(s) for s in shape)
    out = np.zeros((c, t, h, w), dtype=np.float32)
    for i, (y, x) in enumerate(corners):
        out[:, i, y : y + ph, x : x + pw] = patch
    return out


def _bounce(pos: float, vel: float, limit: float) -> tuple[float, float]:
    if pos < 0:
        return -pos if -pos <= limit else 0.0, -vel
    if pos > limit:
        return max(0.0, 2 * limit - pos), -vel
    return pos, vel


def paste(x: Tensor, mask: Tensor, content: Tensor) -> Tensor:
    """``x*(1-m) + m*content``: clips ``(3, T, H, W)``, mask ``(T, H, W)`` or ``(1, T, H, W)``,
    content ``(3, T, H, W)`` or ``(3, H, W)`` (the same in every frame)."""
    m = mask.reshape(1, *x.shape[1:]).to(x)
    c = content if content.dim() == 4 else content[:, None]
    return x * (1 - m) + m * c.to(x)


def compressed(clip: Tensor, codec: Codec, quality: int) -> Tensor:
    """A ``(3, T, H, W)`` [0, 1] clip through a codec and back: JPEG per frame (``quality`` 1-95)
    or H.264 (``quality`` = CRF 0-51), in memory."""
    u8 = (clip.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()  # (T, H, W, 3)
    if codec == "jpeg":
        out = jpeg_roundtrip(u8, quality)
    elif codec == "h264":
        out = h264_roundtrip(u8, quality, preset="veryfast")
    else:
        raise ConfigError(f"unknown codec {codec!r} (choose jpeg, h264)")
    return torch.from_numpy(np.ascontiguousarray(out)).permute(3, 0, 1, 2).float() / 255


@dataclass(frozen=True)
class PatchDraw:
    """What one procedural patch was: for the tables and for reproducing it."""

    family: str
    shape: str
    area: float
    moving: bool
    upscale: float  # 1 = drawn at the working scale
    codec: str | None  # "jpeg:Q" / "h264:CRF", or None


def procedural_patch(
    clip: Tensor,
    rng: np.random.Generator,
    families: Sequence[str] = TEXTURES,
    area_range: tuple[float, float] = (0.01, 0.15),
    moving: float = 0.25,
    upscale: float = 0.3,
    codec: float = 0.3,
    weights: Sequence[float] | None = None,
) -> tuple[Tensor, Tensor, PatchDraw]:
    """Paste one procedural patch on a ``(3, T, H, W)`` clip: ``(clip', mask (1, T, H, W), draw)``.

    The family, shape, area (uniform in ``area_range``), motion (with probability ``moving``),
    enlargement (``upscale``: x1.5-4) and codec (``codec``: JPEG 30-90 or H.264 CRF 18-35) are drawn from ``rng``;
    the family uniformly, or in proportion to ``weights`` (one per family).
    """
    _, t, h, w = clip.shape
    if weights is None:
        family = families[int(rng.integers(len(families)))]
    else:
        family = families[int(rng.choice(len(families), p=np.asarray(weights, float) / sum(weights)))]
    kind = SHAPES[int(rng.integers(len(SHAPES)))]
    area = float(rng.uniform(*area_range))
    is_moving = bool(rng.random() < moving)
    stamp, corners = patch_geometry((t, h, w), area, rng, kind, is_moving)
    content = texture(family, *stamp.shape, rng)
    factor = float(rng.uniform(1.5, 4.0)) if rng.random() < upscale else 1.0
    if factor > 1:
        content = upscaled(content, factor, rng)
    mask = place_patch(stamp[None], corners, (t, h, w))[0]
    content = place_patch(content, corners, (t, h, w))
    out = paste(clip, torch.from_numpy(mask), torch.from_numpy(content))
    tag = None
    if rng.random() < codec:
        kind_codec: Codec = "jpeg" if rng.random() < 0.5 else "h264"
        q = int(rng.integers(30, 91)) if kind_codec == "jpeg" else int(rng.integers(18, 36))
        out, tag = compressed(out, kind_codec, q), f"{kind_codec}:{q}"
    return out, torch.from_numpy(mask)[None], PatchDraw(family, kind, area, is_moving, factor, tag)
