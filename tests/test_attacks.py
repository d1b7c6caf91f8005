import numpy as np
import pytest
import torch
from torch import Tensor, nn

from streamguard.attacks import (
    PRESETS,
    MaskedAttack,
    as_mask,
    masks_for_batch,
    patch_mask,
)
from streamguard.errors import ConfigError
from streamguard.models import ModelSpec, tiny3d
from streamguard.patchzero import PatchZero

SHAPE = (8, 32, 32)  # T, H, W


class ColorMeans(nn.Module):
    """``logits = k * (channel means - 0.5) @ W + b``: a large one-colour patch flips its decision."""

    def __init__(self, weight: list[list[float]], bias: list[float], k: float = 100.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.tensor(weight, dtype=torch.float32))
        self.bias = nn.Parameter(torch.tensor(bias, dtype=torch.float32))
        self.k = k
        self.spec = ModelSpec("color-means", "clip", (0.5,) * 3, (0.25,) * 3, SHAPE[0], SHAPE[1:], len(bias))

    def forward(self, x: Tensor) -> Tensor:
        return self.k * (x.mean(dim=(2, 3, 4)) - 0.5) @ self.weight + self.bias


def green_model() -> ColorMeans:
    """Class 1 when the clip's mean green exceeds 0.52, class 0 otherwise."""
    return ColorMeans([[0, 0], [0, 1], [0, 0]], [0, -2])


def grey_clips(n: int, noise: float = 0.02, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (0.5 + rng.uniform(-noise, noise, (n, 3, *SHAPE))).astype(np.float32)


def predict(net: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return net(torch.from_numpy(x)).argmax(1).numpy()


def random_tiny3d() -> nn.Module:
    return tiny3d(num_classes=3, widths=(4, 4, 4, 4), clip_len=SHAPE[0], size=SHAPE[1]).eval()


# ----------------------------------------------------------------------------- masks


def test_patch_mask_fixed_square_covers_area() -> None:
    mask = patch_mask((4, 60, 80), 0.05, 3)
    assert mask.dtype == np.float32 and mask.shape == (4, 60, 80)
    assert set(np.unique(mask)) == {0.0, 1.0}
    assert (mask == mask[0]).all()
    rows, cols = np.nonzero(mask[0])
    side = rows.max() - rows.min() + 1
    assert side == cols.max() - cols.min() + 1 and side * side == mask[0].sum()
    assert abs(mask[0].mean() - 0.05) < 0.005
    assert (patch_mask((4, 60, 80), 0.05, 3) == mask).all()


def test_patch_mask_rectangle_and_locations_vary() -> None:
    rng = np.random.default_rng(1)
    masks = [patch_mask((1, 64, 64), 0.1, rng, square=False)[0] for _ in range(20)]
    aspects = []
    for m in masks:
        rows, cols = np.nonzero(m)
        h, w = np.ptp(rows) + 1, np.ptp(cols) + 1
        assert h * w == m.sum() and abs(m.mean() - 0.1) < 0.02
        aspects.append(h / w)
    assert 0.4 < min(aspects) < 0.95 and 1.05 < max(aspects) < 2.5
    assert len({tuple(np.argwhere(m)[0]) for m in masks}) > 10


def test_moving_patch_walks_smoothly_inside_the_frame() -> None:
    mask = patch_mask((32, 64, 64), 0.05, 0, moving=True)
    corners = np.array([np.argwhere(frame)[0] for frame in mask])
    assert (mask.sum(axis=(1, 2)) == mask[0].sum()).all()
    steps = np.abs(np.diff(corners, axis=0)).max(axis=1)
    assert steps.max() <= 2 * 64 / 20 + 1
    assert len({tuple(c) for c in corners}) > 8


def test_masks_for_batch_shape_and_independence() -> None:
    masks = masks_for_batch(6, SHAPE, 0.1, seed=2)
    assert masks.shape == (6, 1, *SHAPE) and masks.dtype == np.float32
    assert len({masks[i].tobytes() for i in range(6)}) == 6
    assert (masks_for_batch(6, SHAPE, 0.1, seed=2) == masks).all()


@pytest.mark.parametrize("area", [0.0, 1.5])
def test_patch_mask_rejects_bad_area(area: float) -> None:
    with pytest.raises(ConfigError, match="area"):
        patch_mask(SHAPE, area)


def test_as_mask_broadcasts_and_validates() -> None:
    x_shape = (2, 3, *SHAPE)
    video = patch_mask(SHAPE, 0.1, 0)
    assert as_mask(video, x_shape).shape == (2, 1, *SHAPE)
    assert as_mask(video.astype(bool), x_shape).dtype == np.float32
    assert as_mask(np.ones((2, 3, *SHAPE)), x_shape).shape == x_shape
    with pytest.raises(ConfigError, match="binary"):
        as_mask(video * 0.5, x_shape)
    with pytest.raises(ConfigError, match="broadcast"):
        as_mask(np.zeros((8, 31, 32)), x_shape)
    with pytest.raises(ConfigError, match="dimensions"):
        as_mask(np.zeros((1, *x_shape)), x_shape)


# ----------------------------------------------------------------------------- masked attacks


@pytest.mark.parametrize("method", ["pgd", "apgd", "cw"])
def test_perturbation_stays_in_mask_and_range(method: str) -> None:
    model = random_tiny3d()
    x = np.random.default_rng(0).uniform(0, 1, (3, 3, *SHAPE)).astype(np.float32)
    mask = masks_for_batch(3, SHAPE, 0.1, seed=0)
    x_adv = MaskedAttack(model, method, iters=2, batch_size=2).generate(x, predict(model, x), mask)
    assert x_adv.dtype == np.float32 and x_adv.shape == x.shape
    outside = np.broadcast_to(mask == 0, x.shape)
    assert (x_adv[outside] == x[outside]).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    if method != "cw":  # CW returns the clean clip when it fails to fool the model
        assert np.abs(x_adv - x)[~outside].mean() > 0.05


@pytest.mark.parametrize("method", ["pgd", "apgd", "cw"])
def test_attacks_flip_a_fixed_model(method: str) -> None:
    model = green_model()
    x, y = grey_clips(4), np.zeros(4, dtype=np.int64)
    assert (predict(model, x) == 0).all()
    mask = masks_for_batch(4, SHAPE, 0.1, seed=1)
    x_adv = MaskedAttack(model, method, iters=10, batch_size=4).generate(x, y, mask)
    assert (predict(model, x_adv) == 1).all()


class Spy(nn.Module):
    """Records every input row that differs from the grey clip outside all of the given masks."""

    def __init__(self, model: nn.Module, masks: np.ndarray) -> None:
        super().__init__()
        self.model, self.spec = model, model.spec
        self.masks = torch.from_numpy(masks[:, 0] > 0)  # (N, T, H, W)
        self.leaks = 0
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        for row in x.detach():
            if (row == 1).all():  # ART probes the estimator once with an all-ones input
                continue
            changed = (row != 0.5).any(dim=0)
            self.leaks += int(not any((changed & ~m).sum() == 0 for m in self.masks))
        self.calls += 1
        return self.model(x)


@pytest.mark.parametrize("mask_channels", [1, 3])
@pytest.mark.parametrize("method", ["pgd", "apgd"])
def test_per_sample_masks_with_small_batches(method: str, mask_channels: int) -> None:
    """ART's AutoPGD mishandles per-sample masks (no batch slicing, sub-selection, unmasked random
    start): with batch_size < N, an already-misclassified sample and masks of x's shape, every
    sample must still be attacked inside its own mask, and the model never sees pixels change outside."""
    n = 5
    masks = masks_for_batch(n, SHAPE, 0.1, seed=4)
    spy = Spy(green_model(), masks)
    x = np.full((n, 3, *SHAPE), 0.5, dtype=np.float32)
    y = np.array([0, 0, 0, 0, 1])  # the last sample is misclassified from the start
    mask = np.repeat(masks, mask_channels, axis=1)
    x_adv = MaskedAttack(spy, method, iters=5, batch_size=2).generate(x, y, mask)
    assert spy.calls > 0 and spy.leaks == 0
    assert (predict(spy.model, x_adv[:4]) == 1).all()
    for i in range(4):
        changed = (x_adv[i] != x[i]).any(axis=0)
        assert changed.any() and not (changed & (masks[i, 0] == 0)).any()


def test_same_seed_same_patch_and_global_rng_untouched() -> None:
    model = random_tiny3d()
    x = np.random.default_rng(5).uniform(0, 1, (2, 3, *SHAPE)).astype(np.float32)
    y, mask = predict(model, x), masks_for_batch(2, SHAPE, 0.1, seed=5)
    np.random.seed(123)
    np_state, torch_state = np.random.get_state()[1].copy(), torch.get_rng_state().clone()
    first = MaskedAttack(model, "pgd", iters=2, seed=7).generate(x, y, mask)
    assert (np.random.get_state()[1] == np_state).all() and torch.equal(torch.get_rng_state(), torch_state)
    assert (MaskedAttack(model, "pgd", iters=2, seed=7).generate(x, y, mask) == first).all()
    assert not (MaskedAttack(model, "pgd", iters=2, seed=8).generate(x, y, mask) == first).all()


@pytest.mark.parametrize("method", ["pgd", "apgd", "cw"])
def test_targeted_attack_reaches_the_target(method: str) -> None:
    model = ColorMeans([[0, 0, 0], [0, 1, 0], [0, 0, 1]], [0, -2, -2])  # 0 grey, 1 green, 2 blue
    x, target = grey_clips(3), np.full(3, 2)
    assert (predict(model, x) == 0).all()
    attack = MaskedAttack(model, method, iters=10, targeted=True)
    assert (predict(model, attack.generate(x, target, masks_for_batch(3, SHAPE, 0.1, seed=6))) == 2).all()


class RedGreenDetector(nn.Module):
    """Patch logits ``20 * (R + G - 1.4)``: it flags green-saturated pixels unless their red is low."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(20.0))

    def forward(self, frames: Tensor) -> Tensor:
        return self.scale * (frames[:, :1] + frames[:, 1:2] - 1.4)


def test_bpda_defeats_a_defense_that_stops_do_patches() -> None:
    """DO patches saturate green (red stays grey) and are all detected; BPDA learns through the
    straight-through mask to drop red below the detector's boundary, and gets through."""
    model = green_model()
    defense = PatchZero(RedGreenDetector(), mean=(0.5, 0.5, 0.5), dilate=1).train()
    pipeline = nn.Sequential(defense, model)
    x, y = grey_clips(4), np.zeros(4, dtype=np.int64)
    mask = masks_for_batch(4, SHAPE, 0.1, seed=3)
    kw = dict(defense=defense, iters=10, random_init=False)

    x_do = MaskedAttack(model, "pgd", "do", **kw).generate(x, y, mask)
    x_bpda = MaskedAttack(model, "pgd", "bpda", **kw).generate(x, y, mask)

    assert defense.bpda is False and defense.training and defense.detector.scale.requires_grad
    defense.eval()
    assert (predict(model, x_do) == 1).all()  # a working attack on the undefended model...
    do_accuracy = (predict(pipeline, x_do) == y).mean()
    bpda_accuracy = (predict(pipeline, x_bpda) == y).mean()
    assert do_accuracy == 1.0  # ...that PatchZero removes
    assert bpda_accuracy < do_accuracy and bpda_accuracy == 0.0


def test_bpda_needs_a_defense_and_inputs_are_validated() -> None:
    model = green_model()
    with pytest.raises(ConfigError, match="bpda"):
        MaskedAttack(model, mode="bpda")
    with pytest.raises(ConfigError, match="method"):
        MaskedAttack(model, method="fgsm")  # type: ignore[arg-type]
    attack = MaskedAttack(model)
    mask = patch_mask(SHAPE, 0.1)
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        attack.generate(grey_clips(1) * 255, np.zeros(1, dtype=np.int64), mask)
    with pytest.raises(ConfigError, match="labels"):
        attack.generate(grey_clips(2), np.zeros(3, dtype=np.int64), mask)
    with pytest.raises(ConfigError, match=r"\[0, 2\)"):
        attack.generate(grey_clips(1), np.array([2]), mask)


def test_model_state_is_restored_and_presets_apply() -> None:
    model = green_model().train()
    attack = MaskedAttack.from_preset(model, "image-mapgd", method="apgd", iters=3)
    assert (attack.eps, attack.step) == (PRESETS["image-mapgd"]["eps"], PRESETS["image-mapgd"]["step"])
    x_adv = attack.generate(grey_clips(2), np.zeros(2, dtype=np.int64), patch_mask(SHAPE, 0.1))
    assert np.abs(x_adv - grey_clips(2)).max() <= 0.3 + 1e-6
    assert model.training and all(p.requires_grad for p in model.parameters())


# ----------------------------------------------------------------------------- whole videos and the CLI

SOURCE = "lavfi:testsrc=size=64x48:rate=8:duration=1.25"  # 10 frames


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    from streamguard.detector import PSPNet
    from streamguard.models import build_model, save_model
    from streamguard.patchzero import save_defense

    root = tmp_path_factory.mktemp("attack-ckpt")
    model = build_model("tiny3d", num_classes=3, widths=(4, 4, 4, 4), clip_len=4, size=16)
    save_model(model, root / "model.pt")
    detector = PSPNet("mobilenet_v3", aux=False, width=0.25)
    nn.init.constant_(detector.head[-1].bias, -30.0)  # detects nothing
    save_defense(PatchZero(detector, mean=(0.5, 0.5, 0.5), dilate=1), root / "blind.pt")
    return {"model": str(root / "model.pt"), "detector": str(root / "blind.pt")}


def clean_frames(size: int) -> np.ndarray:
    import cv2

    from streamguard.io import open_source

    with open_source(SOURCE) as source:
        frames = [cv2.resize(f.image, (size, size), interpolation=cv2.INTER_AREA) for f in source]
    return np.stack(frames).astype(np.float32) / 255


def test_attack_video_patches_every_clip_at_model_size() -> None:
    from streamguard.attacks import attack_video

    frames = (np.random.default_rng(0).uniform(0, 255, (10, 48, 64, 3))).astype(np.uint8)
    model = green_model()
    result = attack_video(frames, MaskedAttack(model, iters=5, batch_size=1), area=0.1, seed=0)
    assert result.frames.shape == (10, 32, 32, 3) and result.mask.shape == (10, 32, 32)
    assert (result.mask == result.mask[0]).all() and abs(result.mask.mean() - 0.1) < 0.01
    assert len(result.clean) == 2 and result.attacked == [1 - c for c in result.clean] and result.defended is None


def test_cli_attack_writes_patched_frames_mask_and_table(tmp_path, checkpoints: dict[str, str]) -> None:
    from typer.testing import CliRunner

    from streamguard.cli import app

    adv, mask = tmp_path / "adv.npy", tmp_path / "mask.npy"
    args = ["attack", SOURCE, "-o", str(adv), "--mask-out", str(mask), "--model", checkpoints["model"],
            "--detector", checkpoints["detector"], "--iters", "2", "--area", "0.1", "--seed", "3"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "attacked + PatchZero" in result.output and "fooled clips" in result.output
    frames, m = np.load(adv), np.load(mask)
    assert frames.shape == (10, 16, 16, 3) and m.shape == (10, 16, 16)
    clean = clean_frames(16)
    outside = np.broadcast_to(m[..., None] == 0, frames.shape)
    assert (frames[outside] == clean[outside]).all() and not (frames == clean).all()

    video = tmp_path / "adv.mp4"
    assert CliRunner().invoke(app, [*args[:3], str(video), *args[6:]]).exit_code == 0
    from streamguard.io import open_source

    with open_source(video) as source:
        assert (source.width, source.height) == (16, 16) and sum(1 for _ in source) == 10


def test_cli_attack_bad_option_is_one_error_line(checkpoints: dict[str, str], tmp_path) -> None:
    from typer.testing import CliRunner

    from streamguard.cli import app

    result = CliRunner().invoke(app, ["attack", SOURCE, "-o", str(tmp_path / "a.npy"), "--model", checkpoints["model"],
                                      "--method", "fgsm"])
    assert result.exit_code == 2 and result.output.strip().startswith("error: attack method")
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "a.npy").exists()
