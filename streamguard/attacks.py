"""Adversarial patches for video: patch regions and masked PGD / AutoPGD / Carlini-Wagner on ART.

A patch is a region of every frame (``mask`` 1 = adversarial pixel) whose content the attacker
controls freely within ``eps`` (``eps=1`` means "anything"); pixels outside it are never touched.

Two threat models:

* **DO** (downstream only): gradients of the downstream model alone; the evaluator then passes
  the patched clip through the defense.
* **BPDA** (adaptive): gradients of the whole pipeline ``model(defense(x))`` with the defense's
  hard mask replaced on the backward pass by its soft (sigmoid) version (``PatchZero(bpda=True)``).

ART 1.20.1 quirks handled here (each has a test):

* ``ProjectedGradientDescent`` slices a per-sample mask by batch and masks its random start:
  it takes the mask directly.
* ``AutoProjectedGradientDescent`` does neither: a mask of ``x``'s shape breaks once
  ``batch_size < len(x)`` or once some samples are already misclassified (it sub-selects them),
  and its random start perturbs the whole clip, so the patch would be optimized against noise.
  Carlini-Wagner has no mask at all. Both therefore attack the patch *content* ``z`` through
  :class:`PatchComposer` (``x' = x*(1-m) + m*z``), which makes leaving the patch impossible.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from .errors import ConfigError, InputError
from .recipes import AttackSection
from .resize import resize_uint8

Method = Literal["pgd", "apgd", "cw"]
Mode = Literal["do", "bpda"]
METHODS: tuple[str, ...] = ("pgd", "apgd", "cw")
MODES: tuple[str, ...] = ("do", "bpda")

PRESETS: dict[str, dict[str, float | int]] = {
    "video": dict(eps=1.0, step=0.2, iters=20),
    "image-mpgd": dict(eps=1.0, step=0.01, iters=100),
    "image-mapgd": dict(eps=0.3, step=0.1, iters=100),
}

# ART's PyTorchClassifier.predict default chunk: a PatchComposer batch must fit in one chunk.
_ART_PREDICT_CHUNK = 128
_CW_SEARCH_STEPS = 5
_CW_INITIAL_CONST = 10.0


# ----------------------------------------------------------------------------- patch regions


def _generator(rng: np.random.Generator | int) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def _patch_size(h: int, w: int, area: float, square: bool, rng: np.random.Generator) -> tuple[int, int]:
    """(height, width) of a rectangle covering ``area`` of an h x w frame (aspect in [1/2, 2] unless square)."""
    pixels = area * h * w
    if square:
        side = min(h, w, max(1, round(math.sqrt(pixels))))
        return side, side
    aspect = float(np.exp(rng.uniform(-math.log(2), math.log(2))))
    ph = min(h, max(1, round(math.sqrt(pixels * aspect))))
    return ph, min(w, max(1, round(pixels / ph)))


def _walk(t: int, room: tuple[int, int], speed: float, rng: np.random.Generator) -> np.ndarray:
    """(T, 2) integer top-left corners: a smooth random walk bouncing inside ``[0, room]``."""
    limit = np.asarray(room, dtype=np.float64)
    pos = rng.uniform(0, 1, 2) * limit
    angle = rng.uniform(0, 2 * math.pi)
    vel = speed * np.array([math.sin(angle), math.cos(angle)])
    out = np.empty((t, 2), dtype=np.int64)
    for i in range(t):
        out[i] = np.rint(pos)
        vel = np.clip(vel + rng.normal(0, speed / 4, 2), -2 * speed, 2 * speed)
        pos = pos + vel
        low, high = pos < 0, pos > limit
        pos = np.where(low, -pos, np.where(high, 2 * limit - pos, pos))
        vel = np.where(low | high, -vel, vel)
        pos = np.clip(pos, 0, limit)
    return out


def patch_mask(
    shape: Sequence[int],
    area: float = 0.05,
    rng: np.random.Generator | int = 0,
    *,
    square: bool = True,
    moving: bool = False,
) -> np.ndarray:
    """A patch covering ``area`` of each frame: float32 (T, H, W), 1 = adversarial pixel.

    The location is drawn once per video and fixed for all frames; ``moving=True`` makes it
    drift instead (a smooth random walk, about 1/20 of the frame per frame, bouncing off the borders).
    """
    if len(shape) != 3 or min(shape) < 1:
        raise ConfigError(f"patch shape must be (T, H, W) of positive ints, got {tuple(shape)}")
    if not 0 < area <= 1:
        raise ConfigError(f"patch area must be a fraction of the frame in (0, 1], got {area}")
    t, h, w = (int(s) for s in shape)
    rng = _generator(rng)
    ph, pw = _patch_size(h, w, area, square, rng)
    room = (h - ph, w - pw)
    if moving:
        corners = _walk(t, room, max(1.0, min(h, w) / 20), rng)
    else:
        corners = np.repeat([[rng.integers(0, room[0] + 1), rng.integers(0, room[1] + 1)]], t, axis=0)
    mask = np.zeros((t, h, w), dtype=np.float32)
    for frame, (top, left) in zip(mask, corners):
        frame[top : top + ph, left : left + pw] = 1
    return mask


def masks_for_batch(
    n: int, shape: Sequence[int], area: float = 0.05, seed: int = 0, *, square: bool = True, moving: bool = False
) -> np.ndarray:
    """``n`` independent patch masks: float32 (N, 1, T, H, W)."""
    rng = np.random.default_rng(seed)
    masks = [patch_mask(shape, area, rng, square=square, moving=moving) for _ in range(n)]
    return np.stack(masks)[:, None] if masks else np.zeros((0, 1, *shape), dtype=np.float32)


def as_mask(mask: np.ndarray | Tensor, x_shape: Sequence[int]) -> np.ndarray:
    """Validate a user mask against clips of ``x_shape`` (N, C, T, H, W): float32 (N, 1 or C, T, H, W).

    Any binary array broadcastable to the clips is accepted: (T, H, W), (H, W), (N, 1, T, H, W)...
    """
    if isinstance(mask, Tensor):
        mask = mask.detach().cpu().numpy()
    mask = np.asarray(mask)
    if mask.dtype == object or not (np.issubdtype(mask.dtype, np.number) or mask.dtype == bool):
        raise ConfigError(f"mask must be a numeric 0/1 array, got dtype {mask.dtype}")
    if mask.ndim > len(x_shape):
        raise ConfigError(f"mask of shape {mask.shape} has more dimensions than the clips {tuple(x_shape)}")
    mask = mask.reshape((1,) * (len(x_shape) - mask.ndim) + mask.shape)
    try:
        np.broadcast_shapes(mask.shape, tuple(x_shape))
    except ValueError:
        raise ConfigError(f"mask of shape {mask.shape} does not broadcast to clips of shape {tuple(x_shape)}") from None
    if not np.isin(mask, (0, 1)).all():
        raise ConfigError("mask must be binary (0 = clean, 1 = adversarial pixel)")
    target = (x_shape[0], mask.shape[1], *x_shape[2:])
    return np.array(np.broadcast_to(mask, target), dtype=np.float32)


# ----------------------------------------------------------------------------- the attack


class PatchComposer(nn.Module):
    """Attack surface for mask-less attacks: ``z -> net(x*(1-m) + m*z)`` for bound clips ``x``, masks ``m``.

    ``bind(x, m)`` fixes the clips (N, C, T, H, W) and masks (N, 1|C, T, H, W) the next calls
    refer to, row by row (a single bound row broadcasts to any batch). Unbound, it is ``net``.
    """

    def __init__(self, net: nn.Module, spec: Any = None) -> None:
        super().__init__()
        self.net = net
        self.spec = spec
        self._x: Tensor | None = None
        self._m: Tensor | None = None

    def bind(self, x: np.ndarray | None, m: np.ndarray | None = None) -> None:
        device = _device(self.net)
        self._x = None if x is None else torch.tensor(x, device=device)
        self._m = None if m is None else torch.tensor(m, device=device)

    def compose(self, z: Tensor) -> Tensor:
        if self._x is None or self._m is None:
            return z
        if len(self._x) not in (1, len(z)):
            raise RuntimeError(f"PatchComposer bound to {len(self._x)} clips got a batch of {len(z)}")
        return self._x * (1 - self._m) + self._m * z

    def forward(self, z: Tensor) -> Tensor:
        return self.net(self.compose(z))


@contextmanager
def _attack_state(net: nn.Module, defense: nn.Module | None, bpda: bool) -> Iterator[None]:
    """Eval mode, frozen parameters (ART's backward must not touch a detector being trained), BPDA on."""
    training = [(m, m.training) for m in net.modules()]
    grads = [(p, p.requires_grad) for p in net.parameters()]
    previous_bpda = getattr(defense, "bpda", None)
    net.eval().requires_grad_(False)
    if bpda:
        defense.bpda = True  # type: ignore[union-attr]
    try:
        yield
    finally:
        for m, mode in training:
            m.training = mode
        for p, flag in grads:
            p.requires_grad_(flag)
        if previous_bpda is not None:
            defense.bpda = previous_bpda  # type: ignore[union-attr]


@contextmanager
def _seeded(seed: int, device: str) -> Iterator[None]:
    """Seed numpy's and torch's global RNGs (ART draws from them), restoring both afterwards."""
    state = np.random.get_state()
    cuda = [torch.device(device).index or 0] if torch.device(device).type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda):
            np.random.seed(seed)
            torch.manual_seed(seed)
            yield
    finally:
        np.random.set_state(state)


def _check_settings(mode: str, defense: nn.Module | None, eps: float, step: float, **counts: int) -> None:
    """Validate the settings every masked attack shares; ``counts`` must each be >= 1."""
    if mode not in MODES:
        raise ConfigError(f"attack mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "bpda" and not hasattr(defense, "bpda"):
        raise ConfigError("attack mode 'bpda' needs a defense with a BPDA switch (PatchZero)")
    if not 0 < eps <= 1:
        raise ConfigError(f"attack.eps must be in (0, 1], got {eps}")
    if not step > 0:
        raise ConfigError(f"attack.step must be > 0, got {step}")
    for name, value in counts.items():
        if value < 1:
            raise ConfigError(f"attack.{name} must be >= 1, got {value}")


class MaskedAttack:
    """Masked PGD / AutoPGD / Carlini-Wagner (L2) patch attack on a clip classifier, via ART.

    ``model``: a clip classifier with ``.spec`` ((N,3,T,H,W) in [0,1] -> logits). ``defense``: the
    ``PatchZero`` (or any module with a ``bpda`` flag) differentiated through in ``mode="bpda"``;
    ignored in ``mode="do"``. ``restarts``: random restarts (PGD, AutoPGD); AutoPGD always starts
    from a random point, ``random_init`` applies to PGD. Carlini-Wagner minimizes the L2 change of the
    patch inside the ``eps`` box (``iters`` steps per binary-search step, learning rate ``step``).
    Following ART, PGD returns its last iterate, AutoPGD its random start and Carlini-Wagner the
    clean clip for samples they cannot fool.
    """

    def __init__(
        self,
        model: nn.Module,
        method: Method = "pgd",
        mode: Mode = "do",
        defense: nn.Module | None = None,
        eps: float = 1.0,
        step: float = 0.2,
        iters: int = 20,
        restarts: int = 1,
        random_init: bool = True,
        targeted: bool = False,
        batch_size: int = 8,
        seed: int = 0,
        device: str = "cpu",
    ) -> None:
        if method not in METHODS:
            raise ConfigError(f"attack method must be one of {', '.join(METHODS)}, got {method!r}")
        _check_settings(mode, defense, eps, step, iters=iters, restarts=restarts, batch=batch_size)
        if getattr(getattr(model, "spec", None), "task", "clip") != "clip":
            raise ConfigError(f"masked patch attacks need a clip classifier, {model.spec.name!r} is a frame detector")
        self.model, self.method, self.mode, self.defense = model, method, mode, defense
        self.eps, self.step, self.iters, self.restarts = float(eps), float(step), int(iters), int(restarts)
        self.random_init, self.targeted, self.batch_size = random_init, targeted, int(batch_size)
        self.seed, self.device = int(seed), str(device)

    @classmethod
    def from_section(
        cls, model: nn.Module, section: AttackSection, method: Method, mode: Mode, **kw: Any
    ) -> MaskedAttack:
        """An attack configured by a recipe's ``[attack]`` table (``kw``: defense, device, overrides)."""
        params = dict(
            eps=section.eps,
            step=section.step,
            iters=section.iters,
            restarts=section.restarts,
            random_init=section.random_init,
            targeted=section.targeted,
            batch_size=section.batch,
            seed=section.seed,
        )
        return cls(model, method, mode, **{**params, **kw})

    @classmethod
    def from_preset(cls, model: nn.Module, preset: str, **kw: Any) -> MaskedAttack:
        if preset not in PRESETS:
            raise ConfigError(f"unknown attack preset {preset!r} (choose {', '.join(PRESETS)})")
        return cls(model, **{**PRESETS[preset], **kw})

    @property
    def net(self) -> nn.Module:
        """What the attack differentiates: the model (DO) or defense -> model (BPDA)."""
        from .models import DefendedModel

        return self.model if self.mode == "do" else DefendedModel(self.defense, self.model)

    def generate(self, x: np.ndarray, y: np.ndarray, mask: np.ndarray | Tensor) -> np.ndarray:
        """Patched clips: float32 (N, C, T, H, W) in [0, 1], equal to ``x`` outside ``mask``.

        ``x``: float (N, C, T, H, W) in [0, 1]; ``y``: (N,) true labels (target labels if targeted);
        ``mask``: binary, broadcastable to ``x`` ((N,1,T,H,W), (N,C,T,H,W), (T,H,W)...).
        """
        x, y = _check_clips(x, y, getattr(getattr(self.model, "spec", None), "num_classes", None))
        m = as_mask(mask, x.shape)
        if len(x) == 0:
            return x.copy()
        net = self.net
        with _attack_state(net, self.defense, self.mode == "bpda"), _seeded(self.seed, self.device):
            attack = {"pgd": self._pgd, "apgd": self._apgd, "cw": self._cw}[self.method]
            x_adv = attack(net, x, y, m)
        return np.clip(np.where(m > 0, x_adv, x), 0, 1).astype(np.float32)

    def _art(self, net: nn.Module) -> tuple[PatchComposer, Any]:
        from .models import to_art

        composer = PatchComposer(net, self.model.spec)
        return composer, to_art(composer, device=self.device)

    def _pgd(self, net: nn.Module, x: np.ndarray, y: np.ndarray, m: np.ndarray) -> np.ndarray:
        from art.attacks.evasion import ProjectedGradientDescent

        _, estimator = self._art(net)
        attack = ProjectedGradientDescent(
            estimator,
            norm=np.inf,
            eps=self.eps,
            eps_step=self.step,
            max_iter=self.iters,
            targeted=self.targeted,
            num_random_init=self.restarts if self.random_init else 0,
            batch_size=self.batch_size,
            verbose=False,
        )
        return attack.generate(x, y, mask=m).astype(np.float32)

    def _apgd(self, net: nn.Module, x: np.ndarray, y: np.ndarray, m: np.ndarray) -> np.ndarray:
        """AutoPGD over the patch content, batch by batch, restarts on the samples not yet fooled.

        Each ART call gets only samples the model still gets right (ART would sub-select them and
        break the row correspondence with the bound clips), checked on the exact batch ART sees first.
        """
        from art.attacks.evasion import AutoProjectedGradientDescent

        composer, estimator = self._art(net)
        attack = AutoProjectedGradientDescent(
            estimator,
            norm=np.inf,
            eps=self.eps,
            eps_step=self.step,
            max_iter=self.iters,
            targeted=self.targeted,
            nb_random_init=1,
            batch_size=min(self.batch_size, _ART_PREDICT_CHUNK),
            loss_type="cross_entropy",
            verbose=False,
        )
        x_adv, todo = x.copy(), np.arange(len(x))
        for _ in range(self.restarts):
            left = []
            for start in range(0, len(todo), attack.batch_size):
                idx = self._unfooled(attack.estimator, composer, x, y, m, todo[start : start + attack.batch_size])
                if len(idx) == 0:
                    continue
                z = attack.generate(x[idx], y[idx])
                x_adv[idx] = z
                left.extend(idx[self._robust(attack.estimator.predict(z), y[idx])])
            composer.bind(None)
            todo = np.asarray(left, dtype=np.int64)
        return x_adv

    def _cw(self, net: nn.Module, x: np.ndarray, y: np.ndarray, m: np.ndarray) -> np.ndarray:
        """Carlini-Wagner L2 over the patch content, one clip at a time (ART sub-selects within batches)."""
        from art.attacks.evasion import CarliniL2Method

        composer, estimator = self._art(net)
        x_adv = x.copy()
        for i in range(len(x)):
            composer.bind(x[i : i + 1], m[i : i + 1])
            estimator.set_params(clip_values=(np.clip(x[i] - self.eps, 0, 1), np.clip(x[i] + self.eps, 0, 1)))
            attack = CarliniL2Method(
                estimator,
                targeted=self.targeted,
                learning_rate=self.step,
                binary_search_steps=_CW_SEARCH_STEPS,
                max_iter=self.iters,
                initial_const=_CW_INITIAL_CONST,
                batch_size=1,
                verbose=False,
            )
            x_adv[i] = attack.generate(x[i : i + 1], y[i : i + 1])[0]
        return x_adv

    def _unfooled(
        self, estimator: Any, composer: PatchComposer, x: np.ndarray, y: np.ndarray, m: np.ndarray, idx: np.ndarray
    ) -> np.ndarray:
        """The rows of ``idx`` still classified as ``y`` (not yet as the target), bound to ``composer``."""
        while len(idx):
            composer.bind(x[idx], m[idx])
            keep = self._robust(estimator.predict(x[idx]), y[idx])
            if keep.all():
                break
            idx = idx[keep]
        return idx

    def _robust(self, logits: np.ndarray, y: np.ndarray) -> np.ndarray:
        pred = logits.argmax(axis=1)
        return pred != y if self.targeted else pred == y


class MaskedFrameAttack:
    """Masked PGD (L-inf) on a per-frame object detector (torchvision Faster R-CNN), via ART.

    Untargeted: each step ascends the detector's training loss for the true boxes (RPN and box
    head classification and regression, ART's ``PyTorchFasterRCNN``), inside the patch only. Clips
    (N, C, T, H, W) are attacked one at a time, their T frames as one batch, so in ``mode="bpda"``
    the gradient flows through PatchZero fused over the whole clip (:class:`FramesAsClip`), exactly
    as the defense runs. ART's PGD has no random start for detectors: it starts from the clean frames.
    """

    def __init__(
        self,
        model: nn.Module,
        mode: Mode = "do",
        defense: nn.Module | None = None,
        eps: float = 1.0,
        step: float = 0.2,
        iters: int = 20,
        seed: int = 0,
        device: str = "cpu",
    ) -> None:
        _check_settings(mode, defense, eps, step, iters=iters)
        if getattr(getattr(model, "spec", None), "task", None) != "frame":
            raise ConfigError("MaskedFrameAttack needs a frame detector (spec.task == 'frame')")
        self.model, self.mode, self.defense = model, mode, defense
        self.eps, self.step, self.iters, self.seed, self.device = float(eps), float(step), int(iters), int(seed), str(device)

    @classmethod
    def from_section(cls, model: nn.Module, section: AttackSection, mode: Mode, **kw: Any) -> MaskedFrameAttack:
        return cls(model, mode, **{"eps": section.eps, "step": section.step, "iters": section.iters, "seed": section.seed, **kw})

    def generate(self, x: np.ndarray, targets: Sequence[Sequence[dict[str, Any]]], mask: np.ndarray | Tensor) -> np.ndarray:
        """Patched clips: float32 (N, C, T, H, W) in [0, 1], equal to ``x`` outside ``mask``.

        ``targets[n][t]``: ``{"boxes": (K, 4) xyxy, "labels": (K,)}`` of frame t of clip n.
        """
        from art.attacks.evasion import ProjectedGradientDescent

        from .models import to_art
        from .patchzero import FramesAsClip

        x = np.asarray(x)
        if x.ndim != 5 or len(targets) != len(x) or any(len(t) != x.shape[2] for t in targets):
            raise ConfigError(f"frame attack needs clips (N, C, T, H, W) and N x T targets, got {x.shape}, {len(targets)}")
        m = as_mask(mask, x.shape)
        defense = FramesAsClip(self.defense) if self.mode == "bpda" else None
        estimator = to_art(self.model, defense, device=self.device)
        attack = ProjectedGradientDescent(
            estimator, norm=np.inf, eps=self.eps, eps_step=self.step, max_iter=self.iters, batch_size=x.shape[2],
            verbose=False,
        )  # fmt: skip
        adv = np.empty_like(x, dtype=np.float32)
        with _attack_state(estimator.model, self.defense, self.mode == "bpda"), _seeded(self.seed, self.device):
            for i in range(len(x)):
                frames = np.ascontiguousarray(x[i].transpose(1, 0, 2, 3), dtype=np.float32)
                y = [{k: np.asarray(v.cpu() if isinstance(v, Tensor) else v) for k, v in t.items()} for t in targets[i]]
                adv[i] = attack.generate(frames, y, mask=m[i].transpose(1, 0, 2, 3)).transpose(1, 0, 2, 3)
        return np.clip(np.where(m > 0, adv, x), 0, 1).astype(np.float32)


# ----------------------------------------------------------------------------- whole videos


@dataclass
class AttackedVideo:
    """A video attacked clip by clip at the model's input size.

    ``frames``: float32 (F, H, W, 3) RGB in [0, 1]; ``mask``: float32 (F, H, W), 1 = patch pixel;
    per clip (``clip_len`` frames, the last one padded by repeating its final frame): the model's
    prediction on the clean clip (the attack's label), on the attacked clip, and on the attacked
    clip after ``defense`` (``None`` without a defense).
    """

    frames: np.ndarray
    mask: np.ndarray
    clean: list[int]
    attacked: list[int]
    defended: list[int] | None


def _device(module: nn.Module) -> torch.device:
    return next(iter(module.parameters()), torch.empty(0)).device


@torch.no_grad()
def _predict(model: nn.Module, x: np.ndarray | Tensor) -> list[int]:
    return model(torch.as_tensor(x).to(_device(model))).argmax(1).cpu().tolist()


def attack_video(
    frames: Iterable[np.ndarray],
    attack: MaskedAttack,
    area: float = 0.05,
    seed: int = 0,
    *,
    moving: bool = False,
    defense: nn.Module | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> AttackedVideo:
    """Patch a whole video against ``attack.model``: (H, W, 3) uint8 RGB frames in, at any size.

    Frames are resized to the model's ``input_size`` and grouped into ``clip_len`` clips; one patch
    location is drawn for the whole video (``moving``: one walk over the whole video) and each clip
    is attacked with the model's clean prediction as its label. ``on_progress(done, total)`` counts clips.
    """
    spec = attack.model.spec
    video = [resize_uint8(np.asarray(f, dtype=np.uint8), spec.input_size) for f in frames]
    if not video:
        raise InputError("attack_video: the video has no frames")
    n_frames, t = len(video), spec.clip_len
    n_clips = math.ceil(n_frames / t)
    padded = np.stack(video + video[-1:] * (n_clips * t - n_frames))
    clips = padded.reshape(n_clips, t, *padded.shape[1:]).transpose(0, 4, 1, 2, 3).astype(np.float32) / 255
    mask = patch_mask((n_clips * t, *spec.input_size), area, seed, moving=moving)
    masks = mask.reshape(n_clips, 1, t, *spec.input_size)
    adv = np.empty_like(clips)
    clean: list[int] = []
    attacked: list[int] = []
    defended: list[int] = []
    for start in range(0, n_clips, attack.batch_size):
        batch = slice(start, start + attack.batch_size)
        y = _predict(attack.model, clips[batch])
        adv[batch] = attack.generate(clips[batch], np.asarray(y), masks[batch])
        clean += y
        attacked += _predict(attack.model, adv[batch])
        if defense is not None:
            defense.reset()
            defended += _predict(attack.model, defense.sanitize(torch.from_numpy(adv[batch]).to(_device(defense)))[0])
        if on_progress is not None:
            on_progress(min(start + attack.batch_size, n_clips), n_clips)
    frames_out = adv.transpose(0, 2, 3, 4, 1).reshape(n_clips * t, *padded.shape[1:])[:n_frames]
    return AttackedVideo(frames_out, mask[:n_frames], clean, attacked, defended if defense is not None else None)


def _check_clips(x: np.ndarray, y: np.ndarray, num_classes: int | None) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x)
    if x.ndim != 5:
        raise ConfigError(f"attack input must be clips (N, C, T, H, W), got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise ConfigError(f"attack input must be float in [0, 1], got dtype {x.dtype}")
    x = x.astype(np.float32)
    if x.size and (not np.isfinite(x).all() or x.min() < 0 or x.max() > 1):
        raise ConfigError("attack input must lie in [0, 1] (float RGB, not 0-255)")
    y = np.asarray(y)
    if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer):
        raise ConfigError(f"attack labels must be {len(x)} integer class indices, got shape {y.shape} {y.dtype}")
    if y.size and (y.min() < 0 or (num_classes is not None and y.max() >= num_classes)):
        raise ConfigError(f"attack labels must be class indices in [0, {num_classes}), got {y.min()}..{y.max()}")
    return x, y.astype(np.int64)


__all__ = [
    "METHODS",
    "MODES",
    "PRESETS",
    "AttackedVideo",
    "MaskedAttack",
    "MaskedFrameAttack",
    "PatchComposer",
    "as_mask",
    "attack_video",
    "masks_for_batch",
    "patch_mask",
]
