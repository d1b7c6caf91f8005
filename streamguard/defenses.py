"""The defense protocol, and the baselines PatchZero is compared with.

Every defense (PatchZero and each baseline) implements :class:`Defense`: ``sanitize(x) -> (x_clean,
mask)`` without gradients, ``reset()`` between videos, ``forward(x)`` for attacks through the
defense, and ``bpda`` (whether adaptive attacks go through it). Adversarial training, the other
baseline of the paper, changes the downstream model's weights rather than its input: train it with
the training recipe and evaluate it with ``model.weights`` pointing at the result and the ``none``
defense.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor, nn

from .codecs import h264_roundtrip
from .errors import ConfigError, InputError
from .patchzero import build_defense

if TYPE_CHECKING:
    from .recipes import Recipe


@runtime_checkable
class Defense(Protocol):
    """What the pipeline, the evaluation grid and the attacks need of a defense.

    Shapes: clips ``(N, 3, T, H, W)`` or frames ``(N, 3, H, W)`` in [0, 1]; masks ``(N, 1, T, H, W)``
    / ``(N, 1, H, W)``, 1 = adversarial pixel.
    """

    bpda: bool

    def sanitize(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(x_clean, mask)``, same shapes as ``x`` and its mask, without autograd."""
        ...

    def reset(self) -> None:
        """Forget temporal state between videos or streams."""
        ...

    def __call__(self, x: Tensor) -> Tensor:
        """The sanitized input, differentiable for attacks (straight-through where ``bpda``)."""
        ...


class Preprocessor(nn.Module):
    """A baseline defense: a non-differentiable ``transform`` of the pixels.

    ``forward`` is the straight-through (BPDA) version used by attacks: exact forward, identity backward.
    It always is; ``bpda`` only marks the module as attackable in ``MaskedAttack(mode="bpda")``.
    """

    bpda = True

    def transform(self, x: Tensor) -> Tensor:
        return x

    def reset(self) -> None:
        """Baselines keep no state between videos."""

    @torch.no_grad()
    def sanitize(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``x`` ``(N, 3, T, H, W)`` or ``(N, 3, H, W)`` in [0, 1] -> ``(x_clean, mask)``; baselines mark no pixel."""
        return self.transform(x), torch.zeros_like(x[:, :1])

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            y = self.transform(x)
        return x + (y - x).detach()


class NoDefense(Preprocessor):
    """The undefended model: the identity."""

    def forward(self, x: Tensor) -> Tensor:
        return x


class GTMask(Preprocessor):
    """Repaint the *true* patch region with the dataset mean: the approach's upper bound.

    The true mask ``(N, 1, T, H, W)`` / ``(N, 1, H, W)`` is given per call (``sanitize(x, mask=m)``) or
    set for the following calls with :meth:`set_mask` (``forward`` for attacks uses the latter).
    """

    def __init__(self, mean: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32), persistent=False)
        self.true_mask: Tensor | None = None

    def set_mask(self, mask: Tensor | None) -> None:
        self.true_mask = mask

    def reset(self) -> None:
        self.true_mask = None

    def repaint(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        mask = self.true_mask if mask is None else mask
        if mask is None:
            raise InputError("GTMask needs the true patch mask: call set_mask(m) or pass sanitize(x, mask=m)")
        if mask.shape[0] != x.shape[0] or mask.shape[2:] != x.shape[2:]:
            raise InputError(f"GTMask: mask of shape {tuple(mask.shape)} does not match clips of shape {tuple(x.shape)}")
        mean = self.mean.view((1, 3) + (1,) * (x.dim() - 2)).to(x)
        mask = mask.to(x)
        return x * (1 - mask) + mean * mask

    @torch.no_grad()
    def sanitize(self, x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        x_clean = self.repaint(x, mask)
        return x_clean, (self.true_mask if mask is None else mask).to(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.repaint(x)


class JpegDefense(Preprocessor):
    """JPEG compression of every frame (ART's ``JpegCompression``; Dziugaite et al. 2016)."""

    def __init__(self, quality: int = 75) -> None:
        super().__init__()
        from art.defences.preprocessor import JpegCompression

        if not 1 <= quality <= 95:
            raise ConfigError(f"evaluate.jpeg_quality: expected 1..95, got {quality}")
        self.quality = quality
        self.jpeg = JpegCompression(clip_values=(0.0, 1.0), quality=quality, channels_first=True, apply_predict=True)

    def transform(self, x: Tensor) -> Tensor:
        out, _ = self.jpeg(x.detach().clamp(0, 1).cpu().numpy().astype(np.float32))
        return torch.from_numpy(np.ascontiguousarray(out)).to(x)


class VideoCompression(Preprocessor):
    """H.264 re-encoding of each clip (libx264 through PyAV, in memory, at a given CRF).

    Frames ``(N, 3, H, W)`` are encoded as one-frame videos (intra coding only).
    """

    def __init__(self, crf: int = 28, preset: str = "medium") -> None:
        super().__init__()
        if not 0 <= crf <= 51:
            raise ConfigError(f"evaluate.h264_crf: expected 0..51, got {crf}")
        self.crf, self.preset = crf, preset

    def transform(self, x: Tensor) -> Tensor:
        clips = x if x.dim() == 5 else x[:, :, None]
        u8 = (clips.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 4, 1).cpu().numpy()
        out = np.stack([h264_roundtrip(c, self.crf, preset=self.preset) for c in u8])
        y = torch.from_numpy(out).permute(0, 4, 1, 2, 3).to(x) / 255
        return y if x.dim() == 5 else y[:, :, 0]


# ---------------------------------------------------------------- the grid

DEFENSES = ("none", "gt", "jpeg", "h264", "patchzero")
ADAPTIVE = ("jpeg", "h264", "patchzero")  # defenses attacked through in bpda mode


def build_defenses(recipe: Recipe, model: nn.Module, patchzero: nn.Module | None = None) -> dict[str, nn.Module]:
    """The recipe's defenses by name; PatchZero is built from the recipe's ``[defense]`` unless given."""
    ev = recipe.evaluate
    makers: dict[str, Callable[[], nn.Module]] = {
        "none": NoDefense,
        "gt": lambda: GTMask(model.spec.mean),
        "jpeg": lambda: JpegDefense(ev.jpeg_quality),
        "h264": lambda: VideoCompression(ev.h264_crf),
        "patchzero": lambda: patchzero if patchzero is not None else build_defense(recipe.defense, mean=model.spec.mean),
    }
    return {name: makers[name]().eval() for name in ev.defenses}
