"""The PatchZero defense: temporal fusion, threshold, dilation and mean repaint around a patch detector.

:class:`PatchZero` runs a :class:`~streamguard.detector.PSPNet` on every frame of a clip, fuses the
logits over time, thresholds and dilates them into a mask, and repaints the masked pixels with the
downstream model's dataset mean. With ``bpda=True`` the mask is a straight-through estimator so
adaptive (BPDA) attacks can differentiate through the defense. :func:`build_defense` is the one
factory every command uses (a recipe's ``[defense]`` table plus overrides).
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpoints import (
    DEFAULT_DETECTOR,
    Weights,
    get_weights,
    load_state_dict_checked,
    save_checkpoint,
)
from .detector import PSPNet
from .errors import CheckpointError, ConfigError, InputError
from .resize import refresh_region, resize_frames, resize_uint8

if TYPE_CHECKING:
    from .recipes import DefenseSection

Temporal = Literal["mean", "none", "ema", "median"]
TEMPORAL: tuple[str, ...] = ("mean", "none", "ema", "median")
Complete = Literal["none", "hull", "box", "square", "cover"]
COMPLETE: tuple[str, ...] = ("none", "hull", "box", "square", "cover")
SoftReach = Literal["rim", "completion", "patch"]
GROWN: tuple[str, ...] = ("square", "cover")  # the completions that grow a region to the threat model's patch size
SQUARE_MIN_CORE = 4  # "square" and "cover" grow a region only when at least this many of its pixels pass the threshold


def dilate_mask(mask: Tensor, radius: int) -> Tensor:
    """Binary dilation with a (2r+1)x(2r+1) square over the last two dims; same as ``cv2.dilate``.

    A max-pool, so it runs on any device and inside autograd. ``mask``: (..., H, W).
    """
    if radius <= 0:
        return mask
    shape = mask.shape
    flat = mask.reshape(-1, 1, *shape[-2:])
    return F.max_pool2d(flat, 2 * radius + 1, stride=1, padding=radius).reshape(shape)


def drop_specks(mask: Tensor, prob: Tensor, threshold: float, min_core: int) -> Tensor:
    """``mask`` (..., H, W), 0/1, without its 8-connected regions that hold fewer than ``min_core``
    pixels of ``prob > threshold`` (``prob``: shape of ``mask``).

    The threat model's smallest patch is tens of pixels at the working scale (5%: 196 at 64x64), and the
    box of a region the detector passes at one to three pixels covers too little of one to stop it; but
    such specks (a sign on a wall) are all the shipped detector's false positives on the clean test
    videos and the held-out benign clips (docs/results.md, specks). Under the attacker who erodes a patch's
    detection to specks it costs robust top-1, so it is off by default."""
    if min_core <= 1 or not bool(mask.any()):
        return mask
    flat = (mask.detach().reshape(-1, *mask.shape[-2:]) > 0.5).to(torch.uint8).cpu().numpy()
    core = (prob.detach().reshape(flat.shape) > threshold).cpu().numpy()
    for i in np.flatnonzero(flat.any(axis=(1, 2))):
        count, labels = cv2.connectedComponents(flat[i], connectivity=8)
        small = np.bincount(labels[core[i]], minlength=count) < min_core
        small[0] = False
        flat[i][small[labels]] = 0
    return torch.from_numpy(flat).to(mask).reshape(mask.shape)


def complete_mask(
    mask: Tensor,
    shape: Complete,
    prob: Tensor | None = None,
    side: int = 0,
    threshold: float = 0.5,
    scale: float = 0.0,
    smaller: Sequence[int] = (),
) -> Tensor:
    """Shape completion: every 8-connected region of a 0/1 mask (..., H, W) replaced by its filled
    convex hull ("hull"), its bounding box ("box"), a square of at least ``side`` pixels ("square")
    or the union of all such squares that contain it ("cover"); "none" returns the mask.

    A patch is one solid shape, so the pixels an attacker keeps undetected in the hull or box of
    what was found (parts a dilation apart merge into one region first) are still repainted;
    Segment-and-Complete completes squares the same way. "box" assumes rectangular patches (a round
    one gets its corners masked too), "hull" any convex shape. An attacker who erodes the detected
    region shrinks its box too; "square" takes the threat model's size instead: a region's box is
    grown to at least ``side`` pixels each way (a ``side`` x ``side`` square unless it is wider),
    still containing the region, placed where the detection probabilities ``prob`` (shape of
    ``mask``) sum highest, ties broken towards the middle of the places that contain it. Only regions
    with at least :data:`SQUARE_MIN_CORE` pixels of ``prob > threshold`` are grown; smaller ones (a
    benign speck) get their box. "square" has to guess where the rest of a partly found patch lies,
    and an attacker who keeps part of the patch undetected makes that guess from the scene's
    probabilities; "cover" does not guess: if the region lies within a patch of at most ``side`` x
    ``side``, the patch lies within the region's box grown by ``side`` minus its width (height) each
    way, which is what it masks. A region found in full is not grown; an eroded one costs the scene.
    ``scale`` > 0 sizes each region's cover by the region: squares of ``min(side, ceil(scale * max(w, h)))``,
    so a small region (a benign speck, or what an attacker left of a small patch) greys less of the scene.
    ``smaller`` are the sides of the threat model's smaller patches: a region's cover is built for the
    smallest of them that holds its longer side (``side`` if none does), so a small patch found in full
    is covered to about its own size, while a region too long for it gets the largest patch's cover.
    """
    if shape == "none" or not bool(mask.any()):
        return mask
    if shape in GROWN and (prob is None or side < 1):
        raise ConfigError(f"{shape} completion needs the detection probabilities and a side of at least 1 pixel")
    flat = (mask.detach().reshape(-1, *mask.shape[-2:]) > 0.5).to(torch.uint8).cpu().numpy()
    out = np.zeros_like(flat)
    for i in np.flatnonzero(flat.any(axis=(1, 2))):
        if shape == "hull":
            contours, _ = cv2.findContours(flat[i], cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            for contour in contours:
                cv2.fillConvexPoly(out[i], cv2.convexHull(contour), 1)
            continue
        count, labels, stats, _ = cv2.connectedComponentsWithStats(flat[i], connectivity=8)
        if shape in GROWN:
            p = prob.detach().reshape(flat.shape)[i].double().cpu().numpy()  # type: ignore[union-attr]
            cores = np.bincount(labels[p > threshold], minlength=count)
            integral = cv2.integral(p)
        for k, (x, y, w, h) in enumerate(stats[1:count, :4], start=1):
            if shape in GROWN and cores[k] >= SQUARE_MIN_CORE:
                grow = _square_around if shape == "square" else _cover_around
                own = _cover_side(side, smaller, max(w, h), scale) if shape == "cover" else side
                x, y, w, h = grow(integral, x, y, w, h, own)
            out[i, y : y + h, x : x + w] = 1
    return torch.from_numpy(out).to(mask).reshape(mask.shape)


def _cover_side(side: int, smaller: Sequence[int], length: int, scale: float) -> int:
    """The square side a region of longer side ``length`` is covered for: the smallest patch side that
    holds it (``smaller``, else ``side``), capped at ``scale`` times ``length`` when ``scale`` > 0."""
    own = min((s for s in smaller if length <= s < side), default=side)
    return min(own, math.ceil(scale * length)) if scale > 0 else own


def _square_around(integral: np.ndarray, x: int, y: int, w: int, h: int, side: int) -> tuple[int, int, int, int]:
    """The box ``(x, y, w, h)`` grown to at least ``side`` x ``side`` (within the frame), placed among
    those containing it where the summed probability (``integral``: ``cv2.integral`` of the map) is
    highest, the middlemost of equals."""
    rows, cols = integral.shape[0] - 1, integral.shape[1] - 1
    bh, bw = max(h, min(side, rows)), max(w, min(side, cols))
    ys = np.arange(max(0, y + h - bh), min(y, rows - bh) + 1)
    xs = np.arange(max(0, x + w - bw), min(x, cols - bw) + 1)
    top, left = np.meshgrid(ys, xs, indexing="ij")
    mass = integral[top + bh, left + bw] - integral[top, left + bw] - integral[top + bh, left] + integral[top, left]
    off_centre = (top - ys.mean()) ** 2 + (left - xs.mean()) ** 2
    best = np.lexsort((off_centre.ravel(), -np.round(mass.ravel(), 6)))[0]
    return int(left.ravel()[best]), int(top.ravel()[best]), int(bw), int(bh)


def _cover_around(integral: np.ndarray, x: int, y: int, w: int, h: int, side: int) -> tuple[int, int, int, int]:
    """The union of every ``side`` x ``side`` box (within the frame, at least the box's own size) that
    contains the box ``(x, y, w, h)``; ``integral`` only gives the frame's size."""
    rows, cols = integral.shape[0] - 1, integral.shape[1] - 1
    bh, bw = max(h, min(side, rows)), max(w, min(side, cols))
    top, left = max(0, y + h - bh), max(0, x + w - bw)
    return left, top, min(cols, x + bw) - left, min(rows, y + bh) - top


class _StraightThrough(torch.autograd.Function):
    """Forward: the hard mask exactly. Backward: the gradient goes to the soft mask."""

    @staticmethod
    def forward(ctx: Any, hard: Tensor, soft: Tensor) -> Tensor:
        return hard.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor]:
        return None, grad


@dataclass
class SanitizedFrames:
    """:meth:`PatchZero.sanitize_frames` on ``N`` clips of ``T`` frames (the lists are indexed ``[n][t]``)."""

    clean: list[list[np.ndarray]]  # (H, W, 3) uint8; a frame with nothing masked is the input frame itself
    mask: list[list[np.ndarray]]  # (H, W) bool, True = repainted (read-only, may be shared between frames)
    small: np.ndarray  # (N, T, h, w, 3) uint8: the clean frames at the working size, as resize_uint8 gives them


class PatchZero(nn.Module):
    """Detect adversarial patches and repaint them with the dataset mean: ``x' = x*(1-m) + mean*m``.

    Input: clips (N,C,T,H,W) or frames (N,C,H,W) in [0,1]; frames are clips with T=1.
    ``temporal``: "mean" averages the detector's logits over the T frames of each clip (a patch
    that evades detection in some frames is still caught, and the mask does not flicker);
    "ema" additionally keeps an exponential moving average of those fused logits over the clips of
    one stream, ``s <- ema*s + (1-ema)*fused``: the N clips of a batch are consecutive clips and the
    average runs through them in order, then on into the next call (for live streams; ``reset()``
    clears it, a change of frame size restarts it, :meth:`fork` gives another stream its own);
    "median" takes the median of the T frames' logits instead of their mean: a patch seen in most
    frames stays masked however far an attacker drives its logits down in the others, and a
    one-frame false alarm does not mask the clip (its gradient reaches one frame a pixel, so the
    evaluation's ``mean-fused`` variant attacks it through the mean as well);
    "none" masks each frame on its own.
    The mask is ``sigmoid(logit) > threshold`` dilated by ``dilate`` pixels, then with ``complete``
    each of its regions filled to its convex hull or bounding box, or grown to a square of the largest
    patch the threat model allows (``patch_area`` of the working frame, plus the rim), or to the union of
    all such squares that contain it (:func:`complete_mask`; with ``cover_scale`` > 0 a region's squares
    are at most that many times its longer side; with ``patch_areas``, the threat model's smaller patches,
    a region is covered for the smallest of them that holds it, so a small patch found in full greys little).
    With ``min_core`` > 0 a region with fewer than that many pixels over the threshold is dropped before
    completion (:func:`drop_specks`).

    Working resolution: with ``input_size`` ``(h, w)`` (the scale the detector was trained at, which
    travels in its weights' meta) every frame is resized to it (:func:`~streamguard.resize.resize_frames`, area averaging); the logits are fused,
    thresholded and dilated there (``dilate`` is in working-scale pixels), and the mask is upsampled
    (nearest) to the frame, where the repaint is done at full resolution. A patch optimised against the
    downstream model lives at the model's scale; so a mask means the same at every frame size, and the
    detector's cost does not grow with it. Without ``input_size`` the detector sees the frames as they are.

    BPDA: with ``bpda=True`` the forward mask is still exactly the hard mask, but its backward
    is that of the soft mask ``dilate(sigmoid((logit - logit(threshold)) / temperature))``.
    ``temperature=4`` keeps the sigmoid's slope within ~4x of its peak over logits in [-10, 10]
    (a trained detector's range) instead of vanishing like e^-|logit|, so attacks get a usable
    signal from confidently detected patch pixels. Shape completion is in the forward mask only
    (BPDA's identity approximation of it); the ``uncompleted`` evaluation variant attacks the mask
    without it, in case that misleads the attack less. With ``bpda=False`` no gradient flows
    through the mask (only through ``x*(1-m)``) and the detector runs without autograd.
    """

    def __init__(
        self,
        detector: nn.Module,
        mean: Sequence[float] | Tensor,
        threshold: float = 0.5,
        dilate: int = 3,
        temporal: Temporal = "mean",
        ema: float = 0.5,
        input_size: int | Sequence[int] | None = None,
        bpda: bool = False,
        temperature: float = 4.0,
        complete: Complete = "none",
        patch_area: float = 0.1,
        cover_scale: float = 0.0,
        patch_areas: Sequence[float] = (),
        min_core: int = 0,
    ) -> None:
        super().__init__()
        mean = torch.as_tensor(mean, dtype=torch.float32).flatten()
        if mean.numel() != 3:
            raise ConfigError(f"defense mean must have 3 values (one per RGB channel), got {mean.numel()}")
        if not 0 < threshold < 1:
            raise ConfigError(f"defense.threshold must be in (0, 1), got {threshold}")
        if dilate < 0:
            raise ConfigError(f"defense.dilate must be >= 0, got {dilate}")
        if temporal not in TEMPORAL:
            raise ConfigError(f"defense.temporal must be one of {', '.join(TEMPORAL)}, got {temporal!r}")
        if not 0 <= ema < 1:
            raise ConfigError(f"defense.ema must be in [0, 1), got {ema}")
        if not temperature > 0:
            raise ConfigError(f"BPDA temperature must be > 0, got {temperature}")
        if complete not in COMPLETE:
            raise ConfigError(f"defense.complete must be one of {', '.join(COMPLETE)}, got {complete!r}")
        if not 0 < patch_area <= 1:
            raise ConfigError(f"defense.patch_area must be a fraction of the frame in (0, 1], got {patch_area}")
        if any(not 0 < a <= patch_area for a in patch_areas):
            raise ConfigError(f"defense.patch_areas must be fractions of the frame in (0, patch_area = {patch_area}], got {list(patch_areas)}")
        if min_core < 0:
            raise ConfigError(f"defense.min_core must be >= 0 (0: keep every region), got {min_core}")
        if cover_scale < 0:
            raise ConfigError(f"defense.cover_scale must be >= 0 (0: every cover the largest patch's), got {cover_scale}")
        self.detector = detector
        self.threshold, self.dilate, self.temporal, self.ema = float(threshold), int(dilate), temporal, float(ema)
        self.input_size = _size_pair(input_size)
        self.bpda, self.temperature, self.complete = bpda, float(temperature), complete
        self.patch_area, self.cover_scale = float(patch_area), float(cover_scale)
        self.patch_areas = tuple(sorted(float(a) for a in patch_areas))
        self.min_core = int(min_core)
        self.soft_reach: SoftReach = "rim"  # how far BPDA's soft mask is spread (the "grown" and "spread" variants)
        self.register_buffer("mean", mean, persistent=False)
        self._state: Tensor | None = None

    @property
    def meta(self) -> dict[str, Any]:
        """Everything needed to rebuild this defense, JSON-able (stored in checkpoints)."""
        meta: dict[str, Any] = {
            "input_size": list(self.input_size) if self.input_size else None,
            "threshold": self.threshold,
            "dilate": self.dilate,
            "temporal": self.temporal,
            "ema": self.ema,
            "mean": [float(v) for v in self.mean.tolist()],
            "temperature": self.temperature,
            "complete": self.complete,
            **({"patch_area": self.patch_area} if self.complete in GROWN else {}),  # only "square" and "cover" read it
            **({"cover_scale": self.cover_scale} if self.complete == "cover" and self.cover_scale else {}),
            **({"patch_areas": list(self.patch_areas)} if self.complete == "cover" and self.patch_areas else {}),
            **({"min_core": self.min_core} if self.min_core else {}),
        }
        if isinstance(self.detector, PSPNet):
            d = self.detector
            meta.update(backbone=d.backbone, width=d.width, aux=d.aux, refine=d.refine)
        return meta

    def reset(self) -> None:
        """Forget the EMA state (call between videos/streams)."""
        self._state = None

    def fork(self) -> PatchZero:
        """The same defense on the same detector network (shared, not copied) with its own EMA
        state: one per stream when several streams share a model."""
        twin = copy.copy(self)
        twin._modules = dict(self._modules)
        twin._parameters, twin._buffers = dict(self._parameters), dict(self._buffers)
        twin._state = None
        return twin

    @contextmanager
    def bpda_mode(self, enabled: bool = True) -> Iterator[PatchZero]:
        """Temporarily switch the straight-through (BPDA) mask on or off."""
        previous, self.bpda = self.bpda, enabled
        try:
            yield self
        finally:
            self.bpda = previous

    def logits(self, x: Tensor) -> Tensor:
        """Fused detector logits at the frame's size (bilinear from the working scale):
        (N,1,T,H,W) for clips, (N,1,H,W) for frames."""
        clips, frames = _as_clips(x)
        return _restore(self._to_frame(self._fused_logits(clips), clips, "bilinear"), frames)

    def probabilities(self, x: Tensor) -> Tensor:
        return torch.sigmoid(self.logits(x))

    @torch.no_grad()
    def mask(self, x: Tensor) -> Tensor:
        """Binary mask, 1 = adversarial pixel: (N,1,T,H,W) for clips, (N,1,H,W) for frames."""
        clips, frames = _as_clips(x)
        return _restore(self._frame_mask(clips), frames)

    def forward(self, x: Tensor) -> Tensor:
        """Sanitized input, same shape as ``x``; with ``bpda`` the mask is straight-through."""
        clips, frames = _as_clips(x)
        return _restore(self._repaint(clips, self._frame_mask(clips, self.bpda)), frames)

    @torch.no_grad()
    def sanitize(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(x_clean, mask)`` with shapes as ``x`` and its mask, without autograd."""
        clips, frames = _as_clips(x)
        mask = self._frame_mask(clips)
        return _restore(self._repaint(clips, mask), frames), _restore(mask, frames)

    @torch.no_grad()
    def sanitize_frames(self, clips: Sequence[Sequence[np.ndarray]] | np.ndarray) -> SanitizedFrames:
        """Decoded frames: ``N`` clips of ``T`` uint8 ``(H, W, 3)`` RGB frames (nested lists, or one
        ``(N, T, H, W, 3)`` array) -> :class:`SanitizedFrames`.

        The path of :meth:`sanitize` (frames to the working size by area averaging, fused logits,
        threshold and dilation there, nearest upsampling, mean repaint), with the resizes and the
        repaint done on ``uint8`` frames by OpenCV and numpy instead of float tensors: the frame
        never exists in float at full resolution, a frame with nothing masked is not copied, and a
        masked one is touched only inside the mask's bounding box, which is what lets a 720p stream
        run in real time on a CPU. It differs from :meth:`sanitize` on a float copy by the uint8
        rounding of the shrunk frames only.
        """
        n, t = len(clips), len(clips[0])
        h, w = clips[0][0].shape[:2]
        size = self.input_size or (h, w)
        small = np.stack([[resize_uint8(f, size) for f in clip] for clip in clips])  # (N, T, h', w', 3)
        x = torch.from_numpy(small).to(self.mean.device).permute(0, 4, 1, 2, 3).float().div_(255)
        hard = self._hard_mask(self._fused_logits(x))[:, 0].bool().cpu().numpy()  # (N, T', h', w'), T' = 1 when fused
        paint = np.round(self.mean.cpu().numpy() * 255).astype(np.uint8)
        rows, cols = _nearest_index(size[0], h), _nearest_index(size[1], w)
        nothing = np.zeros((h, w), bool)
        nothing.flags.writeable = False
        clean, masks = [list(clip) for clip in clips], [[nothing] * t for _ in range(n)]
        for i, k in np.argwhere(hard.any(axis=(2, 3))):
            ys, xs = np.nonzero(hard[i, k])
            r = np.flatnonzero((rows >= ys.min()) & (rows <= ys.max()))
            c = np.flatnonzero((cols >= xs.min()) & (cols <= xs.max()))
            box = (slice(r[0], r[-1] + 1), slice(c[0], c[-1] + 1))
            full = np.zeros((h, w), bool)
            full[box] = hard[i, k][np.ix_(rows[box[0]], cols[box[1]])]
            for j in range(t) if hard.shape[1] == 1 else [k]:
                frame = np.array(clips[i][j])
                np.copyto(frame[box], paint, where=full[box][..., None])
                clean[i][j], masks[i][j] = frame, full
                refresh_region(frame, small[i, j], *box)
        return SanitizedFrames(clean, masks, small)

    def working_size(self, clips: Tensor) -> tuple[int, int]:
        """The detector's (h, w) for these clips: ``input_size``, or the frames' own size if unset."""
        return self.input_size or (clips.shape[-2], clips.shape[-1])

    def _frame_mask(self, clips: Tensor, straight_through: bool = False) -> Tensor:
        """The mask at the frames' size, (N,1,T,H,W): thresholded and dilated at the working scale,
        then upsampled (nearest), so it means the same at every frame size."""
        if not straight_through:
            with torch.no_grad():
                return self._to_frame(self._hard_mask(self._fused_logits(clips)), clips, "nearest-exact")
        logits = self._fused_logits(clips)
        with torch.no_grad():
            hard = self._to_frame(self._hard_mask(logits), clips, "nearest-exact")
        return _StraightThrough.apply(hard, self._to_frame(self._soft_mask(logits), clips, "bilinear"))

    def _frame_logits(self, clips: Tensor) -> Tensor:
        """Detector on all N*T frames at the working size: (N,C,T,H,W) -> (N,1,T,h,w)."""
        n, c, t, h, w = clips.shape
        size = self.working_size(clips)
        frames = clips.transpose(1, 2).reshape(n * t, c, h, w)
        if size != (h, w):
            frames = resize_frames(frames, size)
        out = self.detector(frames)
        out = out[0] if isinstance(out, tuple) else out
        if out.shape[-2:] != size:
            out = F.interpolate(out, size, mode="bilinear", align_corners=False)
        return out.reshape(n, t, 1, *size).transpose(1, 2)

    @staticmethod
    def _to_frame(t: Tensor, clips: Tensor, mode: str) -> Tensor:
        """(N,1,T',h,w) at the working scale (T' = 1 after fusion) -> (N,1,T,H,W) at the frames' size."""
        n, _, tt, h, w = t.shape
        size = tuple(clips.shape[-2:])
        if (h, w) != size:
            kw = {"align_corners": False} if mode == "bilinear" else {}
            t = F.interpolate(t.reshape(n * tt, 1, h, w), size, mode=mode, **kw).reshape(n, 1, tt, *size)
        return t.expand(n, 1, clips.shape[2], *size)

    def _fused_logits(self, clips: Tensor) -> Tensor:
        logits = self._frame_logits(clips)
        if self.temporal == "none":
            return logits
        if self.temporal == "median":  # (N,1,1,h,w): robust to frames an attacker drives far below the threshold
            return logits.median(dim=2, keepdim=True).values
        fused = logits.mean(dim=2, keepdim=True)  # (N,1,1,h,w): one mask for the clip
        if self.temporal == "ema":
            state = self._state if self._state is not None and self._state.shape == fused.shape[1:] else None
            averaged = []
            for clip in fused.unbind(0):  # (1, 1, h, w) each, in stream order
                state = clip if state is None else self.ema * state.to(clip) + (1 - self.ema) * clip
                averaged.append(state)
            fused, self._state = torch.stack(averaged), state.detach()
        return fused

    def _hard_mask(self, logits: Tensor) -> Tensor:
        prob = torch.sigmoid(logits)
        mask = drop_specks(dilate_mask((prob > self.threshold).to(logits.dtype), self.dilate), prob, self.threshold, self.min_core)
        side = self._patch_side(logits) + 2 * self.dilate  # the largest patch, detected with its rim
        smaller = [self._patch_side(logits, a) + 2 * self.dilate for a in self.patch_areas]
        return complete_mask(mask, self.complete, prob, side, self.threshold, self.cover_scale, smaller)

    def _soft_mask(self, logits: Tensor) -> Tensor:
        center = math.log(self.threshold / (1 - self.threshold))
        reach = self.dilate + self._soft_spread(logits)
        return dilate_mask(torch.sigmoid((logits - center) / self.temperature), reach)

    def _soft_spread(self, logits: Tensor) -> int:
        """How far beyond the rim BPDA's soft mask is spread (``soft_reach``). "rim": not at all.
        "completion", a stand-in for the completion: half the patch's side for "square" (a square centred
        on what was found), the side less one for "cover" (a detected pixel's cover reaches that far),
        nothing for the completions that do not grow. "patch": the side less one whatever the completion."""
        side = self._patch_side(logits)
        if self.soft_reach == "completion":
            return {"square": side // 2, "cover": side - 1}.get(self.complete, 0)
        return side - 1 if self.soft_reach == "patch" else 0

    def _patch_side(self, logits: Tensor, area: float | None = None) -> int:
        """The side of the threat model's largest square patch (or one of ``area``) at the working scale, in pixels."""
        h, w = logits.shape[-2:]
        return round(math.sqrt((area or self.patch_area) * h * w))

    def _repaint(self, clips: Tensor, mask: Tensor) -> Tensor:
        mean = self.mean.to(clips.dtype).view(1, -1, 1, 1, 1)
        return clips * (1 - mask) + mean * mask


class FramesAsClip(nn.Module):
    """A clip defense over consecutive frames: (T, C, H, W) frames -> one (1, C, T, H, W) clip -> frames.

    Per-frame detectors see a video as a batch of frames; wrapped like this, PatchZero still fuses
    its mask over them (and an attack through it in BPDA mode sees the same fused mask).
    """

    def __init__(self, defense: PatchZero) -> None:
        super().__init__()
        self.defense = defense

    @property
    def bpda(self) -> bool:
        return self.defense.bpda

    @bpda.setter
    def bpda(self, value: bool) -> None:
        self.defense.bpda = value

    def forward(self, frames: Tensor) -> Tensor:
        return self.defense(frames.transpose(0, 1).unsqueeze(0)).squeeze(0).transpose(0, 1)


def _nearest_index(n_in: int, n_out: int) -> np.ndarray:
    """Nearest-exact upsampling as indices: output pixel ``i`` of ``n_out`` copies input pixel
    ``floor((i + 0.5) * n_in / n_out)``, as ``F.interpolate(mode="nearest-exact")`` does."""
    return np.minimum(np.floor((np.arange(n_out) + 0.5) * (n_in / n_out)).astype(np.int64), n_in - 1)


def _size_pair(size: int | Sequence[int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    pair = (int(size), int(size)) if isinstance(size, int) else tuple(int(s) for s in size)
    if len(pair) != 2 or min(pair) < 1:
        raise ConfigError(f"defense input_size must be an int or (H, W) of positive ints, got {size!r}")
    return pair  # type: ignore[return-value]


def _as_clips(x: Tensor) -> tuple[Tensor, bool]:
    if x.dim() not in (4, 5) or x.shape[1] != 3:
        raise InputError(f"PatchZero expects (N,3,T,H,W) clips or (N,3,H,W) frames, got shape {tuple(x.shape)}")
    return (x.unsqueeze(2), True) if x.dim() == 4 else (x, False)


def _restore(t: Tensor, frames: bool) -> Tensor:
    return t.squeeze(2) if frames else t


# ----------------------------------------------------------------------------- checkpoints


_DETECTOR_KEYS = ("backbone", "width", "aux", "refine")
_DEFENSE_KEYS = ("mean", "threshold", "dilate", "temporal", "ema", "input_size", "bpda", "temperature", "complete",
                 "patch_area", "cover_scale", "patch_areas", "min_core")  # fmt: skip


def save_defense(defense: PatchZero, path: str | os.PathLike[str], **extra_meta: Any) -> str:
    """Save the detector's weights with the defense's ``meta`` (plus ``extra_meta``); returns the sha256."""
    if not isinstance(defense.detector, PSPNet):
        raise ConfigError(f"save_defense needs a PSPNet detector, got {type(defense.detector).__name__}")
    state_dict = {k: v.detach().cpu() for k, v in defense.detector.state_dict().items()}
    return save_checkpoint(path, state_dict, {"kind": "patchzero", **defense.meta, **extra_meta})


def load_defense(ref: str | os.PathLike[str] | Weights, **overrides: Any) -> PatchZero:
    """Rebuild a :class:`PatchZero` (in eval mode) from a shipped name, a path or :class:`Weights`.

    ``overrides`` replace meta values (``threshold=0.3``, ``temporal="none"``...); ``None`` means
    "keep the checkpoint's value". A state dict that does not fit the rebuilt network raises
    :class:`CheckpointError` naming the offending keys.
    """
    unknown = sorted(set(overrides) - set(_DETECTOR_KEYS) - set(_DEFENSE_KEYS))
    if unknown:
        raise ConfigError(f"load_defense: unknown option(s) {', '.join(unknown)}")
    weights = get_weights(ref)
    state_dict, saved = weights.load()
    meta = {**saved, **{k: v for k, v in overrides.items() if v is not None}}
    if "backbone" not in meta:
        raise CheckpointError(f"{weights.path}: no 'backbone' in its metadata; pass backbone=... to load it")
    if "mean" not in meta:
        raise CheckpointError(f"{weights.path}: no 'mean' in its metadata; pass mean=... (the model's dataset mean)")
    aux = meta.get("aux", any(k.startswith("aux_head.") for k in state_dict))
    detector = PSPNet(meta["backbone"], aux=aux, width=meta.get("width", 1.0), refine=meta.get("refine", False))
    built = f"{meta['backbone']} width {detector.width:g}"
    stored = f"{saved.get('backbone', '?')} width {float(saved.get('width', 1.0)):g}" if saved else "no metadata"
    load_state_dict_checked(detector, state_dict, f"checkpoint {weights.path} (saved: {stored}; built: {built}) does not match the network")
    defense = PatchZero(detector, **{k: meta[k] for k in _DEFENSE_KEYS if k in meta})
    return defense.eval()


def build_defense(
    section: DefenseSection | None = None,
    *,
    weights: str | os.PathLike[str] | Weights | None = None,
    detector: nn.Module | None = None,
    mean: Sequence[float] | None = None,
    **overrides: Any,
) -> PatchZero:
    """The one factory from a recipe's ``[defense]`` table to a :class:`PatchZero`.

    Settings, later ones winning: the checkpoint's meta, the recipe's ``section`` (``threshold``,
    ``dilate``, ``temporal``, ``ema``, and ``input_size``, ``complete``, ``patch_area``, ``patch_areas``, ``cover_scale`` and ``min_core`` when it
    sets them), then ``overrides`` (``None`` keeps the value before). ``mean`` is the downstream model's dataset mean, the colour
    of the repaint. With ``detector`` (a network being trained) no checkpoint is read and the working
    resolution defaults to none; otherwise the weights are ``weights``, else ``section.weights``,
    else the shipped default detector. A ``.onnx`` path (``streamguard export``) runs under ONNX Runtime.
    """
    settings: dict[str, Any] = {}
    if section is not None:
        settings = {"threshold": section.threshold, "dilate": section.dilate, "temporal": section.temporal,
                    "ema": section.ema, "input_size": section.input_size, "complete": section.complete,
                    "patch_area": section.patch_area, "cover_scale": section.cover_scale,
                    "patch_areas": section.patch_areas, "min_core": section.min_core}  # fmt: skip
    settings |= {k: v for k, v in overrides.items() if v is not None}
    if mean is not None:
        settings["mean"] = tuple(float(v) for v in mean)
    if detector is not None:
        if "mean" not in settings:
            raise ConfigError("build_defense: a detector without weights needs mean=... (the model's dataset mean)")
        return PatchZero(detector, **{k: v for k, v in settings.items() if v is not None})
    ref = weights or (section.weights if section is not None else None) or DEFAULT_DETECTOR
    if str(ref).endswith(".onnx"):  # `streamguard export`'s graph, run by ONNX Runtime
        return load_onnx_defense(ref, **settings)
    return load_defense(ref, **settings)


def load_onnx_defense(path: str | os.PathLike[str], threads: int | None = None, **overrides: Any) -> PatchZero:
    """A :class:`PatchZero` around a detector exported by ``streamguard export``, run by ONNX Runtime,
    with the settings of the graph's ``.json`` (``overrides`` win; ``None`` keeps the value)."""
    from .export import OnnxDetector

    detector = OnnxDetector(path, threads)
    m = {**detector.meta, **{k: v for k, v in overrides.items() if v is not None}}
    return PatchZero(detector, **{k: m[k] for k in _DEFENSE_KEYS if k in m and k != "bpda"}).eval()


def art_preprocessor(defense: PatchZero, bpda: bool = True, apply_fit: bool = False) -> Any:
    """PatchZero as an ART preprocessing defence, to put in front of any ART estimator.

    ``PyTorchClassifier(..., preprocessing_defences=[art_preprocessor(defense)])`` sanitizes every
    input the estimator sees; with ``bpda=True`` ART's gradients flow through the defense's
    straight-through mask (hard threshold forward, sigmoid backward), so ART attacks on that
    estimator are adaptive BPDA attacks.
    """
    from art.defences.preprocessor.preprocessor import PreprocessorPyTorch

    class PatchZeroPreprocessor(PreprocessorPyTorch):
        def __init__(self) -> None:
            device = next(iter(defense.parameters()), torch.empty(0)).device
            super().__init__(device_type="gpu" if device.type == "cuda" else "cpu", is_fitted=True,
                             apply_fit=apply_fit, apply_predict=True)  # fmt: skip
            self.defense = defense

        def forward(self, x: Tensor, y: Any = None) -> tuple[Tensor, Any]:
            previous = self.defense.bpda
            self.defense.bpda = bpda
            try:
                return self.defense(x), y
            finally:
                self.defense.bpda = previous

    return PatchZeroPreprocessor()
