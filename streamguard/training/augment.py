"""Clip augmentations for training: temporal/spatial/colour jitter and label-changing symmetries."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor


def augment_clips(x: Tensor, clip_len: int, gen: torch.Generator, colour: float = 0.2, shift: int = 0) -> Tensor:
    """Temporal, spatial and colour jitter of ``(B, 3, W, H, W)`` windows -> ``(B, 3, clip_len, H, W)``.

    No flips: SynthMotion's classes are motion directions, which a flip changes. Each clip gets a
    random start inside its window, a random translation of up to ``shift`` pixels (the same for
    all its frames, so the motion is unchanged), a random RGB channel order, and random brightness,
    contrast and saturation factors in ``[1 - colour, 1 + colour]``: appearance carries no class
    information, so the network should not be able to rely on it.
    """
    b, _, window, _, _ = x.shape
    starts = torch.randint(0, window - clip_len + 1, (b,), generator=gen).tolist()
    orders = [torch.randperm(3, generator=gen) for _ in range(b)]
    shifts = torch.randint(-shift, shift + 1, (b, 2), generator=gen).tolist()
    x = torch.stack([
        torch.roll(x[i, order, s : s + clip_len], (dy, dx), (2, 3))
        for i, (order, s, (dy, dx)) in enumerate(zip(orders, starts, shifts))
    ])  # fmt: skip
    f = 1 + colour * (2 * torch.rand(3, b, 1, 1, 1, 1, generator=gen) - 1)
    x = x * f[0]
    mean = x.mean(dim=(1, 2, 3, 4), keepdim=True)
    x = (x - mean) * f[1] + mean
    grey = x.mean(dim=1, keepdim=True)
    x = (x - grey) * f[2] + grey
    return x.clamp(0, 1)


def mirror_clips(x: Tensor, y: Tensor, labels: Mapping[str, Sequence[int]], gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Apply each label-changing symmetry to half of the ``(B, 3, T, H, W)`` clips, independently.

    ``labels[name][i]`` is class ``i``'s label after symmetry ``name`` (``"hflip"``: mirror left-right,
    ``"reverse"``: play backwards; :func:`streamguard.data.symmetry_labels`).
    """
    x, y = x.clone(), y.clone()
    for name, perm in labels.items():
        pick = torch.rand(len(x), generator=gen) < 0.5
        dim = {"hflip": 4, "reverse": 2}[name]
        x[pick] = x[pick].flip(dim)
        y[pick] = torch.as_tensor(perm, dtype=y.dtype)[y[pick]]
    return x, y


def clip_frames(x: Tensor) -> Tensor:
    """``(B, C, T, H, W)`` -> ``(B*T, C, H, W)``."""
    b, c, t, h, w = x.shape
    return x.transpose(1, 2).reshape(b * t, c, h, w)
