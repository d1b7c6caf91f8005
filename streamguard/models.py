"""Downstream models: a registry of builders, their :class:`ModelSpec`, and the ART adapter.

Every model takes float RGB in [0, 1] and normalizes internally, so attacks and defenses
work in pixel space with ``clip_values=(0, 1)``.

* clip classifiers (``task="clip"``) map ``(N, 3, T, H, W)`` -> logits ``(N, K)``:
  MARS' 3D ResNeXt-101 (``mars``), every ``torchvision.models.video`` network and ``tiny3d``;
* frame detectors (``task="frame"``) are torchvision's Faster R-CNN:
  ``list[(3, H, W)]`` -> ``list[{"boxes", "labels", "scores"}]``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from .checkpoints import Weights, get_weights, load_state_dict_checked, save_checkpoint
from .errors import CheckpointError, ConfigError


@dataclass(frozen=True)
class ModelSpec:
    """What a downstream model expects; travels with its weights.

    ``mean``/``std`` are in [0, 1] units (MARS' 0-255 mean with std 1 becomes ``m / 255``, ``1 / 255``).
    For frame detectors ``input_size`` is ``(min_size, min_size)``: torchvision resizes any frame so
    that its shorter side is ``min_size``, so a square frame of that size is not rescaled.
    """

    name: str
    task: Literal["clip", "frame"]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    clip_len: int
    input_size: tuple[int, int]
    num_classes: int
    class_names: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelSpec:
        """Inverse of ``asdict`` after a JSON round trip (lists back to tuples)."""
        try:
            return cls(
                name=str(d["name"]),
                task=d["task"],
                mean=tuple(float(v) for v in d["mean"]),
                std=tuple(float(v) for v in d["std"]),
                clip_len=int(d["clip_len"]),
                input_size=tuple(int(v) for v in d["input_size"]),
                num_classes=int(d["num_classes"]),
                class_names=tuple(str(v) for v in d.get("class_names", ())),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"checkpoint meta 'spec' is malformed ({type(err).__name__}: {err})") from None

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One sample: ``(3, T, H, W)`` for clip models, ``(3, H, W)`` for frame models."""
        frames = (self.clip_len,) if self.task == "clip" else ()
        return (3, *frames, *self.input_size)


class Normalize(nn.Module):
    """``(x - mean) / std`` per RGB channel, for ``(N, 3, ...)`` inputs of any rank."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return (x - self.mean.view(shape)) / self.std.view(shape)


class ClipClassifier(nn.Module):
    """[0, 1] clips ``(N, 3, T, H, W)`` -> logits ``(N, K)``: ``net(normalize(x))``.

    Only ``net`` has state, so checkpoints hold the network's own keys (as its authors release them).
    """

    def __init__(self, net: nn.Module, spec: ModelSpec) -> None:
        super().__init__()
        self.net = net
        self.set_spec(spec)

    def set_spec(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.normalize = Normalize(spec.mean, spec.std).to(next(self.net.parameters()).device)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(self.normalize(x))


class DefendedModel(nn.Module):
    """``model(defense(x))`` for attacks through the defense (BPDA lives in the defense).

    The defense stays in eval mode even when ART puts the estimator in train mode (Faster R-CNN
    only returns losses in train mode): the defense is frozen during attacks.
    """

    def __init__(self, defense: nn.Module, model: nn.Module) -> None:
        super().__init__()
        self.defense = defense
        self.model = model
        self.spec: ModelSpec = model.spec

    def train(self, mode: bool = True) -> DefendedModel:
        super().train(mode)
        self.defense.eval()
        return self

    def forward(self, x: Tensor, *args: Any) -> Any:
        return self.model(self.defense(x), *args)


# ---------------------------------------------------------------- registry

Builder = Callable[..., nn.Module]
_REGISTRY: dict[str, Builder] = {}


def register_model(name: str) -> Callable[[Builder], Builder]:
    """Decorator: ``@register_model("tiny3d")`` on ``fn(num_classes: int | None, **kw) -> nn.Module``.

    The builder returns a random-init model with ``.spec``; :func:`build_model` loads weights.
    """

    def wrap(fn: Builder) -> Builder:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return wrap


def list_models() -> list[str]:
    return sorted(_REGISTRY)


# ---------------------------------------------------------------- MARS 3D ResNeXt

MARS_MEAN_255 = (114.7748, 107.7354, 99.4750)  # ActivityNet mean, MARS' get_mean("activitynet"); std 1


class ResNeXtBottleneck3d(nn.Module):
    """MARS' ``ResNeXtBottleneck``: 1x1x1 -> grouped 3x3x3 -> 1x1x1 (expansion 2), shortcut type B."""

    expansion = 2

    def __init__(self, inplanes: int, planes: int, mid: int, cardinality: int, stride: int = 1) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv3d(inplanes, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm3d(mid)
        self.conv2 = nn.Conv3d(mid, mid, 3, stride=stride, padding=1, groups=cardinality, bias=False)
        self.bn2 = nn.BatchNorm3d(mid)
        self.conv3 = nn.Conv3d(mid, out, 1, bias=False)
        self.bn3 = nn.BatchNorm3d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inplanes != out:
            self.downsample = nn.Sequential(nn.Conv3d(inplanes, out, 1, stride=stride, bias=False), nn.BatchNorm3d(out))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class ResNeXt3d(nn.Module):
    """The 3D ResNeXt of MARS (Crasto et al., CVPR 2019) with the authors' parameter names.

    ``stem`` channels after conv1 (64), four stages of ``planes = 2*stem*2**i`` (out ``2*planes``) with
    ``cardinality * width * 2**i`` grouped channels: the defaults are ResNeXt-101 32x4d, i.e.
    MARS' ``mid_planes = cardinality * planes // 32``. Average pooling is adaptive (MARS' fixed
    ``AvgPool3d`` equals it at 16x112x112), so the network runs at any clip size.
    """

    def __init__(
        self,
        layers: Sequence[int] = (3, 4, 23, 3),
        num_classes: int = 400,
        cardinality: int = 32,
        width: int = 4,
        stem: int = 64,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(3, stem, kernel_size=7, stride=(1, 2, 2), padding=3, bias=False)
        self.bn1 = nn.BatchNorm3d(stem)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool3d(kernel_size=3, stride=2, padding=1)
        inplanes = stem
        for i, blocks in enumerate(layers):
            planes, mid = 2 * stem * 2**i, cardinality * width * 2**i
            stage = [ResNeXtBottleneck3d(inplanes, planes, mid, cardinality, stride=1 if i == 0 else 2)]
            inplanes = planes * ResNeXtBottleneck3d.expansion
            stage += [ResNeXtBottleneck3d(inplanes, planes, mid, cardinality) for _ in range(blocks - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
        self.avgpool = nn.AdaptiveAvgPool3d(1)
        self.fc = nn.Linear(inplanes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


_RESNEXT_DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}


@register_model("mars")
def mars(
    num_classes: int | None = None,
    depth: int = 101,
    layers: Sequence[int] | None = None,
    cardinality: int = 32,
    width: int = 4,
    stem: int = 64,
    clip_len: int = 16,
    size: int = 112,
) -> ClipClassifier:
    """MARS RGB stream (3D ResNeXt-101 32x4d, 16x112x112, ActivityNet mean, std 1 on 0-255 pixels).

    ``layers`` overrides ``depth`` (e.g. ``(1, 1, 1, 1)`` with small ``stem``/``width`` for tests).
    """
    if layers is None:
        if depth not in _RESNEXT_DEPTHS:
            raise ConfigError(f"mars: depth must be one of {sorted(_RESNEXT_DEPTHS)}, got {depth}")
        layers = _RESNEXT_DEPTHS[depth]
    num_classes = num_classes or 400
    net = ResNeXt3d(layers, num_classes, cardinality, width, stem)
    spec = ModelSpec(
        name="mars",
        task="clip",
        mean=tuple(m / 255 for m in MARS_MEAN_255),
        std=(1 / 255,) * 3,
        clip_len=clip_len,
        input_size=(size, size),
        num_classes=num_classes,
    )
    return ClipClassifier(net, spec)


# ---------------------------------------------------------------- tiny3d


class BasicBlock3d(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm3d(cout)
        self.conv2 = nn.Conv3d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm3d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv3d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm3d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class VortexPool(nn.Module):
    """The strongest rotation in a normalized clip, either sense: ``(N, 3, T, H, W)`` -> ``(N, 2 S)``.

    Normal flow between consecutive frames (``-I_t grad I / (|grad I|^2 + eps)`` of the grey clip),
    summed over time, is matched with a rotational template ``exp(-|q|^2 / 2 s^2) (q_y, -q_x)`` at
    each scale ``s`` (px); the features are the largest response of each sense over the frame
    (counter-clockwise first). ``eps`` is in normalized units: 0.016 is 1e-3 in [0, 1] pixels at
    tiny3d's std of 0.25.

    Why a fixed layer: a rotating object's interior vorticity is cancelled by the opposite shear at
    its rim, so linear motion features averaged over the frame cannot tell clockwise from
    counter-clockwise, and small CNNs that end in average pooling stay at chance on that pair. The
    peak of a vortex-matched filter is a first-order cue they can use.
    """

    def __init__(self, scales: Sequence[float], eps: float = 0.016) -> None:
        super().__init__()
        self.radius, self.eps = int(3 * max(scales)), eps
        q = torch.arange(-self.radius, self.radius + 1, dtype=torch.float32)
        qy, qx = torch.meshgrid(q, q, indexing="ij")
        kernels = []
        for s in scales:
            g = torch.exp(-(qx**2 + qy**2) / (2 * s * s))
            k = torch.stack([qy * g, -qx * g])
            kernels.append(k / k.abs().sum())
        self.register_buffer("kernels", torch.stack(kernels), persistent=False)
        self.norm = nn.BatchNorm1d(2 * len(scales))

    def forward(self, x: Tensor) -> Tensor:
        grey = x.mean(1)
        before, after = grey[:, :-1], grey[:, 1:]
        mid = (before + after) / 2
        gx = F.pad(mid[..., 2:] - mid[..., :-2], (1, 1)) / 2
        gy = F.pad(mid[..., 2:, :] - mid[..., :-2, :], (0, 0, 1, 1)) / 2
        speed = (before - after) / (gx**2 + gy**2 + self.eps)
        flow = torch.stack([(speed * gx).sum(1), (speed * gy).sum(1)], 1)
        response = F.conv2d(flow, self.kernels, padding=self.radius).flatten(2)
        return self.norm(torch.cat([response.amax(2), (-response).amax(2)], 1))


class Tiny3d(nn.Module):
    """MARS-shaped small 3D CNN: conv1 stride (1,2,2) + maxpool 2, four residual stages (strides 1,2,2,2),
    adaptive average pooling and a linear head. ~0.36M parameters with the default widths.
    ``vortex`` scales (px) add :class:`VortexPool` features to the head's input."""

    def __init__(self, num_classes: int, widths: Sequence[int] = (16, 32, 48, 64), vortex: Sequence[float] = ()) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv3d(3, widths[0], (3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3), bias=False),
            nn.BatchNorm3d(widths[0]),
            nn.ReLU(inplace=True),
            nn.MaxPool3d(3, stride=2, padding=1),
        )
        cins = (widths[0], *widths[:-1])
        strides = (1,) + (2,) * (len(widths) - 1)
        self.stages = nn.Sequential(*(BasicBlock3d(i, o, s) for i, o, s in zip(cins, widths, strides)))
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.vortex = VortexPool(vortex) if vortex else None
        self.fc = nn.Linear(widths[-1] + 2 * len(vortex), num_classes)

    def forward(self, x: Tensor) -> Tensor:
        features = torch.flatten(self.pool(self.stages(self.stem(x))), 1)
        if self.vortex is not None:
            features = torch.cat([features, self.vortex(x)], 1)
        return self.fc(features)


@register_model("tiny3d")
def tiny3d(
    num_classes: int | None = None,
    widths: Sequence[int] = (16, 32, 48, 64),
    clip_len: int = 16,
    size: int = 112,
    mean: Sequence[float] = (0.5, 0.5, 0.5),
    std: Sequence[float] = (0.25, 0.25, 0.25),
    vortex: Sequence[float] = (),
) -> ClipClassifier:
    """Small 3D CNN that trains on a CPU in minutes; ``mean``/``std`` should be the training set's,
    ``vortex`` the scales (px) of its rotation-sense features (:class:`VortexPool`; none by default)."""
    num_classes = num_classes or 10
    spec = ModelSpec("tiny3d", "clip", tuple(mean), tuple(std), clip_len, (size, size), num_classes)
    return ClipClassifier(Tiny3d(num_classes, widths, vortex), spec)


# ---------------------------------------------------------------- torchvision video models


def _torchvision_spec(name: str, weights: Any, num_classes: int) -> ModelSpec:
    """Mean/std/size/clip length from the weights' eval transforms and docs (metadata only, no download)."""
    meta_weights = weights or torchvision.models.get_model_weights(name).DEFAULT
    t = meta_weights.transforms()
    clip_len = re.findall(r"clip_len=(\d+)", meta_weights.meta.get("_docs", ""))
    categories = tuple(meta_weights.meta["categories"]) if weights is not None else ()
    return ModelSpec(
        name=name,
        task="clip",
        mean=tuple(t.mean),
        std=tuple(t.std),
        clip_len=int(clip_len[0]) if clip_len else 16,
        input_size=tuple(t.crop_size),
        num_classes=num_classes,
        class_names=categories if len(categories) == num_classes else (),
    )


def _torchvision_video(
    name: str, num_classes: int | None = None, tv_weights: str | None = None, **kw: Any
) -> ClipClassifier:
    """A ``torchvision.models.video`` network; ``tv_weights`` ("DEFAULT" or an enum name) downloads
    torchvision's weights through its own cache (online users)."""
    enum = torchvision.models.get_model_weights(name)
    weights = enum.__members__[tv_weights] if tv_weights else None
    num_classes = num_classes or (len(weights.meta["categories"]) if weights else 400)
    try:
        net = torchvision.models.get_model(name, weights=weights, num_classes=num_classes, progress=False, **kw)
    except ValueError as err:
        raise ConfigError(f"{name}: {err}") from None
    except OSError as err:
        raise CheckpointError(
            f"{name}: cannot download torchvision weights {weights} ({err}); pass a local checkpoint path"
        ) from None
    return ClipClassifier(net, _torchvision_spec(name, weights, num_classes))


for _name in torchvision.models.list_models(module=torchvision.models.video):
    register_model(_name)(partial(_torchvision_video, _name))


def _is_torchvision_weights(name: str, ref: Any) -> bool:
    if not isinstance(ref, str) or name not in torchvision.models.list_models(module=torchvision.models.video):
        return False
    return ref in torchvision.models.get_model_weights(name).__members__  # "DEFAULT" is an alias member


# ---------------------------------------------------------------- frame detectors


def _faster_rcnn(name: str, num_classes: int | None, **kw: Any) -> nn.Module:
    """torchvision Faster R-CNN, random init, no backbone download; ``kw`` go to ``FasterRCNN``."""
    num_classes = num_classes or 91
    model = torchvision.models.get_model(name, weights=None, weights_backbone=None, num_classes=num_classes, **kw)
    return _with_frame_spec(model, name, num_classes)


def _with_frame_spec(model: nn.Module, name: str, num_classes: int) -> nn.Module:
    t = model.transform
    model.spec = ModelSpec(
        name=name,
        task="frame",
        mean=tuple(float(v) for v in t.image_mean),
        std=tuple(float(v) for v in t.image_std),
        clip_len=1,
        input_size=(int(t.min_size[0]), int(t.min_size[0])),
        num_classes=num_classes,
    )
    return model


@register_model("fasterrcnn_resnet50_fpn")
def fasterrcnn_resnet50_fpn(num_classes: int | None = None, **kw: Any) -> nn.Module:
    """The paper's detector (ResNet-50 FPN); ``min_size``/``max_size`` etc. pass through."""
    return _faster_rcnn("fasterrcnn_resnet50_fpn", num_classes, **kw)


@register_model("fasterrcnn_mobilenet_v3_large_320_fpn")
def fasterrcnn_mobilenet_v3_large_320_fpn(num_classes: int | None = None, **kw: Any) -> nn.Module:
    """The CPU detector (MobileNetV3-Large FPN, 320 px)."""
    return _faster_rcnn("fasterrcnn_mobilenet_v3_large_320_fpn", num_classes, **kw)


@register_model("fasterrcnn_mobilenet_v3_small_fpn")
def fasterrcnn_mobilenet_v3_small_fpn(
    num_classes: int | None = None, fpn_channels: int = 64, representation: int = 128, **kw: Any
) -> nn.Module:
    """A slim torchvision Faster R-CNN for small frames on a CPU (~1.5M parameters, ~6 MB).

    MobileNetV3-Small, an FPN of ``fpn_channels`` over its last two stages (plus max-pool), anchors of
    16-128 px and a ``representation``-wide box head; the COCO-sized 320 px model's box head alone has
    12.8M parameters. ``kw`` go to ``FasterRCNN`` (``min_size``, ``max_size``, proposal counts...).
    """
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

    features = torchvision.models.mobilenet_v3_small().features
    stages = [i for i, block in enumerate(features) if getattr(block, "_is_cn", False)] + [len(features) - 1]
    returned = stages[-2:]
    backbone = BackboneWithFPN(
        features, {str(i): str(k) for k, i in enumerate(returned)}, [features[i].out_channels for i in returned],
        fpn_channels, extra_blocks=LastLevelMaxPool(),
    )  # fmt: skip
    num_classes = num_classes or 91
    model = FasterRCNN(
        backbone,
        rpn_anchor_generator=AnchorGenerator(((16, 32, 64, 128),) * 3, ((0.5, 1.0, 2.0),) * 3),
        box_head=TwoMLPHead(fpn_channels * 7 * 7, representation),
        box_predictor=FastRCNNPredictor(representation, num_classes),
        **{"min_size": 320, "max_size": 320, "rpn_score_thresh": 0.05, **kw},
    )
    return _with_frame_spec(model, "fasterrcnn_mobilenet_v3_small_fpn", num_classes)


# ---------------------------------------------------------------- building, loading, saving


def _network(model: nn.Module) -> nn.Module:
    """The module whose state dict is the checkpoint (no wrapper prefixes)."""
    if isinstance(model, DefendedModel):
        model = model.model
    return model.net if isinstance(model, ClipClassifier) else model


def load_state(model: nn.Module, state_dict: Mapping[str, Tensor], source: str = "checkpoint") -> None:
    """Strictly load a state dict into ``model``'s network, accepting ``module.`` (DataParallel)
    prefixes and a whole :class:`ClipClassifier`'s ``net.`` prefix.

    Raises :class:`CheckpointError` with the first few missing/unexpected/mis-shaped keys and their counts.
    """
    state = {k.removeprefix("module."): v for k, v in state_dict.items()}
    if state and all(k.startswith("net.") for k in state):
        state = {k.removeprefix("net."): v for k, v in state.items()}
    load_state_dict_checked(_network(model), state, f"{source} does not fit model {model.spec.name!r}")


def set_spec(model: nn.Module, spec: ModelSpec) -> None:
    if isinstance(model, ClipClassifier):
        model.set_spec(spec)
    else:
        model.spec = spec


def build_model(
    name: str,
    num_classes: int | None = None,
    weights: str | os.PathLike[str] | Weights | None = None,
    **kw: Any,
) -> nn.Module:
    """Build a registered model, optionally loading weights; returned in eval mode.

    ``weights``: a shipped weights name, a checkpoint path (a StreamGuard checkpoint, or a bare
    state dict / ``{"state_dict": ...}`` as MARS' authors release them), a :class:`Weights`, or for
    torchvision video models ``"DEFAULT"`` / a weights enum name (torchvision downloads them).
    A StreamGuard checkpoint's ``spec`` (class names, normalization) replaces the builder's.
    """
    if name not in _REGISTRY:
        raise ConfigError(f"unknown model {name!r} (known: {', '.join(list_models())})")
    if _is_torchvision_weights(name, weights):
        return _build(name, num_classes, None, {}, "", {**kw, "tv_weights": weights})
    if weights is None:
        return _build(name, num_classes, None, {}, "", kw)
    w = get_weights(weights)
    return _build(name, num_classes, *w.load(), str(w.path), kw)


def _build(
    name: str,
    num_classes: int | None,
    state: Mapping[str, Tensor] | None,
    meta: Mapping[str, Any],
    source: str,
    kw: dict[str, Any],
) -> nn.Module:
    if meta.get("model", name) != name:
        raise CheckpointError(f"{source} holds a {meta['model']!r} model, not {name!r}")
    kw = {**meta.get("kwargs", {}), **kw}
    spec = ModelSpec.from_dict(meta["spec"]) if "spec" in meta else None
    model = _REGISTRY[name](num_classes or (spec.num_classes if spec else None), **kw)
    model.build_kwargs = kw
    if state is not None:
        load_state(model, state, source=f"checkpoint {source}")
    if spec is not None:
        set_spec(model, spec)
    return model.eval()


def load_model(ref: str | os.PathLike[str] | Weights, num_classes: int | None = None) -> nn.Module:
    """A registry name (random init), a shipped weights name, or a checkpoint whose ``meta["model"]``
    names the builder."""
    if isinstance(ref, str) and ref in _REGISTRY:
        return build_model(ref, num_classes)
    w = get_weights(ref)
    state, meta = w.load()
    if "model" not in meta:
        raise CheckpointError(f"{w.path} has no meta['model'] naming its builder: use build_model(name, weights=path)")
    if meta["model"] not in _REGISTRY:
        raise CheckpointError(f"{w.path}: unknown model {meta['model']!r} in its meta")
    return _build(meta["model"], num_classes, state, meta, str(w.path), {})


def save_model(model: nn.Module, path: str | os.PathLike[str], **extra_meta: Any) -> str:
    """Save the network's weights with ``{"model", "spec", "kwargs", **extra_meta}``; returns the sha256."""
    if isinstance(model, DefendedModel):
        model = model.model
    spec: ModelSpec = model.spec
    kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in getattr(model, "build_kwargs", {}).items()}
    kwargs.pop("tv_weights", None)
    meta = {"model": spec.name, "spec": asdict(spec), "kwargs": kwargs, **extra_meta}
    state = {k: v.detach().cpu() for k, v in _network(model).state_dict().items()}
    return save_checkpoint(Path(path), state, meta)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def describe_model(name: str, **kw: Any) -> tuple[ModelSpec, int]:
    """``(spec, parameter count)`` of a registered model, built on the meta device (no memory, fast)."""
    with torch.device("meta"):
        model = build_model(name, **kw)
    return model.spec, count_parameters(model)


# ---------------------------------------------------------------- ART


def to_art(model: nn.Module, defense: nn.Module | None = None, device: str = "cpu") -> Any:
    """ART estimator over ``model`` (or ``DefendedModel(defense, model)``) in [0, 1] pixel space.

    Clip classifiers -> ``PyTorchClassifier`` (input ``(3, T, H, W)``, cross-entropy loss);
    frame detectors -> ``PyTorchFasterRCNN`` (channels first, torchvision targets).
    """
    from art.estimators.classification import PyTorchClassifier
    from art.estimators.object_detection import PyTorchFasterRCNN

    spec: ModelSpec = model.spec
    net = model if defense is None else DefendedModel(defense, model)
    device_type = "cpu" if str(device) == "cpu" else "gpu"
    if spec.task == "frame":
        return PyTorchFasterRCNN(net, clip_values=(0.0, 1.0), channels_first=True, device_type=device_type)
    return PyTorchClassifier(
        net,
        loss=nn.CrossEntropyLoss(),
        input_shape=spec.input_shape,
        nb_classes=spec.num_classes,
        clip_values=(0.0, 1.0),
        channels_first=True,
        device_type=device_type,
    )
