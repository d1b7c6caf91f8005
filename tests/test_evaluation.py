from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from streamguard.codecs import h264_roundtrip
from streamguard.defenses import (
    GTMask,
    JpegDefense,
    NoDefense,
    VideoCompression,
)
from streamguard.errors import ConfigError, InputError
from streamguard.evaluation import (
    Report,
    evaluate,
    grid,
    markdown_table,
    report_markdown,
    table4,
    table4_rows,
    table5a_rows,
    video_masks,
)
from streamguard.metrics import PixelCounts, detection_ap, topk_accuracy
from streamguard.models import ClipClassifier, ModelSpec
from streamguard.patchzero import PatchZero
from streamguard.recipes import AttackSection, EvaluateSection, Recipe

GRAY = 0.5
OBJECT = (slice(0, 8), slice(0, 8))  # the object sits in the top-left corner


# ---------------------------------------------------------------- metrics


def test_topk_accuracy_hand_computed() -> None:
    logits = torch.tensor(
        [
            [0.9, 0.1, 0.0, 0.0, 0.0, 0.0],  # label 0: rank 1
            [0.6, 0.5, 0.4, 0.3, 0.2, 0.1],  # label 4: rank 5
            [0.6, 0.5, 0.4, 0.3, 0.2, 0.1],  # label 5: rank 6
        ]
    )
    labels = torch.tensor([0, 4, 5])
    acc = topk_accuracy(logits, labels, ks=(1, 5))
    assert acc[1] == pytest.approx(1 / 3)
    assert acc[5] == pytest.approx(2 / 3)
    assert topk_accuracy(logits[:, :3], torch.tensor([2, 1, 0]), ks=(5,))[5] == 1.0  # k clamped to K


def test_detection_ap_two_boxes() -> None:
    # image 1: a perfect box; image 2: IoU 0.68 -> a hit at IoU thresholds 0.50..0.65, a miss from 0.70.
    preds = [
        {"boxes": torch.tensor([[0.0, 0, 10, 10]]), "scores": torch.tensor([0.9]), "labels": torch.tensor([1])},
        {"boxes": torch.tensor([[0.0, 0, 10, 6.8]]), "scores": torch.tensor([0.8]), "labels": torch.tensor([1])},
    ]
    targets = [{"boxes": torch.tensor([[0.0, 0, 10, 10]]), "labels": torch.tensor([1])} for _ in range(2)]
    half = 51 / 101  # COCO's 101-point interpolation of precision 1 up to recall 0.5, then 0
    ap = detection_ap(preds, targets)
    assert ap["ap50"] == pytest.approx(1.0)
    assert ap["ap75"] == pytest.approx(half)
    assert ap["ap"] == pytest.approx((4 * 1.0 + 6 * half) / 10)


def test_pixel_counts_hand_computed() -> None:
    pred = torch.tensor([[1, 1, 0], [0, 1, 0]])
    true = torch.tensor([[1, 0, 0], [0, 1, 1]])
    c = PixelCounts.from_masks(pred, true)
    assert (c.tp, c.fp, c.fn, c.tn) == (2, 1, 1, 2)
    assert c.precision == pytest.approx(2 / 3)
    assert c.recall == pytest.approx(2 / 3)
    assert c.f1 == pytest.approx(2 / 3)
    assert c.accuracy == pytest.approx(4 / 6)
    assert c.fpr == pytest.approx(1 / 3)
    benign = PixelCounts.from_masks(torch.tensor([0, 1, 0, 0]), torch.zeros(4))
    assert benign.fpr == pytest.approx(1 / 4) and math.isnan(benign.recall)
    total = c + benign
    assert (total.tp, total.fp, total.fn, total.tn) == (2, 2, 1, 5)
    assert total.fpr == pytest.approx(2 / 7)


# ---------------------------------------------------------------- baselines


def _noisy_clips(n: int = 2, t: int = 4, size: int = 24) -> Tensor:
    g = torch.Generator().manual_seed(0)
    smooth = torch.nn.functional.interpolate(torch.rand(n * t, 3, 4, 4, generator=g), size=(size, size), mode="bilinear")
    return smooth.view(n, t, 3, size, size).transpose(1, 2).contiguous()


def test_gt_mask_repaints_exactly_the_mask() -> None:
    x = _noisy_clips()
    mask = torch.zeros(2, 1, 4, 24, 24)
    mask[0, :, :, 2:6, 3:9] = 1
    mask[1, :, 1:, 10:20, 10:12] = 1
    mean = (0.1, 0.2, 0.3)
    x_clean, m = GTMask(mean).sanitize(x, mask=mask)
    inside = mask.expand_as(x).bool()
    assert torch.equal(x_clean[~inside], x[~inside])
    expected = torch.tensor(mean).view(1, 3, 1, 1, 1).expand_as(x)[inside]
    assert torch.equal(x_clean[inside], expected)
    assert torch.equal(m, mask)
    gt = GTMask(mean)
    gt.set_mask(mask)
    assert torch.equal(gt(x), x_clean)
    gt.reset()
    with pytest.raises(InputError, match="set_mask"):
        gt.sanitize(x)


@pytest.mark.parametrize("defense", [JpegDefense(75), VideoCompression(28)], ids=["jpeg", "h264"])
def test_compression_keeps_shape_and_range_and_changes_input_a_little(defense: nn.Module) -> None:
    x = _noisy_clips(size=23)  # odd size: H.264 pads to even and crops back
    x_clean, mask = defense.sanitize(x)
    assert x_clean.shape == x.shape and x_clean.dtype == x.dtype
    assert 0 <= x_clean.min() and x_clean.max() <= 1
    change = (x_clean - x).abs().mean().item()
    assert 0 < change < 0.05
    assert mask.shape == (2, 1, 4, 23, 23) and mask.sum() == 0
    assert torch.equal(defense.sanitize(x)[0], x_clean)  # deterministic
    frames = x[:, :, 0]
    assert defense.sanitize(frames)[0].shape == frames.shape
    x_req = x.clone().requires_grad_(True)
    defense(x_req).sum().backward()  # BPDA: identity backward
    assert torch.equal(x_req.grad, torch.ones_like(x))


def test_h264_roundtrip_is_deterministic() -> None:
    rng = np.random.default_rng(0)
    frames = (128 + rng.normal(0, 5, (4, 32, 32, 3))).clip(0, 255).astype(np.uint8)
    frames[:, 10:20, 10:20] = rng.integers(0, 2, (4, 10, 10, 3)) * 255  # a saturated patch
    first = h264_roundtrip(frames, crf=28)
    assert all(np.array_equal(h264_roundtrip(frames, crf=28), first) for _ in range(40))


def test_no_defense_is_identity() -> None:
    x = _noisy_clips()
    x_clean, mask = NoDefense().sanitize(x)
    assert torch.equal(x_clean, x) and mask.sum() == 0


def test_bad_settings_raise_config_error() -> None:
    with pytest.raises(ConfigError, match="jpeg_quality"):
        JpegDefense(0)
    with pytest.raises(ConfigError, match="h264_crf"):
        VideoCompression(60)


# ---------------------------------------------------------------- the grid on a constructed task


class ColorNet(nn.Module):
    """Logits = scaled mean of each normalized colour channel: the clip's dominant colour wins."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(50.0))

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * x.mean(dim=(2, 3, 4))


class DeviationDetector(nn.Module):
    """Flags pixels far from the gray background in some channel (patches; not the pale object)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("level", torch.tensor(0.3))

    def forward(self, x: Tensor) -> Tensor:
        return 20 * ((x - GRAY).abs().amax(dim=1, keepdim=True) - self.level)


class CountingClips:
    """Gray clips (T=4, 32x32) with a pale object of the label's colour in the top-left corner."""

    def __init__(self, labels: list[int]) -> None:
        self.labels = labels
        self.loaded: list[int] = []

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        self.loaded.append(i)
        g = torch.Generator().manual_seed(i)
        clip = GRAY + 0.02 * torch.randn(3, 4, 32, 32, generator=g)
        clip[self.labels[i], :, OBJECT[0], OBJECT[1]] = 0.75
        return clip.clamp(0, 1), self.labels[i]


def _model() -> ClipClassifier:
    spec = ModelSpec("colornet", "clip", (GRAY,) * 3, (0.25,) * 3, 4, (32, 32), 3)
    return ClipClassifier(ColorNet(), spec).eval()


def _patchzero() -> PatchZero:
    return PatchZero(DeviationDetector(), (GRAY,) * 3, dilate=1).eval()


def _recipe(out: Path, max_videos: int | None = None) -> Recipe:
    attack = AttackSection(methods=["pgd"], modes=["do", "bpda"], areas=[0.1], iters=2, step=0.25, batch=2, seed=3)
    return Recipe(attack=attack, evaluate=EvaluateSection(output=str(out), max_videos=max_videos, jpeg_quality=50))


def _run(out: Path, max_videos: int | None = None, **kw) -> tuple[Report, CountingClips]:
    data = CountingClips([0, 1, 2, 0])
    report = evaluate(_recipe(out, max_videos), model=_model(), patchzero=_patchzero(), dataset=data, **kw)
    return report, data


def _key(r: dict) -> tuple:
    return r["defense"], r["attack"], r["video"]


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory) -> Report:
    torch.manual_seed(0)
    return _run(tmp_path_factory.mktemp("full"))[0]


def test_grid_produces_every_cell(full: Report) -> None:
    cells = {(d, s.key) for d, s in grid(_recipe(Path("unused")))}
    assert len(cells) == 5 + 5 + 3  # clean x 5 defenses, DO x 5, BPDA x (jpeg, h264, patchzero)
    assert {(r["defense"], r["attack"]) for r in full.samples} == cells
    assert len(full.samples) == len(cells) * 4
    for r in full.samples:
        assert r["correct"] == (r["pred"] == r["label"])
    saved = Report.load(Path(full.settings["recipe"]["evaluate"]["output"]) / "report.json")
    assert saved.samples == full.samples
    # the constructed task: clean clips are classified correctly, the DO patch fools the bare model
    assert full.accuracy("none", "clean") == 1.0
    assert full.accuracy("none", "pgd-0.1-do") < 1.0
    assert full.accuracy("patchzero", "pgd-0.1-do") == 1.0


def test_pixel_metrics_count_every_pixel(full: Report) -> None:
    pixels = 4 * 4 * 32 * 32
    masks = video_masks(range(4), (4, 32, 32), 0.1, seed=3)
    for attack in ("pgd-0.1-do", "pgd-0.1-bpda"):
        c = full.pixel_counts([attack])
        assert c.tp + c.fp + c.fn + c.tn == pixels
        assert c.tp + c.fn == masks.sum()
    do = full.pixel_counts(["pgd-0.1-do"])
    assert do.recall > 0.9  # the saturated PGD patch is far from gray
    benign = full.pixel_counts(["clean"])
    assert benign.tp == benign.fn == 0 and benign.fpr == 0.0


def test_gt_mask_restores_clean_prediction_where_patch_misses_the_object(full: Report) -> None:
    masks = video_masks(range(4), (4, 32, 32), 0.1, seed=3)
    clean = {r["video"]: r["pred"] for r in full.records("none", "clean")}
    undefended = {r["video"]: r["pred"] for r in full.records("none", "pgd-0.1-do")}
    away = [v for v in range(4) if masks[v, 0, :, OBJECT[0], OBJECT[1]].sum() == 0]
    assert away, "the seed should place some patches away from the object"
    assert any(undefended[v] != clean[v] for v in away), "the attack should fool the bare model"
    for r in full.records("gt", "pgd-0.1-do"):
        if r["video"] in away:
            assert r["pred"] == clean[r["video"]]


def test_grid_is_reproducible(full: Report, tmp_path: Path) -> None:
    again, _ = _run(tmp_path)
    assert again.samples == full.samples


def test_grid_resumes_without_recomputing(full: Report, tmp_path: Path) -> None:
    first, data = _run(tmp_path, max_videos=2)
    assert {r["video"] for r in first.samples} == set(full.settings["videos"][:2])
    log = (tmp_path / "samples.jsonl").read_text()
    second, data = _run(tmp_path, max_videos=4)
    assert sorted(data.loaded) == sorted(full.settings["videos"][2:])  # done videos are not loaded again
    assert (tmp_path / "samples.jsonl").read_text().startswith(log)
    assert second.samples == full.samples


def test_grid_resumes_after_interruption(full: Report, tmp_path: Path) -> None:
    class Stop(Exception):
        pass

    def stop_midway(done: int, total: int) -> None:
        if done >= total // 3:
            raise Stop

    with pytest.raises(Stop):
        _run(tmp_path, on_progress=stop_midway)
    with open(tmp_path / "samples.jsonl", "a") as f:
        f.write('{"defense": "none", "att')  # killed mid-line
    seen: list[tuple[int, int]] = []
    resumed, _ = _run(tmp_path, on_progress=lambda d, t: seen.append((d, t)))
    assert seen[0][0] >= len(full.samples) // 3 and seen[-1] == (len(full.samples), len(full.samples))
    assert resumed.samples == full.samples
    assert len({_key(r) for r in resumed.samples}) == len(resumed.samples)


def test_adding_a_variant_to_a_finished_run_computes_only_its_cells(tmp_path: Path) -> None:
    r = _recipe(tmp_path)
    r.evaluate.defenses, r.evaluate.bpda_variants = ["none", "patchzero"], ["t1"]
    first = evaluate(r, model=_model(), patchzero=_patchzero(), dataset=CountingClips([0, 1]))
    log = (tmp_path / "samples.jsonl").read_text()
    r.evaluate.bpda_variants = ["t1", "identity"]
    second = evaluate(r, model=_model(), patchzero=_patchzero(), dataset=CountingClips([0, 1]))
    assert (tmp_path / "samples.jsonl").read_text().startswith(log)  # the finished cells are kept
    added = [rec for rec in second.samples if rec not in first.samples]
    assert {rec["attack"] for rec in added} == {"pgd-0.1-bpda-identity"} and len(added) == 2
    fresh = evaluate(r, model=_model(), patchzero=_patchzero(), dataset=CountingClips([0, 1]), resume=False)
    assert fresh.samples == second.samples  # the same results as one run with both variants


def test_a_retrained_detector_recomputes_only_patchzero_cells(tmp_path: Path) -> None:
    r = _recipe(tmp_path)
    r.evaluate.defenses = ["none", "gt", "patchzero"]
    first = evaluate(r, model=_model(), patchzero=_patchzero(), dataset=CountingClips([0, 1]))
    retrained = _patchzero()
    retrained.detector.level.fill_(0.2)  # other weights behind the same defense
    seen: list[int] = []
    second = evaluate(r, model=_model(), patchzero=retrained, dataset=CountingClips([0, 1]), on_progress=lambda d, t: seen.append(d))
    others = [rec for rec in first.samples if rec["defense"] != "patchzero"]
    assert seen[0] == len(others) and [rec for rec in second.samples if rec["defense"] != "patchzero"] == others
    fresh = evaluate(r, model=_model(), patchzero=retrained, dataset=CountingClips([0, 1]), resume=False)
    assert fresh.samples == second.samples and fresh.settings["fingerprint"] != first.settings["fingerprint"]
    r.evaluate.defenses = ["none"]  # a run of fewer defenses keeps the others' records for later
    counts: list[tuple[int, int]] = []
    evaluate(r, model=_model(), patchzero=retrained, dataset=CountingClips([0, 1]), on_progress=lambda d, t: counts.append((d, t)))
    assert counts == [(len([rec for rec in others if rec["defense"] == "none"]),) * 2]  # only its own cells count
    r.evaluate.defenses = ["none", "gt", "patchzero"]
    seen.clear()
    evaluate(r, model=_model(), patchzero=retrained, dataset=CountingClips([0, 1]), on_progress=lambda d, t: seen.append(d))
    assert seen == [len(second.samples)]
    retrained.complete = "box"  # a setting the defense runs with, not in the recipe: its cells are recomputed too
    seen.clear()
    evaluate(r, model=_model(), patchzero=retrained, dataset=CountingClips([0, 1]), on_progress=lambda d, t: seen.append(d))
    assert seen[0] == len(others)


def test_resume_refuses_other_settings(full: Report, tmp_path: Path) -> None:
    _run(tmp_path, max_videos=1)
    recipe = _recipe(tmp_path)
    recipe = replace(recipe, attack=replace(recipe.attack, iters=3))
    with pytest.raises(ConfigError, match="no-resume"):
        evaluate(recipe, model=_model(), patchzero=_patchzero(), dataset=CountingClips([0, 1, 2, 0]))
    evaluate(recipe, model=_model(), patchzero=_patchzero(), dataset=CountingClips([0]), resume=False)


def test_resume_refuses_results_of_other_weights(full: Report, tmp_path: Path) -> None:
    _run(tmp_path, max_videos=1)
    retrained = _model()
    with torch.no_grad():
        retrained.net.scale.fill_(40.0)  # same recipe, same names: other weights
    with pytest.raises(ConfigError, match="no-resume"):
        evaluate(_recipe(tmp_path), model=retrained, patchzero=_patchzero(), dataset=CountingClips([0, 1, 2, 0]))
    again, _ = _run(tmp_path, max_videos=2)  # the original weights still resume
    assert len({r["video"] for r in again.samples}) == 2


def test_unknown_defense_is_a_config_error(tmp_path: Path) -> None:
    recipe = replace(_recipe(tmp_path), evaluate=EvaluateSection(defenses=["none", "median"], output=str(tmp_path)))
    with pytest.raises(ConfigError, match="evaluate.defenses"):
        evaluate(recipe, model=_model(), dataset=CountingClips([0]))


def test_tables(full: Report) -> None:
    header, rows = table4_rows(full)
    assert header == ["Defense", "No attack", "MPGD 10%"]
    assert [r[0] for r in rows] == ["Undefended", "GT Mask", "JPEG", "Video compression", "PatchZero (DO)", "PatchZero (BPDA)"]
    undefended = rows[0]
    assert undefended[1] == f"{100 * full.accuracy('none', 'clean'):.1f} (100.0)"
    by_video = {}
    for r in full.records("jpeg", "pgd-0.1-do") + full.records("jpeg", "pgd-0.1-bpda"):
        by_video[r["video"]] = by_video.get(r["video"], True) and r["correct"]
    jpeg_worst = sum(by_video.values()) / len(by_video)  # per video: it must survive both attacks
    assert jpeg_worst <= min(full.accuracy("jpeg", "pgd-0.1-do"), full.accuracy("jpeg", "pgd-0.1-bpda"))
    assert rows[2][2].startswith(f"{100 * jpeg_worst:.1f} ")
    header5, rows5 = table5a_rows(full)
    assert [r[0] for r in rows5] == ["MPGD 10% (DO)", "MPGD 10% (BPDA)", "All DO", "All BPDA", "Benign (no attack)"]
    assert rows5[-1][-1] == "0.0"  # benign FPR of the constructed detector
    md = report_markdown(full)
    assert markdown_table(header, rows) in md and "Table 5a" in md
    assert table4(full).row_count == len(rows)
    json.dumps(full.to_dict())


def test_benign_row_shows_a_few_masked_pixels_and_no_precision() -> None:
    from streamguard.evaluation.tables import _benign_row

    few = _benign_row(PixelCounts(tp=0, fp=1, fn=0, tn=3999))  # 2.5e-4: 0.0 at one decimal
    assert few == ["Benign (no attack)", "–", "–", "100.0", "–", "0.025"]
    assert _benign_row(PixelCounts(tn=10))[-1] == "0.0" and _benign_row(PixelCounts(fp=1, tn=9))[-1] == "10.0"


def test_adaptive_variants_are_run_and_the_worst_case_reported(tmp_path: Path) -> None:
    from streamguard.detector import PSPNet
    from streamguard.evaluation.tables import variant_rows
    from streamguard.patchzero import save_defense

    torch.manual_seed(0)
    other = tmp_path / "other.pt"
    save_defense(PatchZero(PSPNet("resnet18", width=0.1, aux=False), (GRAY,) * 3), other)
    r = _recipe(tmp_path / "out")
    r.evaluate.defenses = ["none", "patchzero"]
    variants = ["t1", "identity", "iters100", "transfer", "uncompleted", "mean-fused", "mean-fused+iters100"]
    r.evaluate.bpda_variants, r.evaluate.transfer_detector = variants, str(other)
    patchzero = _patchzero()
    patchzero.complete, patchzero.temporal = "box", "median"
    report = evaluate(r, model=_model(), patchzero=patchzero, dataset=CountingClips([0, 1, 2, 0]))
    assert (patchzero.complete, patchzero.temporal) == ("box", "median")  # the variants give them back
    keys = {rec["attack"] for rec in report.samples if rec["defense"] == "patchzero"}
    assert keys == {"clean", "pgd-0.1-do", "pgd-0.1-bpda", "pgd-0.1-bpda-t1", "pgd-0.1-bpda-identity",
                    "pgd-0.1-bpda-iters100", "pgd-0.1-bpda-transfer", "pgd-0.1-bpda-uncompleted",
                    "pgd-0.1-bpda-mean-fused", "pgd-0.1-bpda-mean-fused+iters100"}  # fmt: skip
    bpda = [k for k in keys if "bpda" in k]
    worst = report.worst_accuracy("patchzero", bpda)
    assert worst <= min(report.accuracy("patchzero", k) for k in bpda)
    header, rows = variant_rows(report)
    assert [row[0] for row in rows] == ["BPDA (temperature 4)", *variants, "worst case (per video)",
                                        "worst case without iters100 (2 iterations)"]  # fmt: skip
    assert rows[-2][1] == f"{100 * worst:.1f}"
    short = report.worst_accuracy("patchzero", [k for k in bpda if "iters100" not in k])
    assert rows[-1][1] == f"{100 * short:.1f}" and short >= worst
    assert table4_rows(report)[1][-1][-1].startswith(f"{100 * worst:.1f} ")  # the BPDA row is the worst case
    assert "Adaptive attacks on PatchZero" in report_markdown(report)
    for bad in (["bogus"], ["mean-fused+bogus"], ["identity+mean-fused"]):
        r.evaluate.bpda_variants = bad
        with pytest.raises(ConfigError, match="bpda_variants"):
            evaluate(r, model=_model(), patchzero=_patchzero(), dataset=CountingClips([0]))


def test_grown_variant_widens_the_soft_mask_of_a_growing_completion_only() -> None:
    """"grown" dilates BPDA's soft mask by half the square's side (a stand-in for the square completion,
    so the gradient reaches every detection near the patch) or by the side less one for its cover,
    leaves a box-completing defense as it is, and gives the setting back; "spread" dilates it by the
    side less one whatever the completion."""
    from streamguard.evaluation.adaptive import variant
    from streamguard.recipes import AttackSection

    logits = torch.full((1, 1, 1, 20, 20), -10.0)
    logits[..., 10, 10] = 10.0  # one sure pixel
    defense = _patchzero()
    defense.dilate, defense.complete, defense.patch_area = 0, "square", 0.09  # side sqrt(0.09 * 400) = 6
    plain = (defense._soft_mask(logits) > 0.5).sum().item()
    with variant("grown", defense, AttackSection(), None) as (through, _):
        assert through is defense and (defense._soft_mask(logits) > 0.5).sum().item() == 7 * 7  # reach 3
    assert plain == 1 and defense.soft_reach == "rim"
    with variant("spread", defense, AttackSection(), None):
        assert (defense._soft_mask(logits) > 0.5).sum().item() == 11 * 11  # reach 5 on the square too
    defense.complete = "cover"  # a detected pixel's cover reaches the side less one: 11 x 11
    with variant("grown", defense, AttackSection(), None):
        assert (defense._soft_mask(logits) > 0.5).sum().item() == 11 * 11
    defense.complete = "box"
    with variant("grown", defense, AttackSection(), None):
        assert (defense._soft_mask(logits) > 0.5).sum().item() == 1
    with variant("spread", defense, AttackSection(), None):
        assert (defense._soft_mask(logits) > 0.5).sum().item() == 11 * 11
    assert defense.soft_reach == "rim"


def test_combined_variants_apply_every_part_and_give_the_settings_back() -> None:
    from streamguard.evaluation.adaptive import IdentityBackward, variant
    from streamguard.recipes import AttackSection

    defense, section = _patchzero(), AttackSection(iters=4)
    defense.temporal, defense.temperature = "median", 4.0
    with variant("mean-fused+iters100", defense, section, None) as (through, attack):
        assert through is defense and defense.temporal == "mean" and attack.iters == 20
    with variant("t1+identity", defense, section, None) as (through, attack):
        assert isinstance(through, IdentityBackward) and defense.temperature == 1.0 and attack.iters == 4
    assert (defense.temporal, defense.temperature, section.iters) == ("median", 4.0, 4)


def test_cli_evaluate_on_synthmotion(tmp_path: Path) -> None:
    """End to end: a recipe over a SynthMotion root that does not exist yet, saved tiny networks."""
    from typer.testing import CliRunner

    from streamguard.cli import app
    from streamguard.detector import PSPNet
    from streamguard.models import build_model, save_model
    from streamguard.patchzero import save_defense

    model = build_model("tiny3d", 12, widths=(4, 4, 4, 4), clip_len=4, size=32)
    save_model(model, tmp_path / "model.pt")
    save_defense(PatchZero(PSPNet("mobilenet_v3", aux=False, width=0.125), model.spec.mean), tmp_path / "pz.pt")
    (tmp_path / "recipe.toml").write_text(
        f"""
name = "tiny"
model = {{ name = "tiny3d", weights = "{tmp_path / 'model.pt'}" }}
defense = {{ weights = "{tmp_path / 'pz.pt'}" }}
data = {{ root = "{tmp_path / 'synth'}", videos_per_class = 2, size = 32, frames = 6, clip_len = 4 }}
attack = {{ methods = ["pgd"], modes = ["do"], areas = [0.1], iters = 1, batch = 2 }}
evaluate = {{ defenses = ["none", "gt", "patchzero"], output = "{tmp_path / 'unused'}" }}
"""
    )
    args = ["evaluate", str(tmp_path / "recipe.toml"), "--max-videos", "2", "--output", str(tmp_path / "out")]
    result = CliRunner().invoke(app, [*args, "--markdown", str(tmp_path / "tables.md")])
    assert result.exit_code == 0, result.output
    assert "Table 4" in result.output and "PatchZero (DO)" in result.output and "Table 5a" in result.output
    report = Report.load(tmp_path / "out" / "report.json")
    assert len(report.samples) == 2 * (3 + 3)
    assert all(r["name"].startswith("v_") for r in report.samples)  # SynthMotion video names
    assert "| Undefended |" in (tmp_path / "tables.md").read_text()
    other = tmp_path / "pz2.pt"
    save_defense(PatchZero(PSPNet("mobilenet_v3", aux=False, width=0.125), model.spec.mean, dilate=1), other)
    only = CliRunner().invoke(app, [*args[:-1], str(tmp_path / "only"), "--defenses", "patchzero", "--detector", str(other)])
    assert only.exit_code == 0, only.output
    subset = Report.load(tmp_path / "only" / "report.json")
    assert {r["defense"] for r in subset.samples} == {"patchzero"} and len(subset.samples) == 2 * 2
    assert subset.settings["recipe"]["defense"]["weights"] == str(other)
    bad = CliRunner().invoke(app, ["evaluate", str(tmp_path / "missing.toml")])
    assert bad.exit_code == 2 and "recipe not found" in bad.output
