"""Frames to a model's scale, the same way everywhere: the detector's working size and the model's input.

Area averaging to shrink: the antialiased resize that OpenCV's ``INTER_AREA`` (used to read UCF101
and to attack videos) computes, and that undoes an enlargement exactly at integer factors, where a
wide bilinear kernel would blur a patch's texture into its surroundings. Bilinear to enlarge.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def resize_frames(frames: Tensor, size: tuple[int, int]) -> Tensor:
    """``(B, C, H, W)`` float frames -> ``(B, C, *size)``; returned as is when already that size."""
    if tuple(frames.shape[-2:]) == tuple(size):
        return frames
    if size[0] <= frames.shape[-2] and size[1] <= frames.shape[-1]:
        return F.interpolate(frames, size, mode="area")
    return F.interpolate(frames, size, mode="bilinear", align_corners=False)
