"""Clips with per-frame object boxes (:class:`BoxClips`), for per-frame detectors.

Each video has a sidecar ``<video>.boxes.json`` with the object's per-frame box (xyxy, pixels of
the written frame); boxes follow the clip's centre crop and resize.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import InputError
from .ucf101 import UCF101Clips, open_video


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
    container, stream = open_video(Path(video_path))
    with container:
        return int(stream.codec_context.height), int(stream.codec_context.width)
