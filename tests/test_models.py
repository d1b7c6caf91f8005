from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from streamguard.checkpoints import load_checkpoint, sha256_file
from streamguard.errors import CheckpointError, ConfigError
from streamguard.models import (
    MARS_MEAN_255,
    ClipClassifier,
    DefendedModel,
    ModelSpec,
    build_model,
    count_parameters,
    describe_model,
    list_models,
    load_model,
    save_model,
    to_art,
)

TINY_MARS = dict(layers=(1, 1, 1, 1), cardinality=2, width=2, stem=8)
TINY_FRCNN = dict(min_size=64, max_size=96)


def clip(n: int = 2, t: int = 8, size: int = 32) -> Tensor:
    return torch.rand(n, 3, t, size, size, generator=torch.Generator().manual_seed(1))


class FixedRepaint(nn.Module):
    """A stand-in defense: repaints a fixed region with 0.5 (its gradient there is zero)."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        mask = torch.zeros(shape)
        mask[..., :8, :8] = 1
        self.register_buffer("mask", mask)

    def forward(self, x: Tensor) -> Tensor:
        return x * (1 - self.mask) + 0.5 * self.mask


def test_registry_names_and_unknown_model() -> None:
    names = list_models()
    for name in ("mars", "tiny3d", "r3d_18", "mc3_18", "r2plus1d_18", "s3d", "mvit_v2_s", "swin3d_t",
                 "fasterrcnn_resnet50_fpn", "fasterrcnn_mobilenet_v3_large_320_fpn", "fasterrcnn_mobilenet_v3_small_fpn"):
        assert name in names
    with pytest.raises(ConfigError, match="unknown model 'nope'"):
        build_model("nope")


@pytest.mark.parametrize(
    ("name", "kw", "shape"),
    [
        ("tiny3d", {}, (2, 3, 16, 112, 112)),
        ("tiny3d", {}, (2, 3, 8, 32, 48)),
        ("mars", TINY_MARS, (2, 3, 16, 64, 64)),
        ("r3d_18", {}, (1, 3, 8, 32, 32)),
        ("mc3_18", {}, (1, 3, 8, 32, 32)),
        ("r2plus1d_18", {}, (1, 3, 8, 32, 32)),
        ("swin3d_t", {}, (1, 3, 8, 32, 32)),
    ],
)
def test_clip_model_output_shape(name: str, kw: dict, shape: tuple[int, ...]) -> None:
    model = build_model(name, num_classes=7, **kw)
    assert not model.training
    assert model.spec.task == "clip" and model.spec.num_classes == 7
    with torch.no_grad():
        assert model(torch.rand(shape)).shape == (shape[0], 7)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mars", "s3d", "mvit_v1_b", "mvit_v2_s"])
def test_large_clip_model_at_native_size(name: str) -> None:
    model = build_model(name, num_classes=5)
    with torch.no_grad():
        assert model(torch.rand(1, *model.spec.input_shape)).shape == (1, 5)


def test_specs_hold_normalization_and_native_size() -> None:
    mars_spec, mars_params = describe_model("mars")
    assert mars_spec.input_shape == (3, 16, 112, 112) and mars_spec.num_classes == 400
    assert 47e6 < mars_params < 50e6  # ResNeXt-101 32x4d, 3D
    r3d = describe_model("r3d_18")[0]
    assert r3d.input_size == (112, 112) and r3d.clip_len == 16
    assert r3d.mean == pytest.approx((0.43216, 0.394666, 0.37645))
    assert describe_model("mvit_v2_s")[0].input_size == (224, 224)
    frcnn = describe_model("fasterrcnn_mobilenet_v3_large_320_fpn")[0]
    assert frcnn.task == "frame" and frcnn.clip_len == 1 and frcnn.input_shape == (3, 320, 320)
    tiny, tiny_params = describe_model("tiny3d")
    assert tiny_params == count_parameters(build_model("tiny3d")) and 1e5 < tiny_params < 1e6


def test_mars_normalizes_like_the_authors() -> None:
    """MARS feeds 0-255 pixels minus the ActivityNet mean, std 1: our [0,1] input must reach the net that way."""
    model = build_model("mars", **TINY_MARS)
    x = clip()
    expected = x * 255 - torch.tensor(MARS_MEAN_255).view(1, 3, 1, 1, 1)
    torch.testing.assert_close(model.normalize(x), expected, rtol=1e-5, atol=1e-3)


def test_torchvision_weights_enum_gives_categories() -> None:
    from torchvision.models import get_model_weights

    from streamguard.models import _torchvision_spec

    spec = _torchvision_spec("r3d_18", get_model_weights("r3d_18").DEFAULT, 400)
    assert len(spec.class_names) == 400 and spec.class_names[0] == "abseiling"
    with pytest.raises(ConfigError, match="r3d_18: .*num_classes"):  # raised before any download
        build_model("r3d_18", num_classes=5, weights="KINETICS400_V1")


@pytest.mark.parametrize("prefix", ["module.", ""])
def test_mars_authors_checkpoint_reproduces_logits(tmp_path: Path, prefix: str) -> None:
    source = build_model("mars", num_classes=5, **TINY_MARS)
    state = {prefix + k: v for k, v in source.net.state_dict().items()}
    path = tmp_path / "mars_rgb.pth"
    torch.save({"state_dict": state, "arch": "resnext-101"} if prefix else state, path)
    loaded = build_model("mars", num_classes=5, weights=path, **TINY_MARS)
    x = clip(t=16, size=64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), source.eval()(x))


def test_torchvision_checkpoint_reproduces_logits(tmp_path: Path) -> None:
    source = build_model("r3d_18", num_classes=4)
    torch.save(source.net.state_dict(), tmp_path / "r3d.pt")
    torch.save(source.state_dict(), tmp_path / "wrapper.pt")  # a ClipClassifier's own keys: "net.*"
    x = clip(n=1)
    for file in ("r3d.pt", "wrapper.pt"):
        loaded = build_model("r3d_18", num_classes=4, weights=tmp_path / file)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), source(x))


def test_checkpoint_missing_keys(tmp_path: Path) -> None:
    state = build_model("mars", num_classes=5, **TINY_MARS).net.state_dict()
    del state["fc.weight"], state["layer1.0.conv1.weight"]
    torch.save({"state_dict": state}, tmp_path / "m.pth")
    with pytest.raises(CheckpointError) as err:
        build_model("mars", num_classes=5, weights=tmp_path / "m.pth", **TINY_MARS)
    msg = str(err.value)
    assert "\n" not in msg and "m.pth" in msg and "2 missing" in msg and "fc.weight" in msg


def test_checkpoint_wrong_shapes(tmp_path: Path) -> None:
    torch.save(build_model("mars", num_classes=5, **TINY_MARS).net.state_dict(), tmp_path / "m.pth")
    with pytest.raises(CheckpointError, match=r"2 mis-shaped \(fc.weight \(5, 256\) vs \(9, 256\)"):
        build_model("mars", num_classes=9, weights=tmp_path / "m.pth", **TINY_MARS)


def test_checkpoint_of_another_model(tmp_path: Path) -> None:
    tiny = build_model("tiny3d", num_classes=5)
    torch.save(tiny.net.state_dict(), tmp_path / "bare.pt")
    with pytest.raises(CheckpointError, match=r"does not fit model 'mars': \d+ missing .*; \d+ unexpected \(stem"):
        build_model("mars", num_classes=5, weights=tmp_path / "bare.pt", **TINY_MARS)
    save_model(tiny, tmp_path / "tiny.pt")
    with pytest.raises(CheckpointError, match="holds a 'tiny3d' model, not 'mars'"):
        build_model("mars", weights=tmp_path / "tiny.pt")


def test_save_and_load_model_round_trip(tmp_path: Path) -> None:
    model = build_model("tiny3d", num_classes=3, widths=(8, 8, 16, 16), size=32, clip_len=8)
    spec = ModelSpec("tiny3d", "clip", (0.4, 0.5, 0.6), (0.2, 0.25, 0.3), 8, (32, 32), 3, ("a", "b", "c"))
    model.set_spec(spec)
    digest = save_model(model.train(), tmp_path / "ckpt" / "tiny.pt", epochs=2)
    assert digest == sha256_file(tmp_path / "ckpt" / "tiny.pt")
    _, meta = load_checkpoint(tmp_path / "ckpt" / "tiny.pt")
    assert meta["model"] == "tiny3d" and meta["epochs"] == 2 and meta["kwargs"]["widths"] == [8, 8, 16, 16]

    loaded = load_model(str(tmp_path / "ckpt" / "tiny.pt"))
    assert loaded.spec == spec and not loaded.training
    x = clip(t=8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x))
    torch.testing.assert_close(loaded.normalize.std, torch.tensor(spec.std))


def rotating_clip(counter_clockwise: bool, seed: int, size: int = 64, frames: int = 16) -> Tensor:
    """A SynthMotion rotate clip, ``(1, 3, T, H, W)`` normalized as tiny3d sees it."""
    from streamguard.data import SYNTH_CLASSES, render_video

    name = "RotateCounterClockwise" if counter_clockwise else "RotateClockwise"
    video, _, _ = render_video(SYNTH_CLASSES.index(name), seed, size=size, frames=frames)
    return ((torch.from_numpy(video).permute(3, 0, 1, 2).float() / 255 - 0.5) / 0.25)[None]


def test_vortex_pool_reads_the_rotation_sense() -> None:
    """With no training, the larger peak names the sense of nearly every rotate clip (chance: half)."""
    from streamguard.models import VortexPool

    pool = VortexPool((2.0, 3.0, 5.0)).eval()
    right = 0
    for seed in range(12):
        for ccw in (True, False):
            with torch.no_grad():
                f = pool(rotating_clip(ccw, seed))[0]
            right += int((f[:3].sum() > f[3:].sum()).item() == ccw)
    assert right >= 22, f"{right} of 24"


def test_vortex_pool_swaps_senses_under_mirror_and_time_reversal() -> None:
    from streamguard.models import VortexPool

    pool = VortexPool((2.0, 4.0)).eval()
    x = torch.randn(3, 3, 6, 24, 24, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        f = pool(x)
        swapped = torch.cat([f[:, 2:], f[:, :2]], 1)
        torch.testing.assert_close(pool(x.flip(-1)), swapped)
        torch.testing.assert_close(pool(x.flip(2)), swapped)
        assert not torch.allclose(f, swapped)


def test_tiny3d_with_vortex_round_trips_and_passes_gradients(tmp_path: Path) -> None:
    model = build_model("tiny3d", num_classes=3, widths=(4, 4, 8, 8), size=32, clip_len=8, vortex=(2.0,))
    save_model(model, tmp_path / "v.pt")
    loaded = load_model(tmp_path / "v.pt")
    assert loaded.net.vortex is not None and loaded.net.fc.in_features == 8 + 2
    x = clip(t=8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x))
        loaded.net.fc.weight[:, :8] = 0  # only the vortex features reach the logits
    x.requires_grad_(True)
    loaded(x)[:, 0].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # attacks see through the vortex features


def test_load_model_by_name_and_bad_refs(tmp_path: Path) -> None:
    assert load_model("tiny3d", num_classes=4).spec.num_classes == 4
    torch.save(build_model("tiny3d").net.state_dict(), tmp_path / "bare.pt")
    with pytest.raises(CheckpointError, match="no meta\\['model'\\]"):
        load_model(tmp_path / "bare.pt")
    with pytest.raises(CheckpointError, match="weights not found"):
        load_model(tmp_path / "absent.pt")


def test_frame_detectors_follow_torchvision_format() -> None:
    for name in ("fasterrcnn_mobilenet_v3_large_320_fpn", "fasterrcnn_resnet50_fpn", "fasterrcnn_mobilenet_v3_small_fpn"):
        model = build_model(name, num_classes=3, **TINY_FRCNN)
        assert model.spec.task == "frame" and model.spec.input_size == (64, 64)
        with torch.no_grad():
            out = model([torch.rand(3, 64, 80), torch.rand(3, 72, 64)])
        assert len(out) == 2
        for det in out:
            assert det["boxes"].shape[1:] == (4,)
            assert det["labels"].shape == det["scores"].shape == det["boxes"].shape[:1]


def test_slim_frame_detector_is_small_and_saves_its_settings(tmp_path: Path) -> None:
    model = build_model("fasterrcnn_mobilenet_v3_small_fpn", num_classes=2, min_size=96, max_size=96, representation=64)
    assert count_parameters(model) < 1_500_000 and model.spec.input_size == (96, 96)
    save_model(model, tmp_path / "slim.pt")
    again = load_model(tmp_path / "slim.pt")
    assert again.roi_heads.box_head.fc7.out_features == 64 and again.transform.min_size == (96,)
    state, reloaded = model.state_dict(), again.state_dict()
    assert all(torch.equal(state[k], reloaded[k]) for k in state)


def test_defended_model_keeps_spec_and_frozen_defense() -> None:
    model = build_model("tiny3d", num_classes=3)
    defended = DefendedModel(FixedRepaint((1, 3, 8, 32, 32)), model).train()
    assert defended.spec is model.spec and model.training and not defended.defense.training


@pytest.mark.parametrize(("name", "kw"), [("tiny3d", {}), ("mars", TINY_MARS), ("r2plus1d_18", {})])
def test_clip_models_through_art(name: str, kw: dict) -> None:
    model = build_model(name, num_classes=4, **kw)
    x = clip(t=8).numpy()
    y = np.eye(4)[[0, 3]]  # ART classifiers take one-hot labels
    est = to_art(model)
    assert est.clip_values == pytest.approx((0, 1)) and est.nb_classes == 4
    assert est.input_shape == (3, model.spec.clip_len, *model.spec.input_size)
    assert est.predict(x).shape == (2, 4)
    grad = est.loss_gradient(x, y)
    assert grad.shape == x.shape and np.abs(grad).sum() > 0


def test_art_gradient_passes_through_the_defense() -> None:
    model = build_model("tiny3d", num_classes=4)
    x = clip(t=8).numpy()
    est = to_art(model, defense=FixedRepaint((1, 3, 8, 32, 32)))
    with torch.no_grad():
        expected = model(FixedRepaint((1, 3, 8, 32, 32))(torch.from_numpy(x)))
    np.testing.assert_allclose(est.predict(x), expected.numpy(), rtol=1e-5, atol=1e-5)
    grad = est.loss_gradient(x, np.eye(4)[[1, 2]])
    assert np.all(grad[..., :8, :8] == 0) and np.abs(grad[..., 8:, 8:]).sum() > 0


def test_frame_detector_through_art() -> None:
    model = build_model("fasterrcnn_mobilenet_v3_large_320_fpn", num_classes=3, **TINY_FRCNN)
    est = to_art(model)
    x = np.random.default_rng(0).random((2, 3, 64, 64), dtype=np.float32)
    preds = est.predict(x)
    assert len(preds) == 2 and set(preds[0]) == {"boxes", "labels", "scores"}
    assert isinstance(preds[0]["boxes"], np.ndarray) and preds[0]["boxes"].shape[1:] == (4,)
    targets = [{"boxes": np.array([[4.0, 4.0, 40.0, 30.0]], np.float32), "labels": np.array([1])} for _ in range(2)]
    grad = est.loss_gradient(x, targets)
    assert grad.shape == x.shape and np.isfinite(grad).all() and np.abs(grad).sum() > 0
    defended = to_art(model, defense=FixedRepaint((1, 3, 64, 64)))
    assert np.all(defended.loss_gradient(x, targets)[..., :8, :8] == 0)


def test_normalization_is_not_part_of_the_checkpoint() -> None:
    model = build_model("tiny3d")
    assert isinstance(model, ClipClassifier)
    assert all(k.startswith("net.") for k in model.state_dict())


def test_cli_models_table(monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from streamguard.cli import app
    from streamguard.cli.common import out

    monkeypatch.setattr(out, "width", 200)  # no truncated names
    result = CliRunner().invoke(app, ["models"])
    assert result.exit_code == 0, result.output
    for name in list_models():
        assert name in result.output
    assert "3x16x112x112" in result.output and "0.003922" in result.output  # MARS: std 1 on 0-255 pixels
