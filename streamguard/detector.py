"""The PatchZero defense: a PSPNet patch detector, temporal fusion, threshold, dilation, mean repaint.

``PSPNet`` maps frames in [0, 1] to per-pixel logits of "adversarial"; ``PatchZero`` runs it on
every frame of a clip, fuses the logits over time, thresholds and dilates them into a mask, and
repaints the masked pixels with the downstream model's dataset mean. With ``bpda=True`` the mask
is a straight-through estimator so adaptive (BPDA) attacks can differentiate through the defense.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import mobilenet_v3_large
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from .checkpoints import Weights, check_state_dict, get_weights, load_checkpoint, save_checkpoint
from .errors import CheckpointError, ConfigError, InputError

Backbone = Literal["resnet50", "resnet18", "mobilenet_v3"]
Temporal = Literal["mean", "none", "ema"]

BACKBONES: tuple[str, ...] = ("resnet50", "resnet18", "mobilenet_v3")
TEMPORAL: tuple[str, ...] = ("mean", "none", "ema")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PPM_BINS = (1, 2, 3, 6)

# (pyramid branch, head, aux head) channels at width 1: the paper's ResNet-50 values, lighter for CPU.
_HEAD_CHANNELS = {"resnet50": (512, 512, 256), "resnet18": (128, 128, 64), "mobilenet_v3": (64, 128, 64)}


# ----------------------------------------------------------------------------- backbones


class _ScaledResNet(ResNet):
    """torchvision ResNet whose four stages have ``width`` times the usual channels (stem stays 64)."""

    def __init__(self, block: type[BasicBlock | Bottleneck], layers: list[int], width: float, **kw: Any) -> None:
        self._width = width
        super().__init__(block, layers, **kw)

    def _make_layer(
        self, block: type[BasicBlock | Bottleneck], planes: int, blocks: int, stride: int = 1, dilate: bool = False
    ) -> nn.Sequential:
        return super()._make_layer(block, _scale(planes, self._width), blocks, stride, dilate)


def _scale(channels: int, width: float) -> int:
    return max(8, round(channels * width))


def _remove_stride_(stage: nn.Module, dilation: int) -> None:
    """Make a stride-2 stage stride 1 with dilated convolutions, keeping its receptive field.

    The strided convolution sees the previous stage's resolution and so gets ``dilation // 2``.
    """
    for m in stage.modules():
        if not isinstance(m, nn.Conv2d):
            continue
        d = dilation
        if m.stride == (2, 2):
            m.stride, d = (1, 1), max(1, dilation // 2)
        if m.kernel_size[0] > 1:
            m.dilation = (d, d)
            m.padding = ((m.kernel_size[0] - 1) // 2 * d, (m.kernel_size[1] - 1) // 2 * d)


def _load_pretrained_(net: nn.Module, path: str | os.PathLike[str], skip: str) -> None:
    """Load torchvision ImageNet weights from a local file (classifier keys starting ``skip`` ignored)."""
    state_dict, _ = load_checkpoint(path)
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith(skip)}
    expected = {k: v for k, v in net.state_dict().items() if not k.startswith(skip)}
    check_state_dict(expected, state_dict, f"pretrained backbone {path}")
    net.load_state_dict(state_dict, strict=False)


def _resnet(name: str, width: float, pretrained: str | os.PathLike[str] | None) -> tuple[nn.Module, nn.Module]:
    if name == "resnet50":
        net = _ScaledResNet(Bottleneck, [3, 4, 6, 3], width, replace_stride_with_dilation=[False, True, True])
    else:  # BasicBlock refuses torchvision's dilation flag: dilate layer3/4 by hand
        net = _ScaledResNet(BasicBlock, [2, 2, 2, 2], width)
        _remove_stride_(net.layer3, 2)
        _remove_stride_(net.layer4, 4)
    if pretrained is not None:
        _load_pretrained_(net, pretrained, "fc.")
    names = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3")
    low = nn.Sequential(OrderedDict((n, getattr(net, n)) for n in names))
    return low, nn.Sequential(OrderedDict(layer4=net.layer4))


def _mobilenet(width: float, pretrained: str | os.PathLike[str] | None) -> tuple[nn.Module, nn.Module]:
    net = mobilenet_v3_large(weights=None, width_mult=width)
    if pretrained is not None:
        _load_pretrained_(net, pretrained, "classifier.")
    strided = [i for i, block in enumerate(net.features) if getattr(block, "_is_cn", False)]
    s16, s32 = strided[-2:]
    _remove_stride_(net.features[s16:s32], 2)
    _remove_stride_(net.features[s32:], 4)
    return net.features[:s32], net.features[s32:]


def _out_channels(module: nn.Module) -> int:
    return [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)][-1].num_features


# ----------------------------------------------------------------------------- PSPNet


def _conv_bn_relu(cin: int, cout: int, k: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class PyramidPooling(nn.Module):
    """PSPNet's pyramid pooling module: (B,C,h,w) -> (B, C + len(bins)*branch, h, w)."""

    def __init__(self, in_channels: int, branch_channels: int, bins: Sequence[int] = PPM_BINS) -> None:
        super().__init__()
        self.stages = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(b), *_conv_bn_relu(in_channels, branch_channels, 1)) for b in bins
        )

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        pooled = [F.interpolate(stage(x), size, mode="bilinear", align_corners=False) for stage in self.stages]
        return torch.cat([x, *pooled], dim=1)


class PSPNet(nn.Module):
    """PSPNet patch detector: (B,3,H,W) in [0,1] -> logits of "adversarial" (B,1,H,W).

    Backbones run at output stride 8: ResNet-50 dilated as in the paper, ResNet-18 and
    MobileNetV3-Large dilated the same way for CPU and live use. ``width`` scales every channel
    count (backbone stages and heads) so tests can build tiny networks. In training mode with
    ``aux`` the forward returns ``(logits, aux_logits)``, the auxiliary head reading the
    layer3-equivalent features; both are upsampled to the input size. Backbones start random
    unless ``pretrained_backbone`` points at a local torchvision ImageNet state dict.
    """

    def __init__(
        self,
        backbone: Backbone = "resnet50",
        aux: bool = True,
        pretrained_backbone: str | os.PathLike[str] | None = None,
        width: float = 1.0,
    ) -> None:
        super().__init__()
        if backbone not in BACKBONES:
            raise ConfigError(f"defense.backbone: unknown detector backbone {backbone!r} (choose {', '.join(BACKBONES)})")
        if not width > 0:
            raise ConfigError(f"detector width must be > 0, got {width}")
        self.backbone, self.width, self.aux = backbone, float(width), aux
        if backbone == "mobilenet_v3":
            self.low, self.high = _mobilenet(width, pretrained_backbone)
        else:
            self.low, self.high = _resnet(backbone, width, pretrained_backbone)
        branch, head, aux_head = (_scale(c, width) for c in _HEAD_CHANNELS[backbone])
        feat = _out_channels(self.high)
        self.ppm = PyramidPooling(feat, branch)
        self.head = nn.Sequential(
            *_conv_bn_relu(feat + len(PPM_BINS) * branch, head, 3), nn.Dropout2d(0.1), nn.Conv2d(head, 1, 1)
        )
        self.aux_head = (
            nn.Sequential(*_conv_bn_relu(_out_channels(self.low), aux_head, 3), nn.Dropout2d(0.1), nn.Conv2d(aux_head, 1, 1))
            if aux
            else None
        )
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        size = x.shape[-2:]
        low = self.low((x - self.pixel_mean) / self.pixel_std)
        logits = F.interpolate(self.head(self.ppm(self.high(low))), size, mode="bilinear", align_corners=False)
        if self.training and self.aux_head is not None:
            return logits, F.interpolate(self.aux_head(low), size, mode="bilinear", align_corners=False)
        return logits


def build_detector(
    backbone: Backbone, weights: str | os.PathLike[str] | Weights | None = None, **kw: Any
) -> PSPNet:
    """A :class:`PSPNet`; with ``weights`` (shipped name, path or :class:`Weights`) its state is loaded."""
    net = PSPNet(backbone, **kw)
    if weights is not None:
        w = get_weights(weights)
        state_dict, _ = w.load()
        load_state_dict_checked(net, state_dict, str(w.path))
    return net


def detector_loss(
    outputs: Tensor | tuple[Tensor, Tensor],
    target_mask: Tensor,
    aux_weight: float = 0.4,
    pos_weight: float | Tensor | None = None,
) -> Tensor:
    """PSPNet's loss: BCE-with-logits on the main logits + ``aux_weight`` x the same on the aux logits.

    ``outputs``: logits (B,1,H,W) or ``(logits, aux_logits)``; ``target_mask``: (B,1,H,W) or (B,H,W), 1 = patch.
    ``pos_weight`` up-weights patch pixels (they are a few percent of each frame).
    """
    logits, aux = outputs if isinstance(outputs, tuple) else (outputs, None)
    target = (target_mask.unsqueeze(1) if target_mask.dim() == 3 else target_mask).to(logits.dtype)
    if pos_weight is not None:
        pos_weight = torch.as_tensor(pos_weight, dtype=logits.dtype, device=logits.device)
    loss = F.binary_cross_entropy_with_logits(logits, target, pos_weight=pos_weight)
    if aux is not None and aux_weight:
        loss = loss + aux_weight * F.binary_cross_entropy_with_logits(aux, target, pos_weight=pos_weight)
    return loss


# ----------------------------------------------------------------------------- PatchZero


def dilate_mask(mask: Tensor, radius: int) -> Tensor:
    """Binary dilation with a (2r+1)x(2r+1) square over the last two dims; same as ``cv2.dilate``.

    A max-pool, so it runs on any device and inside autograd. ``mask``: (..., H, W).
    """
    if radius <= 0:
        return mask
    shape = mask.shape
    flat = mask.reshape(-1, 1, *shape[-2:])
    return F.max_pool2d(flat, 2 * radius + 1, stride=1, padding=radius).reshape(shape)


class _StraightThrough(torch.autograd.Function):
    """Forward: the hard mask exactly. Backward: the gradient goes to the soft mask."""

    @staticmethod
    def forward(ctx: Any, hard: Tensor, soft: Tensor) -> Tensor:
        return hard.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor]:
        return None, grad


class PatchZero(nn.Module):
    """Detect adversarial patches and repaint them with the dataset mean: ``x' = x*(1-m) + mean*m``.

    Input: clips (N,C,T,H,W) or frames (N,C,H,W) in [0,1]; frames are clips with T=1.
    ``temporal``: "mean" averages the detector's logits over the T frames of each clip (a patch
    that evades detection in some frames is still caught, and the mask does not flicker);
    "ema" additionally keeps an exponential moving average of those fused logits across calls,
    ``s <- ema*s + (1-ema)*fused`` per batch index (for live streams; every call advances it,
    ``reset()`` clears it, a change of shape restarts it); "none" masks each frame on its own.
    The mask is ``sigmoid(logit) > threshold`` dilated by ``dilate`` pixels.

    BPDA: with ``bpda=True`` the forward mask is still exactly the hard mask, but its backward
    is that of the soft mask ``dilate(sigmoid((logit - logit(threshold)) / temperature))``.
    ``temperature=4`` keeps the sigmoid's slope within ~4x of its peak over logits in [-10, 10]
    (a trained detector's range) instead of vanishing like e^-|logit|, so attacks get a usable
    signal from confidently detected patch pixels. With ``bpda=False`` no gradient flows
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
        self.detector = detector
        self.threshold, self.dilate, self.temporal, self.ema = float(threshold), int(dilate), temporal, float(ema)
        self.input_size = _size_pair(input_size)
        self.bpda, self.temperature = bpda, float(temperature)
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
        }
        if isinstance(self.detector, PSPNet):
            meta.update(backbone=self.detector.backbone, width=self.detector.width, aux=self.detector.aux)
        return meta

    def reset(self) -> None:
        """Forget the EMA state (call between videos/streams)."""
        self._state = None

    @contextmanager
    def bpda_mode(self, enabled: bool = True) -> Iterator[PatchZero]:
        """Temporarily switch the straight-through (BPDA) mask on or off."""
        previous, self.bpda = self.bpda, enabled
        try:
            yield self
        finally:
            self.bpda = previous

    def logits(self, x: Tensor) -> Tensor:
        """Fused detector logits: (N,1,T,H,W) for clips, (N,1,H,W) for frames."""
        clips, frames = _as_clips(x)
        return _restore(self._fused_logits(clips), frames)

    def probabilities(self, x: Tensor) -> Tensor:
        return torch.sigmoid(self.logits(x))

    @torch.no_grad()
    def mask(self, x: Tensor) -> Tensor:
        """Binary mask, 1 = adversarial pixel: (N,1,T,H,W) for clips, (N,1,H,W) for frames."""
        return self._hard_mask(self.logits(x))

    def forward(self, x: Tensor) -> Tensor:
        """Sanitized input, same shape as ``x``."""
        clips, frames = _as_clips(x)
        if self.bpda:
            logits = self._fused_logits(clips)
            with torch.no_grad():
                hard = self._hard_mask(logits)
            mask = _StraightThrough.apply(hard, self._soft_mask(logits))
        else:
            with torch.no_grad():
                mask = self._hard_mask(self._fused_logits(clips))
        return _restore(self._repaint(clips, mask), frames)

    @torch.no_grad()
    def sanitize(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(x_clean, mask)`` with shapes as ``x`` and its mask, without autograd."""
        clips, frames = _as_clips(x)
        mask = self._hard_mask(self._fused_logits(clips))
        return _restore(self._repaint(clips, mask), frames), _restore(mask, frames)

    def _frame_logits(self, clips: Tensor) -> Tensor:
        """Detector on all N*T frames, at ``input_size`` if set: (N,C,T,H,W) -> (N,1,T,H,W)."""
        n, c, t, h, w = clips.shape
        frames = clips.permute(0, 2, 1, 3, 4).reshape(n * t, c, h, w)
        if self.input_size and self.input_size != (h, w):
            frames = F.interpolate(frames, self.input_size, mode="bilinear", align_corners=False, antialias=True)
        out = self.detector(frames)
        out = out[0] if isinstance(out, tuple) else out
        if out.shape[-2:] != (h, w):
            out = F.interpolate(out, (h, w), mode="bilinear", align_corners=False)
        return out.reshape(n, t, 1, h, w).permute(0, 2, 1, 3, 4)

    def _fused_logits(self, clips: Tensor) -> Tensor:
        logits = self._frame_logits(clips)
        if self.temporal == "none":
            return logits
        fused = logits.mean(dim=2, keepdim=True)
        if self.temporal == "ema":
            if self._state is not None and self._state.shape == fused.shape:
                fused = self.ema * self._state.to(fused) + (1 - self.ema) * fused
            self._state = fused.detach()
        return fused.expand_as(logits)

    def _hard_mask(self, logits: Tensor) -> Tensor:
        return dilate_mask((torch.sigmoid(logits) > self.threshold).to(logits.dtype), self.dilate)

    def _soft_mask(self, logits: Tensor) -> Tensor:
        center = math.log(self.threshold / (1 - self.threshold))
        return dilate_mask(torch.sigmoid((logits - center) / self.temperature), self.dilate)

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


_DETECTOR_KEYS = ("backbone", "width", "aux")
_DEFENSE_KEYS = ("mean", "threshold", "dilate", "temporal", "ema", "input_size", "bpda", "temperature")


def load_state_dict_checked(module: nn.Module, state_dict: dict[str, Tensor], where: str) -> None:
    check_state_dict(module.state_dict(), state_dict, f"{where} does not match the network")
    module.load_state_dict(state_dict)


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
    detector = PSPNet(meta["backbone"], aux=aux, width=meta.get("width", 1.0))
    built = f"{meta['backbone']} width {detector.width:g}"
    stored = f"{saved.get('backbone', '?')} width {float(saved.get('width', 1.0)):g}" if saved else "no metadata"
    load_state_dict_checked(detector, state_dict, f"checkpoint {weights.path} (saved: {stored}; built: {built})")
    defense = PatchZero(detector, **{k: meta[k] for k in _DEFENSE_KEYS if k in meta})
    return defense.eval()


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
