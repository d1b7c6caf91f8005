from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torchvision.models import resnet18

import streamguard.checkpoints as checkpoints
from streamguard.checkpoints import Weights
from streamguard.detector import PSPNet, build_detector, detector_loss, edge_band
from streamguard.errors import CheckpointError, ConfigError, InputError
from streamguard.patchzero import PatchZero, dilate_mask, load_defense, save_defense

MEAN = (0.4, 0.5, 0.6)


class StubDetector(nn.Module):
    """Returns preset per-frame logits (B,1,H,W), ignoring the pixels but keeping a path to them."""

    def __init__(self, logits: Tensor, gain: float = 0.0) -> None:
        super().__init__()
        self.register_buffer("preset", logits)
        self.gain = gain

    def forward(self, x: Tensor) -> Tensor:
        assert x.shape[0] == self.preset.shape[0] and x.shape[-2:] == self.preset.shape[-2:]
        return self.preset + self.gain * x.mean(dim=1, keepdim=True)


def clip_logits(n: int, t: int, h: int, w: int, value: float = -6.0) -> Tensor:
    """(N*T,1,H,W) logits in the frame order PatchZero feeds the detector (clip-major)."""
    return torch.full((n * t, 1, h, w), value)


# ----------------------------------------------------------------------------- PSPNet


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenet_v3", "resnet50"])
def test_pspnet_shapes_eval_and_train(backbone: str) -> None:
    net = PSPNet(backbone, width=0.125)
    x = torch.rand(2, 3, 48, 40)
    logits, aux = net.train()(x)
    assert logits.shape == aux.shape == (2, 1, 48, 40)
    with torch.no_grad():
        out = net.eval()(x)
    assert isinstance(out, Tensor) and out.shape == (2, 1, 48, 40)


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenet_v3", "resnet50"])
def test_pspnet_output_stride_8(backbone: str) -> None:
    net = PSPNet(backbone, width=0.125).eval()
    with torch.no_grad():
        low = net.low(torch.rand(1, 3, 64, 64))
        assert low.shape[-2:] == (8, 8)
        assert net.high(low).shape[-2:] == (8, 8)


def test_pspnet_without_aux_returns_logits_in_train_mode() -> None:
    net = PSPNet("mobilenet_v3", aux=False, width=0.125).train()
    out = net(torch.rand(2, 3, 32, 32))
    assert isinstance(out, Tensor) and out.shape == (2, 1, 32, 32)
    assert not any(k.startswith("aux_head") for k in net.state_dict())


def test_pretrained_backbone_from_local_torchvision_file(tmp_path: Path) -> None:
    reference = resnet18(weights=None)
    torch.save(reference.state_dict(), tmp_path / "resnet18.pth")
    net = PSPNet("resnet18", pretrained_backbone=tmp_path / "resnet18.pth")
    assert torch.equal(net.low.layer3[1].conv2.weight, reference.layer3[1].conv2.weight)
    assert torch.equal(net.high.layer4[0].bn1.running_var, reference.layer4[0].bn1.running_var)
    with pytest.raises(CheckpointError, match="mis-shaped"):
        PSPNet("resnet18", width=0.5, pretrained_backbone=tmp_path / "resnet18.pth")


def test_bad_backbone_is_config_error() -> None:
    with pytest.raises(ConfigError, match="backbone"):
        PSPNet("vgg16")  # type: ignore[arg-type]


def test_detector_loss_main_plus_aux() -> None:
    logits, aux = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8)
    target = (torch.rand(2, 1, 8, 8) > 0.8).float()
    bce = nn.functional.binary_cross_entropy_with_logits
    assert torch.allclose(detector_loss((logits, aux), target), bce(logits, target) + 0.4 * bce(aux, target))
    assert torch.allclose(detector_loss(logits, target[:, 0]), bce(logits, target))
    weighted = bce(logits, target, pos_weight=torch.tensor(5.0)) + 0.1 * bce(aux, target, pos_weight=torch.tensor(5.0))
    assert torch.allclose(detector_loss((logits, aux), target, aux_weight=0.1, pos_weight=5.0), weighted)


def test_edge_weight_adds_weight_on_both_sides_of_each_patch_border() -> None:
    target = torch.zeros(1, 1, 32, 32)
    target[..., 8:20, 8:20] = 1
    band = edge_band(target, 2)
    assert band.sum() == 16 * 16 - 8 * 8  # 2 pixels inside and 2 outside the 12x12 square's border
    assert band[..., 14, 14] == 0 and band[..., 0, 0] == 0 and band[..., 8, 8] == 1 and band[..., 6, 14] == 1
    assert band[..., 5, 14] == 0 and band[..., 10, 14] == 0
    logits, aux = torch.randn(1, 1, 32, 32), torch.randn(1, 1, 32, 32)
    bce = nn.functional.binary_cross_entropy_with_logits
    per_pixel = bce(logits, target, reduction="none") + 0.4 * bce(aux, target, reduction="none")
    extra = detector_loss((logits, aux), target, edge_weight=3.0) - detector_loss((logits, aux), target)
    assert torch.allclose(extra, 3.0 * (band * per_pixel).mean())


def test_detector_loss_trains_tiny_pspnet() -> None:
    net = PSPNet("mobilenet_v3", width=0.125).train()
    x = torch.rand(4, 3, 32, 32)
    target = torch.zeros(4, 1, 32, 32)
    target[..., 8:20, 8:20] = 1
    x = x * (1 - target) + target * torch.tensor([1.0, 0.0, 1.0]).view(1, 3, 1, 1)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    first = detector_loss(net(x), target).item()
    for _ in range(15):
        opt.zero_grad()
        loss = detector_loss(net(x), target)
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


# ----------------------------------------------------------------------------- mask semantics


def test_threshold_and_dilation_of_known_logits() -> None:
    logits = clip_logits(1, 1, 9, 9)
    logits[0, 0, 4, 4] = 0.5  # p=0.62 > 0.5
    logits[0, 0, 0, 8] = -0.1  # p=0.475, below 0.5
    logits[0, 0, 8, 0] = 3.0  # p=0.95
    frames = torch.rand(1, 3, 9, 9)
    mask = PatchZero(StubDetector(logits), MEAN, threshold=0.5, dilate=1).mask(frames)
    expected = torch.zeros(1, 1, 9, 9)
    expected[0, 0, 3:6, 3:6] = 1
    expected[0, 0, 7:9, 0:2] = 1
    assert torch.equal(mask, expected)
    strict = PatchZero(StubDetector(logits), MEAN, threshold=0.9, dilate=0).mask(frames)
    assert strict.nonzero().tolist() == [[0, 0, 8, 0]]


@pytest.mark.parametrize("radius", [0, 1, 2, 3, 5])
def test_dilation_matches_cv2(radius: int, rng: np.random.Generator) -> None:
    binary = (rng.random((2, 3, 23, 31)) > 0.97).astype(np.float32)
    ours = dilate_mask(torch.from_numpy(binary), radius).numpy()
    kernel = np.ones((2 * radius + 1, 2 * radius + 1), np.uint8)
    theirs = np.stack([[cv2.dilate(m, kernel) for m in clip] for clip in binary])
    np.testing.assert_array_equal(ours, theirs)


def test_repaint_is_exact() -> None:
    n, t, h, w = 2, 3, 16, 16
    logits = clip_logits(n, t, h, w)
    logits[..., 4:9, 5:10] = 6.0
    x = torch.rand(n, 3, t, h, w)
    defense = PatchZero(StubDetector(logits), MEAN, dilate=0, temporal="none")
    clean, mask = defense.sanitize(x)
    region = torch.zeros(h, w, dtype=torch.bool)
    region[4:9, 5:10] = True
    assert torch.equal(mask, region.float().expand(n, 1, t, h, w))
    for c, m in enumerate(MEAN):
        assert torch.all(clean[:, c][:, :, region] == torch.tensor(m))
    assert torch.equal(clean[..., ~region], x[..., ~region])
    assert torch.equal(defense(x), clean)


def test_frames_input_keeps_frame_shapes() -> None:
    logits = clip_logits(3, 1, 12, 12)
    logits[1, 0, 2:5, 2:5] = 4.0
    x = torch.rand(3, 3, 12, 12)
    defense = PatchZero(StubDetector(logits), MEAN, dilate=1)
    clean, mask = defense.sanitize(x)
    assert clean.shape == x.shape and mask.shape == (3, 1, 12, 12)
    assert defense.probabilities(x).shape == (3, 1, 12, 12)
    assert mask[0].sum() == 0 and mask[2].sum() == 0 and mask[1].sum() == 25
    with pytest.raises(InputError, match="shape"):
        defense.mask(torch.rand(3, 12, 12))


def test_temporal_mean_catches_intermittent_patch_and_does_not_flicker() -> None:
    n, t, h, w = 2, 8, 16, 16
    logits = clip_logits(n, t, h, w).view(n, t, 1, h, w)
    logits[0, :, :, 6:10, 6:10] = -2.0  # the patch mostly evades detection...
    logits[0, [1, 4, 6], :, 6:10, 6:10] = 6.0  # ...but is seen in 3 of 8 frames: mean = 1 > 0
    logits[1, :, :, 0:3, 0:3] = -2.0
    logits[1, 2, :, 0:3, 0:3] = 6.0  # a one-frame false alarm averages out: mean = -1 < 0
    expected = logits.mean(dim=1, keepdim=True).expand_as(logits).transpose(1, 2)
    logits = logits.view(n * t, 1, h, w)
    x = torch.rand(n, 3, t, h, w)
    fused = PatchZero(StubDetector(logits), MEAN, dilate=0, temporal="mean")
    assert torch.allclose(fused.logits(x), expected)
    mean_mask = fused.mask(x)
    per_frame = PatchZero(StubDetector(logits), MEAN, dilate=0, temporal="none").mask(x)
    assert torch.equal(mean_mask, mean_mask[:, :, :1].expand_as(mean_mask))  # same mask in every frame
    assert mean_mask[0, 0, :, 6:10, 6:10].all() and mean_mask.sum() == t * 16
    assert per_frame[0, 0, :, 7, 7].tolist() == [0, 1, 0, 0, 1, 0, 1, 0]
    assert per_frame[1, 0, :, 1, 1].tolist() == [0, 0, 1, 0, 0, 0, 0, 0]


def test_temporal_median_is_not_swayed_by_a_few_frames_driven_far_below_the_threshold() -> None:
    n, t, h, w = 2, 8, 16, 16
    logits = clip_logits(n, t, h, w).view(n, t, 1, h, w)
    logits[0, :, :, 6:10, 6:10] = 2.0  # a patch seen in every frame...
    logits[0, [0, 3], :, 6:10, 6:10] = -40.0  # ...that an attacker hides deep in 2 of 8: mean = -8.5 < 0
    logits[1, 2, :, 0:3, 0:3] = 60.0  # a one-frame false alarm confident enough to sway the mean
    logits = logits.view(n * t, 1, h, w)
    x = torch.rand(n, 3, t, h, w)
    median = PatchZero(StubDetector(logits), MEAN, dilate=0, temporal="median")
    mean = PatchZero(StubDetector(logits), MEAN, dilate=0, temporal="mean")
    assert median.mask(x)[0, 0, :, 6:10, 6:10].all() and not mean.mask(x)[0, 0, :, 6:10, 6:10].any()
    assert not median.mask(x)[1].any() and mean.mask(x)[1, 0, :, 0:3, 0:3].all()
    # the gradient of the fused logits reaches one frame a pixel (the "mean-fused" attack variant spreads it)
    x.requires_grad_(True)
    median.detector.gain = mean.detector.gain = 1e-3
    (grad_median,) = torch.autograd.grad(median.logits(x)[:, :, 0].sum(), x)
    (grad_mean,) = torch.autograd.grad(mean.logits(x)[:, :, 0].sum(), x)
    assert grad_median[:, 0].ne(0).sum(dim=1).eq(1).all() and grad_mean[:, 0].ne(0).all()


def test_input_size_resizes_in_and_back() -> None:
    seen: list[tuple[int, int]] = []

    class Recorder(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            seen.append(tuple(x.shape[-2:]))
            return torch.where(x[:, :1] > 0.5, 5.0, -5.0)

    x = torch.zeros(1, 3, 2, 32, 48)
    x[..., 8:24, 16:40] = 1.0
    mask = PatchZero(Recorder(), MEAN, dilate=0, input_size=16).mask(x)
    assert seen == [(16, 16)] and mask.shape == (1, 1, 2, 32, 48)
    assert mask[..., 12:20, 20:36].all() and mask[..., :4, :].sum() == 0


def test_ema_state_across_calls_and_reset() -> None:
    h = w = 8
    x = torch.rand(1, 3, 2, h, w)
    detector = StubDetector(clip_logits(1, 2, h, w, value=-4.0))
    defense = PatchZero(detector, MEAN, temporal="ema", ema=0.75, dilate=0)
    assert torch.allclose(defense.logits(x), torch.full((1, 1, 2, h, w), -4.0))
    detector.preset.fill_(4.0)
    assert torch.allclose(defense.logits(x), torch.full((1, 1, 2, h, w), 0.75 * -4.0 + 0.25 * 4.0))
    assert defense.mask(x).sum() == 0  # every call advances the average: 0.75*-2 + 0.25*4 = -0.5
    defense.reset()
    assert torch.allclose(defense.logits(x), torch.full((1, 1, 2, h, w), 4.0))
    assert defense.mask(x).all()
    other = torch.rand(1, 3, 2, h + 1, w)  # a new stream shape restarts the average
    defense.detector = StubDetector(clip_logits(1, 2, h + 1, w, value=-3.0))
    assert torch.allclose(defense.logits(other), torch.full((1, 1, 2, h + 1, w), -3.0))


def test_ema_runs_through_the_clips_of_a_batch_in_order() -> None:
    """A batch of N clips is N consecutive clips of one stream: the same masks as N calls of one clip."""
    torch.manual_seed(0)
    x = torch.rand(3, 3, 2, 8, 8)
    detector = nn.Conv2d(3, 1, 3, padding=1)  # logits that follow the frames
    batched = PatchZero(detector, MEAN, temporal="ema", ema=0.6).eval()
    one_by_one = batched.fork()
    with torch.no_grad():
        together = batched.logits(x)
        apart = torch.cat([one_by_one.logits(x[i : i + 1]) for i in range(3)])
        assert torch.allclose(together, apart, atol=1e-6)
        assert not torch.allclose(together[1], together[2])  # it is an average over time, not a copy
        assert torch.allclose(batched.logits(x[:1]), one_by_one.logits(x[:1]), atol=1e-6)  # and goes on into the next call


def test_config_validation() -> None:
    stub = StubDetector(clip_logits(1, 1, 4, 4))
    for kwargs, field in [
        ({"threshold": 1.0}, "threshold"),
        ({"dilate": -1}, "dilate"),
        ({"temporal": "max"}, "temporal"),
        ({"ema": 1.0}, "ema"),
        ({"mean": (0.5, 0.5)}, "mean"),
    ]:
        with pytest.raises(ConfigError, match=field):
            PatchZero(stub, **{"mean": MEAN, **kwargs})


# ----------------------------------------------------------------------------- BPDA


def bpda_case(bpda: bool) -> tuple[PatchZero, Tensor, Tensor, Tensor]:
    n, t, h, w = 1, 4, 12, 12
    logits = clip_logits(n, t, h, w, value=-1.0)
    logits[..., 3:7, 3:7] = 2.0
    defense = PatchZero(StubDetector(logits, gain=3.0), MEAN, dilate=1, bpda=bpda)
    x = torch.rand(n, 3, t, h, w, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    weight = torch.randn(n, 3, t, h, w, generator=torch.Generator().manual_seed(2))
    return defense, x, weight, defense.mask(x)


def test_bpda_forward_identical_to_plain_forward() -> None:
    defense, x, _, _ = bpda_case(bpda=True)
    with torch.no_grad():
        with defense.bpda_mode(False):
            plain = defense(x)
        assert torch.equal(defense(x), plain)
        assert torch.equal(defense(x), defense.sanitize(x)[0])


def test_no_gradient_through_mask_without_bpda() -> None:
    defense, x, weight, mask = bpda_case(bpda=False)
    (defense(x) * weight).sum().backward()
    assert torch.equal(x.grad, weight * (1 - mask))


def test_bpda_gradient_is_the_soft_mask_gradient() -> None:
    defense, x, weight, mask = bpda_case(bpda=True)
    (defense(x) * weight).sum().backward()
    detector_path = x.grad - weight * (1 - mask)
    assert detector_path.abs().sum() > 1e-3

    ref_x = x.detach().clone().requires_grad_(True)
    logits = defense.logits(ref_x)
    soft = defense._soft_mask(logits)
    straight = mask + soft - soft.detach()
    mean = torch.tensor(MEAN).view(1, 3, 1, 1, 1)
    ((ref_x * (1 - straight) + mean * straight) * weight).sum().backward()
    assert torch.allclose(x.grad, ref_x.grad, atol=1e-6)


def test_bpda_mode_context_restores_flag() -> None:
    defense, x, _, _ = bpda_case(bpda=False)
    with defense.bpda_mode():
        out = defense(x)
        assert out.requires_grad and out.grad_fn is not None
        assert defense.bpda
    assert not defense.bpda


# ----------------------------------------------------------------------------- checkpoints


def tiny_defense(backbone: str = "mobilenet_v3") -> PatchZero:
    return PatchZero(
        PSPNet(backbone, width=0.125), MEAN, threshold=0.4, dilate=2, temporal="ema", ema=0.3, input_size=(32, 32)
    ).eval()


def test_save_load_round_trip(tmp_path: Path) -> None:
    defense = tiny_defense()
    with torch.no_grad():  # non-trivial BN statistics
        for bn in (m for m in defense.detector.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.running_mean.uniform_(-0.1, 0.1)
    sha = save_defense(defense, tmp_path / "pz.pt", steps=7)
    loaded = load_defense(tmp_path / "pz.pt")
    assert loaded.meta == defense.meta
    assert not loaded.training
    x = torch.rand(2, 3, 3, 40, 40)
    assert torch.equal(loaded.logits(x), defense.logits(x))
    assert torch.equal(loaded.sanitize(x)[0], defense.sanitize(x)[0])
    _, meta = checkpoints.load_checkpoint(tmp_path / "pz.pt", sha256=sha)
    assert meta["steps"] == 7 and meta["backbone"] == "mobilenet_v3" and meta["input_size"] == [32, 32]
    overridden = load_defense(tmp_path / "pz.pt", threshold=0.7, temporal="none", input_size=None)
    assert (overridden.threshold, overridden.temporal, overridden.input_size) == (0.7, "none", (32, 32))


def test_load_shipped_name_and_build_detector(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    defense = tiny_defense("resnet18")
    sha = save_defense(defense, tmp_path / "shipped.pt")
    manifest = {"tiny-pz": {"file": "shipped.pt", "sha256": sha, "kind": "detector", "meta": {}}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setattr(checkpoints, "WEIGHTS_DIR", tmp_path)
    x = torch.rand(1, 3, 32, 32)
    assert torch.equal(load_defense("tiny-pz").logits(x), defense.logits(x))
    net = build_detector("resnet18", weights="tiny-pz", width=0.125).eval()
    with torch.no_grad():
        assert torch.equal(net(x), defense.detector(x))


def test_tampered_checkpoint_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "pz.pt"
    sha = save_defense(tiny_defense(), path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load_defense(Weights("pz", path, sha))


def test_mismatched_backbone_names_keys(tmp_path: Path) -> None:
    save_defense(tiny_defense("resnet18"), tmp_path / "r18.pt")
    with pytest.raises(CheckpointError, match=r"does not match the network: \d+ missing \(.*\d+ unexpected \(low\.conv1\.weight") as err:
        load_defense(tmp_path / "r18.pt", backbone="mobilenet_v3")
    assert "\n" not in str(err.value)
    with pytest.raises(CheckpointError, match=r"mis-shaped \(low\.layer1\.0\.conv1\.weight"):
        load_defense(tmp_path / "r18.pt", width=0.25)


def test_bare_state_dict_needs_backbone(tmp_path: Path) -> None:
    torch.save(PSPNet("resnet18", width=0.125).state_dict(), tmp_path / "bare.pt")
    with pytest.raises(CheckpointError, match="backbone"):
        load_defense(tmp_path / "bare.pt")
    defense = load_defense(tmp_path / "bare.pt", backbone="resnet18", width=0.125, mean=MEAN)
    assert defense.detector.aux and defense.temporal == "mean"
    with pytest.raises(ConfigError, match="colour"):
        load_defense(tmp_path / "bare.pt", colour=1)


def test_art_preprocessor_sanitizes_and_passes_bpda_gradients() -> None:
    from art.estimators.classification import PyTorchClassifier

    from streamguard.patchzero import art_preprocessor

    torch.manual_seed(0)
    defense = PatchZero(PSPNet("mobilenet_v3", width=0.125), mean=(0.5, 0.5, 0.5), dilate=0, temporal="none").eval()
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 4))
    clf = PyTorchClassifier(net, nn.CrossEntropyLoss(), input_shape=(3, 32, 32), nb_classes=4, clip_values=(0, 1),
                            preprocessing_defences=[art_preprocessor(defense)])  # fmt: skip
    x = np.random.default_rng(0).random((2, 3, 32, 32), dtype=np.float32)
    with torch.no_grad():
        expected = net(defense(torch.from_numpy(x))).numpy()
    np.testing.assert_allclose(clf.predict(x), expected, rtol=1e-5, atol=1e-5)
    grad = clf.loss_gradient(x, np.eye(4, dtype=np.float32)[[0, 1]])
    assert grad.shape == x.shape and np.abs(grad).sum() > 0
    assert defense.bpda is False
