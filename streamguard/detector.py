"""The patch detector: a PSPNet that maps frames in [0, 1] to per-pixel logits of "adversarial".

Backbones come from one table (:data:`BACKBONE_SPECS`): the paper's dilated ResNet-50, and
ResNet-18 / MobileNetV3 for CPU and live use. :mod:`streamguard.patchzero` turns the detector
into the defense.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import mobilenet_v3_large
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from .checkpoints import (
    Weights,
    check_state_dict,
    get_weights,
    load_checkpoint,
    load_state_dict_checked,
)
from .errors import ConfigError

Backbone = Literal["resnet50", "resnet18", "mobilenet_v3"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PPM_BINS = (1, 2, 3, 6)


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


def _resnet_stages(net: nn.Module, pretrained: str | os.PathLike[str] | None) -> tuple[nn.Module, nn.Module]:
    if pretrained is not None:
        _load_pretrained_(net, pretrained, "fc.")
    names = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3")
    low = nn.Sequential(OrderedDict((n, getattr(net, n)) for n in names))
    return low, nn.Sequential(OrderedDict(layer4=net.layer4))


def _resnet50(width: float, pretrained: str | os.PathLike[str] | None) -> tuple[nn.Module, nn.Module]:
    net = _ScaledResNet(Bottleneck, [3, 4, 6, 3], width, replace_stride_with_dilation=[False, True, True])
    return _resnet_stages(net, pretrained)


def _resnet18(width: float, pretrained: str | os.PathLike[str] | None) -> tuple[nn.Module, nn.Module]:
    net = _ScaledResNet(BasicBlock, [2, 2, 2, 2], width)  # BasicBlock refuses torchvision's dilation flag
    _remove_stride_(net.layer3, 2)
    _remove_stride_(net.layer4, 4)
    return _resnet_stages(net, pretrained)


def _mobilenet_v3(width: float, pretrained: str | os.PathLike[str] | None) -> tuple[nn.Module, nn.Module]:
    net = mobilenet_v3_large(weights=None, width_mult=width)
    if pretrained is not None:
        _load_pretrained_(net, pretrained, "classifier.")
    strided = [i for i, block in enumerate(net.features) if getattr(block, "_is_cn", False)]
    s16, s32 = strided[-2:]
    _remove_stride_(net.features[s16:s32], 2)
    _remove_stride_(net.features[s32:], 4)
    return net.features[:s32], net.features[s32:]


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one detector backbone at output stride 8: ``build(width, pretrained) -> (low, high)``
    (``low`` ends at the layer3-equivalent features the aux head reads) and the (pyramid branch,
    head, aux head) channels at width 1."""

    build: Callable[[float, str | os.PathLike[str] | None], tuple[nn.Module, nn.Module]]
    heads: tuple[int, int, int]


# The paper's ResNet-50 head widths, lighter ones for the CPU backbones.
BACKBONE_SPECS: dict[str, BackboneSpec] = {
    "resnet50": BackboneSpec(_resnet50, (512, 512, 256)),
    "resnet18": BackboneSpec(_resnet18, (128, 128, 64)),
    "mobilenet_v3": BackboneSpec(_mobilenet_v3, (64, 128, 64)),
}
BACKBONES: tuple[str, ...] = tuple(BACKBONE_SPECS)


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

    ``refine`` adds a DeepLabv3+-style decoder (:class:`Refinement`): the head's stride-8 features,
    upsampled, meet a stride-4 backbone feature, so the mask's edges are placed to 4 pixels rather
    than 8 and less dilation is needed. ``refine=False`` is the paper's plain PSPNet.
    """

    def __init__(
        self,
        backbone: Backbone = "resnet50",
        aux: bool = True,
        pretrained_backbone: str | os.PathLike[str] | None = None,
        width: float = 1.0,
        refine: bool = False,
    ) -> None:
        super().__init__()
        if backbone not in BACKBONES:
            raise ConfigError(f"defense.backbone: unknown detector backbone {backbone!r} (choose {', '.join(BACKBONES)})")
        if not width > 0:
            raise ConfigError(f"detector width must be > 0, got {width}")
        self.backbone, self.width, self.aux, self.refine = backbone, float(width), aux, refine
        spec = BACKBONE_SPECS[backbone]
        self.low, self.high = spec.build(width, pretrained_backbone)
        branch, head, aux_head = (_scale(c, width) for c in spec.heads)
        feat = _out_channels(self.high)
        self.ppm = PyramidPooling(feat, branch)
        layers = [*_conv_bn_relu(feat + len(PPM_BINS) * branch, head, 3), nn.Dropout2d(0.1)]
        self.head = nn.Sequential(*layers) if refine else nn.Sequential(*layers, nn.Conv2d(head, 1, 1))
        self.skip_index, skip = _stride4_feature(self.low) if refine else (None, 0)
        self.refinement = Refinement(skip, head, _scale(48, width)) if refine else None
        self.aux_head = (
            nn.Sequential(*_conv_bn_relu(_out_channels(self.low), aux_head, 3), nn.Dropout2d(0.1), nn.Conv2d(aux_head, 1, 1))
            if aux
            else None
        )
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        size = x.shape[-2:]
        low, skip = (x - self.pixel_mean) / self.pixel_std, None
        for i, layer in enumerate(self.low):
            low = layer(low)
            skip = low if i == self.skip_index else skip
        out = self.head(self.ppm(self.high(low)))
        if self.refinement is not None:
            out = self.refinement(out, skip)
        logits = F.interpolate(out, size, mode="bilinear", align_corners=False)
        if self.training and self.aux_head is not None:
            return logits, F.interpolate(self.aux_head(low), size, mode="bilinear", align_corners=False)
        return logits


class Refinement(nn.Module):
    """Stride-8 head features (B,C,h,w) + a stride-4 skip (B,S,2h,2w) -> logits (B,1,2h,2w)."""

    def __init__(self, skip_channels: int, head_channels: int, reduced: int) -> None:
        super().__init__()
        self.reduce = nn.Sequential(*_conv_bn_relu(skip_channels, reduced, 1))
        self.fuse = nn.Sequential(*_conv_bn_relu(head_channels + reduced, head_channels, 3), nn.Conv2d(head_channels, 1, 1))

    def forward(self, features: Tensor, skip: Tensor) -> Tensor:
        up = F.interpolate(features, skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.fuse(torch.cat([up, self.reduce(skip)], dim=1))


def _stride4_feature(low: nn.Sequential) -> tuple[int, int]:
    """Index of ``low``'s last child whose output is at stride 4, and its channel count."""
    x, found = torch.zeros(1, 3, 64, 64), None
    with torch.no_grad():
        was_training = low.training
        low.eval()
        for i, layer in enumerate(low):
            x = layer(x)
            if x.shape[-1] == 16:
                found = (i, x.shape[1])
        low.train(was_training)
    if found is None:
        raise ConfigError("detector backbone has no stride-4 feature to refine from")
    return found


def build_detector(
    backbone: Backbone, weights: str | os.PathLike[str] | Weights | None = None, **kw: Any
) -> PSPNet:
    """A :class:`PSPNet`; with ``weights`` (shipped name, path or :class:`Weights`) its state is loaded."""
    net = PSPNet(backbone, **kw)
    if weights is not None:
        w = get_weights(weights)
        state_dict, _ = w.load()
        load_state_dict_checked(net, state_dict, f"{w.path} does not match the network")
    return net


def detector_loss(
    outputs: Tensor | tuple[Tensor, Tensor],
    target_mask: Tensor,
    aux_weight: float = 0.4,
    pos_weight: float | Tensor | None = None,
    edge_weight: float = 0.0,
    edge_px: int = 2,
) -> Tensor:
    """PSPNet's loss: BCE-with-logits on the main logits + ``aux_weight`` x the same on the aux logits.

    ``outputs``: logits (B,1,H,W) or ``(logits, aux_logits)``; ``target_mask``: (B,1,H,W) or (B,H,W), 1 = patch.
    ``pos_weight`` up-weights patch pixels (they are a few percent of each frame). ``edge_weight`` adds
    that much weight to the band of ``edge_px`` pixels either side of each patch's border: the patch
    pixels an adaptive attacker leaks through and the scene pixels it makes the detector mask (the
    dilation and shape completion then grow them over the object).
    """
    logits, aux = outputs if isinstance(outputs, tuple) else (outputs, None)
    target = (target_mask.unsqueeze(1) if target_mask.dim() == 3 else target_mask).to(logits.dtype)
    if pos_weight is not None:
        pos_weight = torch.as_tensor(pos_weight, dtype=logits.dtype, device=logits.device)
    weight = 1 + edge_weight * edge_band(target, edge_px) if edge_weight else None
    loss = F.binary_cross_entropy_with_logits(logits, target, weight=weight, pos_weight=pos_weight)
    if aux is not None and aux_weight:
        loss = loss + aux_weight * F.binary_cross_entropy_with_logits(aux, target, weight=weight, pos_weight=pos_weight)
    return loss


def edge_band(mask: Tensor, px: int) -> Tensor:
    """1 on the pixels of ``mask`` (B, 1, H, W) within ``px`` pixels of a border between 0 and 1, on either side."""
    k = 2 * px + 1
    grown = F.max_pool2d(mask, k, 1, px)
    shrunk = -F.max_pool2d(-mask, k, 1, px)
    return grown - shrunk
