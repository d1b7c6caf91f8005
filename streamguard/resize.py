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

import cv2
import numpy as np
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


def resize_uint8(frame: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``(H, W, C)`` uint8 -> ``(*size, C)``, by OpenCV: area averaging to shrink, bilinear to enlarge;
    the frame itself when already that size."""
    h, w = size
    big_h, big_w = frame.shape[:2]
    if (big_h, big_w) == (h, w):
        return frame
    if h > big_h or w > big_w:
        return cv2.resize(frame, (w, h), interpolation=cv2.INTER_LINEAR)
    if (big_h % h or big_w % w) and w < big_w and h < big_h:
        # area averaging is separable; OpenCV is fast at integer factors, and rows first is up to 2.5x
        # faster than one 2-D pass at fractional ones (720p to 64x64: 1.2 vs 2.7 ms)
        frame = cv2.resize(frame, (w, big_h), interpolation=cv2.INTER_AREA)
    return cv2.resize(frame, (w, h), interpolation=cv2.INTER_AREA)


def refresh_region(frame: np.ndarray, small: np.ndarray, rows: slice, cols: slice) -> None:
    """After the pixels ``frame[rows, cols]`` (``(H, W, C)`` uint8) changed, bring ``small``, its
    :func:`resize_uint8` to ``(h, w)``, up to date in place: a shrink recomputes only the output pixels
    those input pixels average into (exact area weights, like ``INTER_AREA``; equal up to rounding),
    so a repainted patch does not cost a second full-frame resize."""
    big_h, big_w = frame.shape[:2]
    h, w = small.shape[:2]
    if h > big_h or w > big_w:
        small[...] = resize_uint8(frame, (h, w))
        return
    i0, i1 = rows.start * h // big_h, -(-rows.stop * h // big_h)
    j0, j1 = cols.start * w // big_w, -(-cols.stop * w // big_w)
    a, b = i0 * big_h // h, -(-i1 * big_h // h)
    c, d = j0 * big_w // w, -(-j1 * big_w // w)
    r, q = area_matrix(big_h, h)[i0:i1, a:b], area_matrix(big_w, w)[j0:j1, c:d]
    box = torch.from_numpy(np.ascontiguousarray(frame[a:b, c:d])).float().permute(2, 0, 1)  # (C, rows, cols)
    region = (r @ box @ q.T).permute(1, 2, 0)  # torch's threads, not a second BLAS pool beside them
    small[i0:i1, j0:j1] = region.round_().clamp_(0, 255).to(torch.uint8).numpy()
