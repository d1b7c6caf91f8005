"""The detector works at the model's scale: a patch it finds in a 64x64 clip is found at any frame size.

Clips are enlarged pixel by pixel (nearest), as a display or a print shows a digital patch; a
patch blurred by a bilinear enlargement is another texture, one of the patch families the
detector has to be trained on (issue #15), not a property of the working resolution.
"""

import dataclasses
import json

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from streamguard.attacks import MaskedAttack, patch_mask
from streamguard.data import render_video
from streamguard.detector import PSPNet
from streamguard.errors import ConfigError
from streamguard.io import open_source
from streamguard.metrics import PixelCounts
from streamguard.models import load_model
from streamguard.patchzero import PatchZero, build_defense, complete_mask, dilate_mask
from streamguard.pipeline import Pipeline
from streamguard.recipes import DefenseSection
from streamguard.resize import refresh_region, resize_frames, resize_uint8
from streamguard.sinks import VideoSink

SIZES = [(64, 64), (240, 320), (480, 640)]


@pytest.fixture(scope="module")
def clips() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two 16x64x64 SynthMotion clips, their DO masked-PGD versions (10% square) and the true masks."""
    model = load_model("synth-tiny3d")
    videos = [render_video(c, 100 + c, size=64, frames=16)[0] for c in (0, 6)]
    x = torch.from_numpy(np.stack(videos)).permute(0, 4, 1, 2, 3).float() / 255  # (2, 3, 16, 64, 64)
    mask = torch.from_numpy(np.stack([patch_mask((16, 64, 64), 0.10, seed) for seed in (1, 2)]))[:, None]
    attack = MaskedAttack(model, "pgd", "do", eps=1.0, step=0.2, iters=20, seed=0)
    x_adv = torch.from_numpy(attack.generate(x.numpy(), np.array([0, 6]), mask.numpy()))
    return x, x_adv, mask


def _upscale(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    n, c, t, h, w = x.shape
    frames = x.transpose(1, 2).reshape(n * t, c, h, w)
    kw = {"align_corners": False} if mode == "bilinear" else {}
    return F.interpolate(frames, size, mode=mode, **kw).reshape(n, t, c, *size).transpose(1, 2)


def test_shipped_detector_carries_its_working_size() -> None:
    assert build_defense().input_size == (64, 64)
    assert build_defense(DefenseSection(input_size=96)).input_size == (96, 96)
    assert build_defense(input_size=32).input_size == (32, 32)


def test_a_patch_found_at_64_is_found_at_every_frame_size(clips: tuple[torch.Tensor, ...]) -> None:
    x, x_adv, true = clips
    defense = build_defense(mean=(0.5, 0.5, 0.5))
    recalls, benign = {}, {}
    for size in SIZES:
        big, big_true = _upscale(x_adv, size, "nearest-exact"), _upscale(true, size, "nearest-exact")
        clean, mask = defense.sanitize(big)
        assert mask.shape == big_true.shape and clean.shape == big.shape
        recalls[size] = PixelCounts.from_masks(mask > 0.5, big_true > 0.5).recall
        benign[size] = defense.mask(_upscale(x, size, "bilinear").clamp(0, 1)).mean().item()
    assert recalls[(64, 64)] > 0.9, recalls
    for size in SIZES[1:]:
        assert abs(recalls[size] - recalls[(64, 64)]) < 0.03, recalls
    assert max(benign.values()) < 1e-3, benign


def test_native_resolution_is_what_the_working_size_fixes(clips: tuple[torch.Tensor, ...]) -> None:
    """The same weights at the frames' own size (the old behaviour) miss much of the upscaled patch. The
    detection is compared, without completion (a square of the largest patch would cover it either way)."""
    _, x_adv, true = clips
    working, native = (build_defense(mean=(0.5, 0.5, 0.5), complete="none") for _ in range(2))
    native.input_size = None
    big, big_true = _upscale(x_adv, (240, 320), "nearest-exact"), _upscale(true, (240, 320), "nearest-exact")
    recall = {d: PixelCounts.from_masks(d.mask(big) > 0.5, big_true > 0.5).recall for d in (working, native)}
    assert recall[native] < recall[working] - 0.2, recall


class _Spot(torch.nn.Module):
    """A 'detector' that marks exactly the pixels above 0.9 (logit +/-10)."""

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return (frames.mean(1, keepdim=True) > 0.9).float() * 20 - 10


def test_dilation_is_in_working_scale_pixels() -> None:
    """One bright working-scale pixel dilated by 1 covers 3x3 working pixels = 30x30 frame pixels at 10x."""
    x = torch.zeros(1, 3, 2, 16, 16)
    x[..., 8, 8] = 1.0
    big = _upscale(x, (160, 160), "nearest-exact")
    defense = PatchZero(_Spot(), (0.5, 0.5, 0.5), dilate=1, input_size=16)
    mask = defense.mask(big)
    assert mask.shape == (1, 1, 2, 160, 160)
    assert mask[0, 0, 0].sum().item() == 30 * 30
    ys, xs = torch.nonzero(mask[0, 0, 0], as_tuple=True)
    assert (ys.min().item(), ys.max().item(), xs.min().item(), xs.max().item()) == (70, 99, 70, 99)


def test_shape_completion_fills_each_region_to_its_hull_or_box() -> None:
    """An L of detected pixels (a square patch with its corner missed) and a separate dot: the hull
    fills the L's diagonal, the box the whole square; the dot stays itself; nothing else is marked."""
    m = torch.zeros(2, 1, 1, 16, 16)
    m[0, 0, 0, 2:10, 2:4] = 1  # the L: left column and bottom row of the square 2..9
    m[0, 0, 0, 8:10, 2:10] = 1
    m[0, 0, 0, 13, 13] = 1
    assert torch.equal(complete_mask(m, "none"), m)
    box = complete_mask(m, "box")[0, 0, 0]
    assert box[2:10, 2:10].all() and box.sum().item() == 64 + 1 and box[13, 13] == 1
    hull = complete_mask(m, "hull")[0, 0, 0]
    assert torch.all(hull >= m[0, 0, 0]) and hull[13, 13] == 1 and hull[5, 5] == 1  # inside the L's hull
    assert hull[2, 9] == 0 and 24 + 8 < hull[:12, :12].sum().item() < 64  # the missed corner is outside it
    assert complete_mask(m, "box")[1].sum() == 0  # an empty mask stays empty


def test_completion_is_in_every_mask_path_and_in_the_weights_meta(tmp_path) -> None:
    """The box completes the float path, the uint8 frame path and the BPDA forward alike (its
    backward is the soft mask's), and it travels in the checkpoint's meta."""
    from streamguard.patchzero import load_defense, save_defense

    x = torch.zeros(1, 3, 2, 16, 16)
    x[..., 4:12, 4:6] = 1.0  # only two sides of the 8x8 square are bright
    x[..., 10:12, 4:12] = 1.0
    defense = PatchZero(_Spot(), (0.5, 0.5, 0.5), dilate=0, complete="box")
    mask = defense.mask(x)[0, 0, 0]
    assert mask[4:12, 4:12].all() and mask.sum().item() == 64
    frames = x.mul(255).to(torch.uint8).permute(0, 2, 3, 4, 1).numpy()
    assert np.array_equal(defense.sanitize_frames(frames).mask[0][0], mask.numpy().astype(bool))
    with defense.bpda_mode():
        assert torch.equal(defense(x), defense.sanitize(x)[0])
    with pytest.raises(ConfigError, match="complete"):
        PatchZero(_Spot(), (0.5, 0.5, 0.5), complete="circle")  # type: ignore[arg-type]
    detector = PSPNet("mobilenet_v3", aux=False, width=0.125)
    save_defense(PatchZero(detector, (0.5, 0.5, 0.5), complete="hull"), tmp_path / "pz.pt")
    assert load_defense(tmp_path / "pz.pt").complete == "hull"
    assert load_defense(tmp_path / "pz.pt", complete="none").complete == "none"
    assert build_defense(DefenseSection(complete="box"), weights=tmp_path / "pz.pt", mean=(0.5,) * 3).complete == "box"
    assert build_defense(DefenseSection(), weights=tmp_path / "pz.pt", mean=(0.5,) * 3).complete == "hull"


def test_square_completion_grows_an_eroded_patch_to_the_threat_models_size() -> None:
    """A 10x10 patch of which the attacker left only the left 4 columns above the threshold: "box"
    masks those 4 columns, "square" (side 10) the whole patch, placed where the probabilities that
    stayed below the threshold still sum highest. A 3-pixel speck keeps its box, a band wider than the
    side is grown in its other direction only, a tie goes to the middle of the places, and the square
    stays in the frame."""
    prob = torch.full((1, 1, 1, 32, 32), 0.01)
    prob[..., 8:18, 8:18] = 0.3  # the eroded patch: below the threshold ...
    prob[..., 8:18, 8:12] = 0.9  # ... but for its left 4 columns
    prob[..., 28, 28:31] = 0.9  # a benign speck of 3 pixels
    prob[..., 0:2, 19:31] = 0.9  # a band 12 wide, wider than the side
    mask = (prob > 0.5).float()
    assert complete_mask(mask, "box", prob, 10)[..., 8:18, 8:18].sum().item() == 40
    square = complete_mask(mask, "square", prob, 10)[0, 0, 0]
    assert square[8:18, 8:18].all() and square[28, 28:31].all() and square[0:10, 19:31].all()
    assert square.sum().item() == 100 + 3 + 10 * 12  # the patch, the speck, the band grown down: nothing more
    lone = torch.zeros(1, 1, 1, 32, 32)
    lone[..., 20:22, 20:22] = 1  # 4 core pixels on a flat map: every 6x6 place containing them ties
    grown = complete_mask(lone, "square", lone * 0.8 + 0.1, 6)[0, 0, 0]
    ys, xs = torch.nonzero(grown, as_tuple=True)
    assert (ys.min().item(), ys.max().item(), xs.min().item(), xs.max().item()) == (18, 23, 18, 23)
    corner = torch.zeros(1, 1, 1, 32, 32)
    corner[..., 30:32, 30:32] = 1
    grown = complete_mask(corner, "square", corner * 0.8 + 0.1, 6)[0, 0, 0]
    assert grown[26:32, 26:32].all() and grown.sum().item() == 36
    with pytest.raises(ConfigError, match="probabilities"):
        complete_mask(mask, "square")


def test_cover_completion_masks_every_place_the_patch_can_reach() -> None:
    """"cover" grows a region to the union of every side x side square that contains it: the left 4
    columns of a 10x10 patch reach 6 columns either way whatever the scene's probabilities (here high
    on the wrong side, which pulls "square" there), so the patch is masked; a region found in full is
    not grown, a speck keeps its box, and the cover stays in the frame."""
    prob = torch.full((1, 1, 1, 32, 32), 0.01)
    prob[..., 8:18, 8:12] = 0.9  # what the attacker left of the patch at 8:18, 8:18
    prob[..., 8:18, 2:8] = 0.4  # the scene to its left, below the threshold but above the patch's rest
    prob[..., 2, 26:29] = 0.9  # a benign speck of 3 pixels
    prob[..., 22:32, 22:26] = 0.9  # a band 4 wide in the corner, 10 high
    mask = (prob > 0.5).float()
    square = complete_mask(mask, "square", prob, 10)[0, 0, 0]
    assert not square[8:18, 12:18].any()  # the square went left, after the scene's mass
    cover = complete_mask(mask, "cover", prob, 10)[0, 0, 0]
    assert cover[8:18, 2:18].all() and cover[8:18, 18:].sum() == 0 and cover[2, 26:29].all()
    assert cover[22:32, 16:32].all()  # the band's cover, cut at the frame's edge: columns 16..31
    assert cover.sum().item() == 10 * 16 + 10 * 16 + 3  # the patch's cover, the band's, the speck alone
    full = torch.zeros(1, 1, 1, 32, 32)
    full[..., 8:18, 8:18] = 1
    assert torch.equal(complete_mask(full, "cover", full * 0.8 + 0.1, 10), full)
    with pytest.raises(ConfigError, match="cover completion needs"):
        complete_mask(mask, "cover")


def test_cover_sized_by_the_region_greys_less_around_a_small_region(tmp_path) -> None:
    """With ``scale`` the cover's squares are at most ``scale`` times the region's longer side (and at
    most ``side``): a 4x4 region under scale 1.5 reaches 2 pixels each way (8x8), a 10x6 one the whole
    side's reach (10 each way less its size), and scale 0 is the plain cover. PatchZero's
    ``cover_scale`` does the same, travels in the weights' meta and is a recipe setting."""
    from streamguard.patchzero import load_defense, save_defense

    mask = torch.zeros(1, 1, 1, 40, 40)
    mask[..., 4:8, 4:8] = 1  # a small region
    mask[..., 20:30, 24:30] = 1  # a larger one, 10 high and 6 wide
    prob = mask * 0.8 + 0.1
    cover = complete_mask(mask, "cover", prob, 10, scale=1.5)[0, 0, 0]
    assert cover[2:10, 2:10].all() and cover[:20].sum() == 64
    assert cover[20:30, 20:34].all() and cover[20:].sum() == 10 * 14
    assert torch.equal(complete_mask(mask, "cover", prob, 10, scale=0.0), complete_mask(mask, "cover", prob, 10))
    x = torch.zeros(1, 3, 2, 20, 20)
    x[..., 6:8, 6:8] = 1.0  # a 2x2 detection: a 4-pixel core
    sized = PatchZero(_Spot(), (0.5, 0.5, 0.5), dilate=0, complete="cover", patch_area=0.09, cover_scale=1.5)
    assert sized.mask(x)[0, 0, 0].sum().item() == 4 * 4  # squares of 3 (not 6): 1 pixel each way
    assert PatchZero(_Spot(), (0.5, 0.5, 0.5), dilate=0, complete="cover", patch_area=0.09).mask(x).sum() == 2 * 10 * 10
    with pytest.raises(ConfigError, match="cover_scale"):
        PatchZero(_Spot(), (0.5, 0.5, 0.5), cover_scale=-1.0)
    detector = PSPNet("mobilenet_v3", aux=False, width=0.125)
    save_defense(PatchZero(detector, (0.5, 0.5, 0.5), complete="cover", cover_scale=2.0), tmp_path / "pz.pt")
    assert load_defense(tmp_path / "pz.pt").cover_scale == 2.0
    section = DefenseSection(complete="cover", cover_scale=1.25)
    assert build_defense(section, weights=tmp_path / "pz.pt", mean=(0.5,) * 3).cover_scale == 1.25


def test_specks_below_min_core_are_dropped_before_completion(tmp_path) -> None:
    """``min_core`` drops a region of the dilated mask holding fewer pixels over the threshold than it
    asks (a 3-pixel speck and its rim), keeps one with as many (a 2x2 core grown to its square), and
    counts cores per region, not per frame; it is off at 0, travels in the weights' meta and is a recipe setting."""
    from streamguard.patchzero import drop_specks, load_defense, save_defense

    prob = torch.full((1, 1, 1, 32, 32), 0.1)
    prob[..., 4, 4:7] = 0.9  # a speck of 3 core pixels
    prob[..., 20:22, 20:22] = 0.9  # 4 core pixels
    prob[..., 4, 28] = prob[..., 4, 30] = 0.9  # 2 pixels a dilation apart: one region of 2 cores
    mask = dilate_mask((prob > 0.5).float(), 1)
    kept = drop_specks(mask, prob, 0.5, 4)[0, 0, 0]
    assert kept[19:23, 19:23].all() and kept.sum().item() == 16
    assert torch.equal(drop_specks(mask, prob, 0.5, 0), mask) and torch.equal(drop_specks(mask, prob, 0.5, 3)[..., :10, :10], mask[..., :10, :10])
    x = torch.zeros(1, 3, 2, 32, 32)
    x[..., 4, 4:7] = 1.0
    x[..., 20:22, 20:22] = 1.0
    defense = PatchZero(_Spot(), (0.5, 0.5, 0.5), dilate=1, complete="square", patch_area=0.09, min_core=4)
    m = defense.mask(x)[0, 0, 0]
    assert m[:10, :10].sum() == 0 and m[20:22, 20:22].all() and m.sum().item() == 12 * 12  # the square: round(sqrt(.09) * 32) + 2 rim
    assert PatchZero(_Spot(), (0.5, 0.5, 0.5), dilate=1, complete="square", patch_area=0.09).mask(x)[0, 0, 0, 3:6, 3:8].all()
    with pytest.raises(ConfigError, match="min_core"):
        PatchZero(_Spot(), (0.5, 0.5, 0.5), min_core=-1)
    detector = PSPNet("mobilenet_v3", aux=False, width=0.125)
    save_defense(PatchZero(detector, (0.5, 0.5, 0.5), min_core=4), tmp_path / "pz.pt")
    assert load_defense(tmp_path / "pz.pt").min_core == 4
    assert build_defense(DefenseSection(min_core=2), weights=tmp_path / "pz.pt", mean=(0.5,) * 3).min_core == 2


def test_cover_for_the_smallest_patch_that_holds_the_region(tmp_path) -> None:
    """With ``smaller`` sides a region is covered for the smallest patch whose side holds its longer
    side: a 6x6 region found in full under a 7-pixel small patch grows 1 pixel each way (8x8), where
    the 12-pixel patch's cover is 18x18; a region 9 long is too long for it and gets the 12-pixel
    cover. PatchZero's ``patch_areas`` does the same, travels in the weights' meta and is a recipe
    setting; an area above ``patch_area`` is refused."""
    from streamguard.patchzero import load_defense, save_defense

    mask = torch.zeros(1, 1, 1, 48, 48)
    mask[..., 10:16, 10:16] = 1  # a small patch found in full
    mask[..., 30:39, 30:34] = 1  # a region 9 high: more than the small patch holds
    prob = mask * 0.8 + 0.1
    cover = complete_mask(mask, "cover", prob, 12, smaller=[7])[0, 0, 0]
    assert cover[9:17, 9:17].all() and cover[:24].sum() == 8 * 8
    assert cover[27:42, 22:42].all() and cover[24:].sum() == 15 * 20  # grown by 12 - 9 and 12 - 4 each way
    plain = complete_mask(mask, "cover", prob, 12)[0, 0, 0]
    assert plain[:24].sum() == 18 * 18 and torch.equal(plain[24:], cover[24:])
    x = torch.zeros(1, 3, 2, 20, 20)
    x[..., 6:8, 6:8] = 1.0  # a 2x2 detection: a 4-pixel core
    sized = PatchZero(_Spot(), (0.5, 0.5, 0.5), dilate=0, complete="cover", patch_area=0.09, patch_areas=[0.01])
    assert sized.mask(x)[0, 0, 0].sum().item() == 2 * 2  # the 2-pixel patch holds it: not grown
    with pytest.raises(ConfigError, match="patch_areas"):
        PatchZero(_Spot(), (0.5, 0.5, 0.5), complete="cover", patch_area=0.1, patch_areas=[0.2])
    detector = PSPNet("mobilenet_v3", aux=False, width=0.125)
    save_defense(PatchZero(detector, (0.5, 0.5, 0.5), complete="cover", patch_areas=[0.05]), tmp_path / "pz.pt")
    assert load_defense(tmp_path / "pz.pt").patch_areas == (0.05,)
    section = DefenseSection(complete="cover", patch_area=0.12, patch_areas=[0.06])
    assert build_defense(section, weights=tmp_path / "pz.pt", mean=(0.5,) * 3).patch_areas == (0.06,)


def test_square_completion_in_the_defense_follows_patch_area(tmp_path) -> None:
    """PatchZero's square is the side of ``patch_area`` of the working frame plus the rim on each side,
    in the float and the uint8 path alike; ``patch_area`` travels in the weights' meta."""
    from streamguard.patchzero import load_defense, save_defense

    x = torch.zeros(1, 3, 2, 20, 20)
    x[..., 6:8, 6:8] = 1.0  # a 2x2 detection
    defense = PatchZero(_Spot(), (0.5, 0.5, 0.5), dilate=1, complete="square", patch_area=0.09)
    mask = defense.mask(x)[0, 0, 0]
    assert mask.sum().item() == (6 + 2) ** 2 and mask[5:9, 5:9].all()  # sqrt(0.09 * 400) = 6, plus 1 each side
    frames = x.mul(255).to(torch.uint8).permute(0, 2, 3, 4, 1).numpy()
    assert np.array_equal(defense.sanitize_frames(frames).mask[0][0], mask.numpy().astype(bool))
    with pytest.raises(ConfigError, match="patch_area"):
        PatchZero(_Spot(), (0.5, 0.5, 0.5), patch_area=0.0)
    detector = PSPNet("mobilenet_v3", aux=False, width=0.125)
    save_defense(PatchZero(detector, (0.5, 0.5, 0.5), complete="square", patch_area=0.05), tmp_path / "pz.pt")
    assert (load_defense(tmp_path / "pz.pt").complete, load_defense(tmp_path / "pz.pt").patch_area) == ("square", 0.05)
    section = DefenseSection(complete="square", patch_area=0.2)
    assert build_defense(section, weights=tmp_path / "pz.pt", mean=(0.5,) * 3).patch_area == 0.2


def test_bpda_gradient_reaches_full_resolution_pixels() -> None:
    detector = torch.nn.Conv2d(3, 1, 3, padding=1)
    defense = PatchZero(detector, (0.5, 0.5, 0.5), dilate=1, input_size=16, bpda=True)
    x = torch.rand(1, 3, 2, 64, 64, requires_grad=True)
    defense(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    with defense.bpda_mode(False):
        y = defense(x)
    assert torch.equal(y, defense.sanitize(x.detach())[0])


@pytest.mark.parametrize("size", [(64, 64), (240, 320)])
def test_uint8_frame_path_matches_the_float_path(clips: tuple[torch.Tensor, ...], size: tuple[int, int]) -> None:
    """The pipeline's uint8 path (sanitize_frames) is sanitize() up to the uint8 rounding of the shrunk frames."""
    _, x_adv, _ = clips
    big = _upscale(x_adv, size, "nearest-exact")
    u8 = big.mul(255).round().to(torch.uint8)
    defense = build_defense(mean=(0.5, 0.5, 0.5))
    clean_f, mask_f = defense.sanitize(u8.float() / 255)
    frames = u8.permute(0, 2, 3, 4, 1).numpy()
    out = defense.sanitize_frames(frames)
    clean_u, mask_u = np.array(out.clean), np.array(out.mask)
    assert mask_u.shape == (2, 16, *size) and clean_u.dtype == np.uint8
    shrunk = np.array([[resize_uint8(f, (64, 64)) for f in clip] for clip in clean_u])
    assert out.small.shape == (2, 16, 64, 64, 3) and np.abs(out.small.astype(int) - shrunk).max() <= 1  # the clean frames, shrunk
    assert not np.array_equal(out.small, np.array([[resize_uint8(f, (64, 64)) for f in clip] for clip in frames]))
    agree = (torch.from_numpy(mask_u) == (mask_f[:, 0] > 0.5)).float().mean().item()
    assert agree > 0.999 and mask_u.mean() > 0.05
    same = torch.from_numpy(mask_u) == (mask_f[:, 0] > 0.5)
    float_u8 = clean_f.mul(255).round().to(torch.uint8).permute(0, 2, 3, 4, 1)
    assert torch.equal(float_u8[same], torch.from_numpy(clean_u)[same])


def test_the_pipeline_finds_the_patch_at_native_size_and_its_summary_is_json(tmp_path, clips) -> None:
    """The live/file path end to end on a 240x320 video of an attacked clip: the shipped defense masks
    the patch, the classifier (reading the defense's shrunk frames) predicts what it predicts on the
    float path's sanitized clip, and the summary serializes."""
    _, x_adv, _ = clips
    big = _upscale(x_adv[:1], (240, 320), "nearest-exact")[0]  # (3, 16, 240, 320)
    frames = big.permute(1, 2, 3, 0).mul(255).round().to(torch.uint8).numpy()
    with VideoSink(tmp_path / "in.mp4", 320, 240, 25, crf=0) as sink:
        for f in frames:
            sink.write(f)
    model, defense = load_model("synth-tiny3d"), build_defense(mean=(0.5, 0.5, 0.5))
    with open_source(tmp_path / "in.mp4") as src:
        summary = Pipeline(src, defense, model, clip_len=16, batch=1, predictions=tmp_path / "p.jsonl").run()
    assert summary.frames == 16 and summary.frames_with_patches == 16 and summary.clips == 1
    assert 0.05 < summary.mean_masked_area < 0.3
    assert json.loads(json.dumps(dataclasses.asdict(summary)))["frames_with_patches"] == 16
    with open_source(tmp_path / "in.mp4") as src:  # the float path on the same decoded frames
        decoded = torch.from_numpy(np.stack([f.image for f in src])).permute(3, 0, 1, 2)[None].float() / 255
    clean, _ = defense.fork().sanitize(decoded)
    small = resize_frames(clean[0].transpose(0, 1), (64, 64)).transpose(0, 1)[None]
    with torch.no_grad():
        expected = model(small).softmax(1)[0]
    top = json.loads((tmp_path / "p.jsonl").read_text().splitlines()[0])["topk"][0]
    assert top["label"] == int(expected.argmax()) and abs(top["score"] - float(expected.max())) < 0.02


@pytest.mark.parametrize("frame_size,size", [((240, 320), (64, 64)), ((720, 1280), (64, 64)), ((480, 640), (112, 149)), ((60, 80), (64, 64))])
def test_resize_uint8_is_area_averaging_and_a_refreshed_box_is_a_fresh_resize(frame_size, size) -> None:
    rng = np.random.default_rng(0)
    frame = cv2.GaussianBlur(rng.integers(0, 256, (*frame_size, 3), dtype=np.uint8), (0, 0), 2)
    small = resize_uint8(frame, size)
    if size[0] <= frame_size[0]:  # rows first then columns: OpenCV's one 2-D pass up to rounding
        assert np.abs(small.astype(int) - cv2.resize(frame, size[::-1], interpolation=cv2.INTER_AREA)).max() <= 1
    for top, left, h, w in [(0, 0, 7, 9), (frame_size[0] // 3, frame_size[1] // 2, 21, 13), (frame_size[0] - 5, frame_size[1] - 11, 5, 11)]:
        changed = frame.copy()
        box = (slice(top, top + h), slice(left, left + w))
        changed[box] = 128
        refreshed = small.copy()
        refresh_region(changed, refreshed, *box)
        assert np.abs(refreshed.astype(int) - resize_uint8(changed, size)).max() <= 1
        assert not np.array_equal(refreshed, small)
