import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from streamguard.checkpoints import read_manifest
from streamguard.cli import app
from streamguard.demo import run_demo
from streamguard.detector import PSPNet
from streamguard.models import build_model, load_model, save_model
from streamguard.patchzero import PatchZero, load_defense, save_defense


@pytest.fixture
def tiny_weights(tmp_path: Path) -> tuple[Path, Path]:
    model = build_model("tiny3d", 12, widths=(4, 8, 8, 8), clip_len=8, size=32).eval()
    save_model(model, tmp_path / "cls.pt")
    defense = PatchZero(PSPNet("mobilenet_v3", width=0.125), mean=model.spec.mean)
    save_defense(defense, tmp_path / "det.pt")
    return tmp_path / "cls.pt", tmp_path / "det.pt"


def test_demo_writes_its_files_and_consistent_results(tmp_path: Path, tiny_weights: tuple[Path, Path]) -> None:
    cls, det = tiny_weights
    result = run_demo(tmp_path / "demo", classifier=str(cls), detector=str(det), iters=2, clips=2, mode="bpda")
    assert result.truth == ["MoveRight", "MoveUp"]
    assert len(result.clean) == len(result.attacked) == len(result.defended) == 2
    for name, path in result.files.items():
        assert Path(path).is_file() and Path(path).stat().st_size > 0, name
    saved = json.loads(Path(result.files["result"]).read_text())
    assert saved["mode"] == "bpda" and saved["defended"] == result.defended
    assert 0.0 <= result.masked_fraction <= 1.0


def test_demo_writes_strict_json_when_nothing_is_detected(tmp_path: Path, tiny_weights: tuple[Path, Path]) -> None:
    import torch

    cls, _ = tiny_weights
    model = load_model(cls)
    net = PSPNet("mobilenet_v3", width=0.125)
    with torch.no_grad():
        net.head[-1].weight.zero_()
        net.head[-1].bias.fill_(-50.0)  # never fires
    blind = PatchZero(net, mean=model.spec.mean)
    save_defense(blind, tmp_path / "blind.pt")
    result = run_demo(tmp_path / "demo", classifier=str(cls), detector=str(tmp_path / "blind.pt"), iters=1, clips=2, mode="do")
    assert result.masked_fraction == 0.0 and result.pixel_precision != result.pixel_precision  # 0 / 0
    text = Path(result.files["result"]).read_text()
    saved = json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in the result file"))
    assert saved["pixel_precision"] is None and saved["pixel_recall"] == 0.0


def test_demo_rejects_an_unknown_mode() -> None:
    result = CliRunner().invoke(app, ["demo", "--mode", "cw"])
    assert result.exit_code == 2 and "--mode" in result.output


def test_shipped_weights_load_and_match_their_hashes() -> None:
    manifest = read_manifest()
    assert {"synth-tiny3d", "synth-patchzero"} <= set(manifest)
    model = load_model("synth-tiny3d")
    assert model.spec.num_classes == 12 and len(model.spec.class_names) == 12
    defense = load_defense("synth-patchzero", mean=list(model.spec.mean))
    clip = np.full((1, 3, model.spec.clip_len, *model.spec.input_size), 0.5, np.float32)
    import torch

    with torch.no_grad():
        clean, mask = defense.sanitize(torch.from_numpy(clip))
        assert model(clean).shape == (1, 12)
    assert mask.shape == (1, 1, model.spec.clip_len, *model.spec.input_size)
    for entry in manifest.values():
        assert entry["bytes"] < 8_000_000 and entry["command"].startswith("streamguard train")


def test_shipped_frame_detector_finds_the_benchmark_object() -> None:
    import torch
    from torchvision.ops import box_iou

    from streamguard.data import render_video

    assert {"synth-frcnn", "synth-patchzero-stage1"} <= set(read_manifest())
    model = load_model("synth-frcnn")
    assert model.spec.task == "frame" and model.spec.class_names == ("background", "object")
    frames, boxes, _ = render_video(0, 12345, size=64, frames=8)  # a video no split contains
    with torch.no_grad():
        out = model([torch.from_numpy(f).permute(2, 0, 1).float() / 255 for f in frames])
    hits = [
        len(det["scores"]) > 0 and box_iou(det["boxes"][det["scores"].argmax()][None], torch.from_numpy(truth)[None]).item() > 0.5
        for det, truth in zip(out, boxes)
    ]
    assert sum(hits) >= 6, hits


def test_shipped_classifier_recognises_fresh_benchmark_clips() -> None:
    """Two videos per class that no split contains, both rotation senses included (chance: 1/12)."""
    import torch

    from streamguard.data import SYNTH_CLASSES, render_video

    model = load_model("synth-tiny3d")
    clips, labels = [], []
    for label in range(len(SYNTH_CLASSES)):
        for seed in (12345, 12346):
            frames, _, _ = render_video(label, seed + 100 * label, size=64, frames=16)
            clips.append(torch.from_numpy(frames).permute(3, 0, 1, 2).float() / 255)
            labels.append(label)
    with torch.no_grad():
        predicted = model(torch.stack(clips)).argmax(1).tolist()
    right = [p == y for p, y in zip(predicted, labels)]
    assert sum(right) >= 22, [(SYNTH_CLASSES[y], SYNTH_CLASSES[p]) for p, y in zip(predicted, labels) if p != y]
    rotate = [SYNTH_CLASSES.index(n) for n in ("RotateClockwise", "RotateCounterClockwise")]
    assert sum(r for r, y in zip(right, labels) if y in rotate) >= 3  # the pair plain tiny3d confused
