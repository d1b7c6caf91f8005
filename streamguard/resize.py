"""Frames to a model's scale, the same way everywhere: the detector's working size and the model's input.

Shrinking is area averaging with exact fractional pixel overlaps, which is what OpenCV's
``INTER_AREA`` computes (used to read UCF101, to attack videos and, on ``uint8`` frames, in the live
pipeline), so the float path here and the ``uint8`` path there see the same pixels up to rounding.
It is the antialiased resize that undoes an enlargement exactly at integer factors, where a wide
bilinear kernel would blur a patch's texture into its surroundings; it is linear, so attacks
differentiate through it. Enlarging is bilinear.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor


@lru_cache(maxsize=32)
def area_matrix(n_in: int, n_out: int) -> Tensor:
    """``(n_out, n_in)`` weights: output pixel ``i`` averages input pixels over ``[i, i+1) * n_in / n_out``."""
    scale = n_in / n_out
    edges = torch.arange(n_out + 1, dtype=torch.float64) * scale
    j = torch.arange(n_in, dtype=torch.float64)
    overlap = (torch.minimum(edges[1:, None], j + 1) - torch.maximum(edges[:-1, None], j)).clamp(min=0)
    return (overlap / scale).float()


def resize_frames(frames: Tensor, size: tuple[int, int]) -> Tensor:
    """``(B, C, H, W)`` float frames -> ``(B, C, *size)``; returned as is when already that size."""
    h, w = frames.shape[-2:]
    if (h, w) == tuple(size):
        return frames
    if size[0] <= h and size[1] <= w:
        rows, cols = area_matrix(h, size[0]).to(frames), area_matrix(w, size[1]).to(frames)
        return rows @ (frames @ cols.T)
    return F.interpolate(frames, size, mode="bilinear", align_corners=False)
