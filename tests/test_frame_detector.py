"""The per-frame downstream detector: boxes in clips, training, masked PGD on Faster R-CNN, Table 3."""

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from streamguard.attacks import MaskedFrameAttack, masks_for_batch
from streamguard.checkpoints import load_checkpoint
from streamguard.data import BoxClips, UCF101Clips, crop_resize_boxes, make_synthmotion
from streamguard.detector import PSPNet
from streamguard.errors import ConfigError, InputError
from streamguard.evaluation import (
    Report,
    evaluate,
    is_frame_report,
    report_markdown,
    table3_rows,
)
from streamguard.models import build_model, load_model
from streamguard.patchzero import FramesAsClip, PatchZero, load_defense, save_defense
from streamguard.recipes import Recipe, parse_recipe
from streamguard.training import train_detector_stage2, train_frame_detector

FRCNN = "fasterrcnn_mobilenet_v3_small_fpn"


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 classes x 2 videos (12 train, 12 test), 8 frames of 40x40."""
    return make_synthmotion(tmp_path_factory.mktemp("synth"), videos_per_class=2, seed=0, size=40, frames=8)


def recipe(tmp: Path, synth: Path, **over: Any) -> Recipe:
    table: dict[str, Any] = {
        "model": {"name": FRCNN, "num_classes": 2, "input_size": 64},
        "defense": {"backbone": "resnet18", "width": 0.1, "dilate": 0},
        "data": {"root": str(synth), "size": 40, "clip_len": 4, "frames": 8, "videos_per_class": 2},
        "attack": {"methods": ["pgd"], "areas": [0.1], "iters": 2, "batch": 2},
        "evaluate": {"defenses": ["none", "gt", "patchzero"], "output": str(tmp / "eval"), "max_videos": 2},
        "train": {"output": str(tmp / "run"), "eval_every": 2, "checkpoint_every": 1, "frame_detector": {"steps": 2, "batch": 2}},
    }
    for section, values in over.items():
        table[section] = {**table.get(section, {}), **values}
    return parse_recipe(table)


def frcnn(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(FRCNN, 2, min_size=64, max_size=64, rpn_pre_nms_top_n_test=50, rpn_post_nms_top_n_test=20)


# ---------------------------------------------------------------- boxes


def test_crop_resize_boxes_follow_the_center_crop() -> None:
    boxes = np.array([[30, 10, 50, 20], [0, 0, 15, 5], [90, 40, 100, 60]], np.float32)
    out, keep = crop_resize_boxes(boxes, height=60, width=100, size=30)  # crop x 20..80, scale 0.5
    assert np.allclose(out, [[5, 5, 15, 10]]) and keep.tolist() == [True, False, False]  # nothing left inside: dropped
    assert np.allclose(crop_resize_boxes(np.array([[10, 30, 30, 50]], np.float32), 60, 100, 30)[0], [[0, 15, 5, 25]])
    assert crop_resize_boxes(np.zeros((0, 4), np.float32), 60, 100, 30)[0].shape == (0, 4)


def test_box_clips_give_one_target_per_frame_on_the_object(synth: Path) -> None:
    clips = UCF101Clips(synth, "test", clip_len=4, size=40)
    ds = BoxClips(clips)
    clip, targets = ds[0]
    assert clip.shape == (3, 4, 40, 40) and len(targets) == 4
    for t, target in enumerate(targets):
        assert target["labels"].tolist() == [1] * len(target["boxes"])
        for x0, y0, x1, y1 in target["boxes"].tolist():
            assert 0 <= x0 < x1 <= 40 and 0 <= y0 < y1 <= 40
    labelled = BoxClips(clips, num_classes=13)[0][1]
    assert labelled[0]["labels"].tolist() == [clips.videos[0][1] + 1] * len(labelled[0]["boxes"])


def test_box_clips_name_a_missing_box_file(synth: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(synth, copy)
    path = UCF101Clips(copy, "test").videos[0][0]
    Path(f"{path}.boxes.json").unlink()
    with pytest.raises(InputError, match="boxes.json"):
        BoxClips(UCF101Clips(copy, "test"))


# ---------------------------------------------------------------- training


def test_train_frame_detector_changes_weights_and_loads(tmp_path: Path, synth: Path) -> None:
    untrained = train_frame_detector(recipe(tmp_path / "zero", synth, train={"frame_detector": {"steps": 0}}), device="cpu")
    result = train_frame_detector(recipe(tmp_path, synth), eval_frames=8, device="cpu")
    assert result.steps == 2 and {"loss", "ap", "ap50", "ap75"} <= result.metrics.keys()
    model = load_model(str(result.path))
    assert model.spec.task == "frame" and model.spec.class_names == ("background", "object")
    assert model.transform.min_size == (64,)
    start, trained = load_checkpoint(untrained.path)[0], model.state_dict()
    assert any(not torch.equal(start[k], trained[k]) for k in trained if trained[k].is_floating_point())
    sidecar = json.loads(result.path.with_name("frame-detector.pt.json").read_text())
    assert sidecar["kind"] == "frame_detector" and sidecar["sha256"] == result.sha256


@pytest.mark.slow
def test_train_frame_detector_resume_is_bit_identical(tmp_path: Path, synth: Path) -> None:
    whole = train_frame_detector(recipe(tmp_path / "a", synth), eval_frames=4, device="cpu")
    part = recipe(tmp_path / "b", synth, train={"frame_detector": {"steps": 1, "batch": 2}})
    train_frame_detector(part, eval_frames=4, device="cpu")
    resumed = train_frame_detector(recipe(tmp_path / "b", synth), resume=True, eval_frames=4, device="cpu")
    a, b = load_checkpoint(whole.path)[0], load_checkpoint(resumed.path)[0]
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- attack


def _targets(n: int, t: int) -> list[list[dict[str, torch.Tensor]]]:
    box = {"boxes": torch.tensor([[8.0, 8.0, 24.0, 24.0]]), "labels": torch.tensor([1])}
    return [[box] * t for _ in range(n)]


def _loss(model: torch.nn.Module, clips: np.ndarray, targets: list) -> float:
    """The training loss ART ascends: train mode with frozen batch norm, same proposal sampling each call."""
    frames = torch.from_numpy(clips).transpose(1, 2).flatten(0, 1)
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    torch.manual_seed(0)
    with torch.no_grad():
        losses = model(list(frames), [t for clip in targets for t in clip])
    model.eval()
    return float(sum(losses.values()))


@pytest.mark.parametrize("mode", ["do", "bpda"])
def test_masked_frame_attack_raises_the_loss_inside_the_patch_only(mode: str) -> None:
    model = frcnn()
    torch.manual_seed(1)  # an untrained detector near p = 0.5 everywhere: it masks nothing at threshold 0.9, but
    # BPDA's soft mask still has a gradient, so the patch is optimized through the defense
    defense = PatchZero(PSPNet("resnet18", width=0.1, aux=False), mean=(0.5, 0.5, 0.5), threshold=0.9, dilate=0).eval()
    x = np.random.default_rng(0).uniform(0.2, 0.8, (1, 3, 3, 32, 32)).astype(np.float32)
    targets = _targets(1, 3)
    mask = masks_for_batch(1, (3, 32, 32), 0.15, seed=0)
    adv = MaskedFrameAttack(model, mode, defense=defense, eps=1.0, step=0.1, iters=3).generate(x, targets, mask)
    assert adv.shape == x.shape and adv.dtype == np.float32
    np.testing.assert_array_equal(adv[np.broadcast_to(mask, x.shape) == 0], x[np.broadcast_to(mask, x.shape) == 0])
    assert np.abs(adv - x).max() > 0.05
    assert _loss(model, adv, targets) > _loss(model, x, targets)
    assert defense.mask(torch.from_numpy(adv)).sum() == 0
    if mode == "bpda":  # the gradient went through the detector's soft mask, so the patch differs from DO's
        do = MaskedFrameAttack(model, "do", eps=1.0, step=0.1, iters=3).generate(x, targets, mask)
        assert not np.array_equal(adv, do)
    assert not defense.bpda and not any(p.requires_grad is False for p in model.parameters())


def test_masked_frame_attack_refuses_a_classifier_and_bad_targets() -> None:
    with pytest.raises(ConfigError, match="frame detector"):
        MaskedFrameAttack(build_model("tiny3d", 3, clip_len=2, size=16))
    with pytest.raises(ConfigError, match="N x T targets"):
        MaskedFrameAttack(frcnn()).generate(np.zeros((1, 3, 2, 16, 16), np.float32), _targets(1, 3), np.ones((2, 16, 16)))


def test_frames_as_clip_fuses_the_mask_over_the_frames() -> None:
    detector = PSPNet("resnet18", width=0.1, aux=False)
    defense = PatchZero(detector, mean=(0.5, 0.5, 0.5), temporal="mean").eval()
    frames = torch.rand(4, 3, 24, 24)
    wrapped = FramesAsClip(defense)(frames)
    expected = defense(frames.transpose(0, 1)[None])[0].transpose(0, 1)
    assert wrapped.shape == frames.shape and torch.equal(wrapped, expected)


# ---------------------------------------------------------------- Table 3


@pytest.fixture(scope="module")
def frame_report(synth: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    tmp = tmp_path_factory.mktemp("frames")
    rec = recipe(tmp, synth)
    trained = train_frame_detector(rec, eval_frames=4, device="cpu")
    rec.model.weights = str(trained.path)
    torch.manual_seed(0)
    pz = PatchZero(PSPNet("resnet18", width=0.1, aux=False), mean=(0.485, 0.456, 0.406), dilate=0)
    return rec, pz, evaluate(rec, patchzero=pz)


def test_frame_grid_has_every_cell_and_table3(frame_report: Any) -> None:
    rec, _, report = frame_report
    assert is_frame_report(report)
    cells = {(r["defense"], r["attack"]) for r in report.samples}
    assert cells == {
        ("none", "clean"), ("gt", "clean"), ("patchzero", "clean"),
        ("none", "pgd-0.1-do"), ("gt", "pgd-0.1-do"), ("patchzero", "pgd-0.1-do"), ("patchzero", "pgd-0.1-bpda"),
    }  # fmt: skip
    for r in report.samples:
        assert len(r["frames"]) == len(r["targets"]) == 4
        assert all(len(p["boxes"]) == len(p["scores"]) for p in r["frames"])
    header, rows = table3_rows(report)
    assert header == ["Defense", "No attack", "MPGD 10%"]
    assert [row[0] for row in rows] == ["Undefended", "GT Mask", "PatchZero (DO)", "PatchZero (BPDA)"]
    assert all(len(cell.split(" / ")) == 3 for row in rows for cell in row[1:])
    assert "**Table 3**" in report_markdown(report) and "Table 4" not in report_markdown(report)
    ap = report.box_ap("none", "clean")
    assert set(ap) == {"ap", "ap50", "ap75"} and all(0 <= v <= 1 for v in ap.values())


def test_table3_names_the_worst_adaptive_variant(frame_report: Any) -> None:
    """A variant that erases every box is the worst case, and the breakdown says so in AP50."""
    from streamguard.evaluation.tables import variant_rows

    _, _, report = frame_report
    bpda = [r for r in report.samples if r["attack"] == "pgd-0.1-bpda"]
    erased = [{**r, "attack": "pgd-0.1-bpda-t1", "frames": [{"boxes": [], "labels": [], "scores": []} for _ in r["frames"]]} for r in bpda]
    settings = json.loads(json.dumps(report.settings))
    settings["recipe"]["evaluate"]["bpda_variants"] = ["t1"]
    both = Report(settings, report.samples + erased)
    header, rows = variant_rows(both)
    assert header == ["BPDA attack on PatchZero", "MPGD 10%"]
    plain = report.box_ap("patchzero", "pgd-0.1-bpda")["ap50"]
    assert rows == [["BPDA (temperature 4)", f"{100 * plain:.1f}"], ["t1", "0.0"], ["worst case (per video)", "0.0"]]
    assert table3_rows(both)[1][-1][-1].split(" / ")[1] == "0.0"  # Table 3's BPDA row is that worst case
    assert "box AP50, %" in report_markdown(both)


def test_table3_counts_frames_without_the_undefended_row(frame_report: Any) -> None:
    _, _, report = frame_report
    frames = 4 * len(report.settings["videos"])
    assert f"{frames} frames)" in report_markdown(report)
    only_patchzero = Report(report.settings, [r for r in report.samples if r["defense"] == "patchzero"])
    assert f"{frames} frames)" in report_markdown(only_patchzero)


def test_frame_grid_resumes_without_recomputing(frame_report: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    rec, pz, report = frame_report

    def no_attack(*args: Any, **kw: Any) -> None:
        raise AssertionError("a finished cell was attacked again")

    monkeypatch.setattr(MaskedFrameAttack, "generate", no_attack)
    again = evaluate(rec, patchzero=pz)
    assert again.samples == report.samples


def test_frame_grid_runs_the_adaptive_variants_and_reports_the_worst_case(frame_report: Any, tmp_path: Path) -> None:
    rec, pz, report = frame_report
    other = tmp_path / "other.pt"
    torch.manual_seed(1)
    save_defense(PatchZero(PSPNet("resnet18", width=0.1, aux=False), mean=(0.485, 0.456, 0.406), dilate=0), other)
    rec = recipe(tmp_path, Path(rec.data.root), model={"weights": rec.model.weights},
                 evaluate={"bpda_variants": ["t1", "identity", "transfer"], "transfer_detector": str(other)})  # fmt: skip
    again = evaluate(rec, patchzero=pz)
    attacks = {r["attack"] for r in again.samples if r["defense"] == "patchzero"}
    assert {"pgd-0.1-bpda-t1", "pgd-0.1-bpda-identity", "pgd-0.1-bpda-transfer"} <= attacks
    bpda = sorted(k for k in attacks if "bpda" in k)
    worst = again.worst_box_ap("patchzero", bpda)
    rows = {row[0]: row[2] for row in table3_rows(again)[1]}
    assert rows["PatchZero (BPDA)"].split(" / ")[1] == f"{100 * worst['ap50']:.1f}"  # the row is the per-video worst case
    assert again.worst_box_ap("patchzero", bpda[:1]) == again.box_ap("patchzero", bpda[0])


def test_worst_box_ap_takes_each_video_at_its_worst_attack() -> None:
    """Each of two attacks hides the object in one of two videos: either alone leaves AP50 50%, the
    per-video worst case 0 (a video counts only if it survives every attack, as in Table 4)."""
    target = [{"boxes": [[0.0, 0.0, 10.0, 10.0]], "labels": [1]}]
    hit = [{"boxes": [[0.0, 0.0, 10.0, 10.0]], "scores": [0.9], "labels": [1]}]
    miss = [{"boxes": [], "scores": [], "labels": []}]
    samples = [{"defense": "patchzero", "attack": attack, "video": video, "frames": frames, "targets": target}
               for attack, video, frames in [("a", 0, miss), ("a", 1, hit), ("b", 0, hit), ("b", 1, miss)]]  # fmt: skip
    report = Report({"videos": [0, 1]}, samples)
    assert report.box_ap("patchzero", "a")["ap50"] == pytest.approx(0.5, abs=0.01)
    assert report.box_ap("patchzero", "b")["ap50"] == pytest.approx(0.5, abs=0.01)
    assert report.worst_box_ap("patchzero", ["a", "b"])["ap50"] == 0.0
    assert report.worst_box_ap("patchzero", ["c"]) is None


def test_frame_grid_refuses_autopgd(synth: Path, tmp_path: Path) -> None:
    rec = recipe(tmp_path, synth, attack={"methods": ["apgd"]})
    with pytest.raises(ConfigError, match="masked PGD only"):
        evaluate(rec, patchzero=PatchZero(PSPNet("resnet18", width=0.1, aux=False), mean=(0.5, 0.5, 0.5)))


def test_frame_grid_refuses_restarts_it_cannot_make(synth: Path, tmp_path: Path) -> None:
    """ART's PGD for detectors has no random start: a 'restarts' variant would be the plain attack again."""
    rec = recipe(tmp_path, synth, evaluate={"bpda_variants": ["t1", "uncompleted+restarts"]})
    with pytest.raises(ConfigError, match="'restarts' needs a random start"):
        evaluate(rec, patchzero=PatchZero(PSPNet("resnet18", width=0.1, aux=False), mean=(0.5, 0.5, 0.5)))


# ---------------------------------------------------------------- PatchZero stage 2 against the frame detector


def test_frame_task_loss_is_per_clip_raised_by_the_attack_and_changes_nothing(synth: Path) -> None:
    from streamguard.training.race import FrameDetectorTask, patch_attack, task_for

    model = frcnn().eval()
    ds = BoxClips(UCF101Clips(synth, "test", clip_len=4, size=40))
    items = [ds[i] for i in range(2)]
    x, targets = torch.stack([c for c, _ in items]), [t for _, t in items]
    task = task_for(model)
    assert isinstance(task, FrameDetectorTask) and task.metric == "ap50"
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(0)
    mask = torch.from_numpy(masks_for_batch(2, (4, 40, 40), 0.2, seed=0))
    z0 = torch.full_like(x, 0.5)
    torch.manual_seed(1)
    start = task.loss(x * (1 - mask) + mask * z0, targets)
    torch.manual_seed(1)
    z, loss, _ = patch_attack(model, None, x, targets, mask, z0, iters=3, step=0.2)
    assert start.shape == loss.shape == (2,) and loss.sum() > start.sum()  # the attack raises the box loss
    assert torch.equal(z * (1 - mask), z0 * (1 - mask)) and not model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # batch-norm statistics too
    assert task.fooled(x, targets).shape == (2,) and 0.0 <= task.score(x, targets) <= 1.0


def test_stage2_race_against_a_frame_detector(frame_report: Any, synth: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stage 2 against a per-frame detector is the same warm-started race, scored by box AP50, with
    its attacks in plain PyTorch (ART's detector attack is the evaluation's judge only)."""
    rec, _, _ = frame_report
    torch.manual_seed(0)
    init = tmp_path / "stage1.pt"
    save_defense(PatchZero(PSPNet("resnet18", width=0.1, aux=True), mean=(0.485, 0.456, 0.406), dilate=0), init)

    def no_art(*args: Any, **kw: Any) -> None:
        raise AssertionError("stage 2 attacked through ART")

    monkeypatch.setattr(MaskedFrameAttack, "generate", no_art)
    race = {"pool": 4, "draw": 2, "iters": 1, "refresh": 1, "procedural": 0, "benign": 1, "eval_iters": 1}
    over = {"model": {"weights": rec.model.weights}, "train": {"steps": 2, "lr": 1e-3, "eval_every": 1, "race": race}}
    result = train_detector_stage2(recipe(tmp_path, synth, **over), init=init, eval_videos=2)
    assert result.steps == 2
    assert {"loss", "f1", "clean_ap50", "robust_ap50", "race_recall", "pool_fooled", "pool_iters"} <= result.metrics.keys()
    assert all(0 <= result.metrics[k] <= 1 for k in ("clean_ap50", "robust_ap50", "pool_fooled"))
    assert [h["step"] for h in result.history] == [1, 2] and all("robust_ap50" in h for h in result.history)
    before, after = load_checkpoint(init)[0], load_checkpoint(result.path)[0]
    assert any(not torch.equal(before[k], after[k]) for k in before if k.endswith("weight"))
    assert load_defense(result.path).mean.tolist() == pytest.approx([0.485, 0.456, 0.406])
