from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from streamguard.checkpoints import load_checkpoint
from streamguard.data import UCF101Clips, make_synthmotion
from streamguard.errors import CheckpointError, ConfigError
from streamguard.metrics import pixel_scores, top1
from streamguard.models import build_model, load_model, save_model
from streamguard.recipes import Recipe, parse_recipe
from streamguard.training import (
    augment_clips,
    build_attack_cache,
    mirror_clips,
    step_indices,
    train_classifier,
    train_detector_stage1,
    train_detector_stage2,
)

TINY3D = {"widths": (4, 4, 8, 8), "clip_len": 8, "size": 32}
TINY_PSP = {"width": 0.1}


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 classes x 2 videos (12 train, 12 test), 12 frames of 32x32."""
    return make_synthmotion(tmp_path_factory.mktemp("synth"), videos_per_class=2, seed=0, size=32, frames=12)


@pytest.fixture(scope="module")
def victim(synth: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("victim") / "tiny3d.pt"
    save_model(build_model("tiny3d", 12, **TINY3D), path)
    return path


def recipe(tmp: Path, synth: Path, victim: Path | None = None, **train: Any) -> Recipe:
    table: dict[str, Any] = {
        "model": {"name": "tiny3d", "num_classes": 12},
        "data": {"root": str(synth), "size": 32, "clip_len": 8, "frames": 12, "videos_per_class": 2},
        "attack": {"iters": 2, "batch": 4},
        "train": {"output": str(tmp / "run"), "cache": str(tmp / "cache"), "batch": 4, "lr": 1e-3, "steps": 2, **train},
    }
    t = table["train"]
    t["classifier"] = {"steps": t["steps"], "batch": t["batch"], "lr": t["lr"], "shift": 2}
    if victim is not None:
        table["model"]["weights"] = str(victim)
    return parse_recipe(table)


def state(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)[0]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ---------------------------------------------------------------- pure helpers


def test_step_indices_are_epoch_permutations_of_seed_and_step() -> None:
    batches = [step_indices(10, 4, seed=3, step=s) for s in range(5)]
    flat = np.concatenate(batches)
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
    assert np.array_equal(step_indices(10, 4, seed=3, step=4), batches[4])  # no hidden state
    assert not np.array_equal(step_indices(10, 4, seed=4, step=0), batches[0])


def test_augment_keeps_motion_direction() -> None:
    clip = torch.zeros(2, 3, 12, 8, 16)
    for t in range(12):  # a bright bar moving right
        clip[:, :, t, :, t + 2] = 0.9
    out = augment_clips(clip, 8, torch.Generator().manual_seed(0))
    assert out.shape == (2, 3, 8, 8, 16) and 0 <= out.min() and out.max() <= 1
    column = out.mean(dim=(1, 3)).argmax(-1)  # (2, 8): the bar's x per frame
    assert (column.diff(dim=1) == 1).all()


def test_mirror_clips_swaps_the_labels_of_what_it_mirrors() -> None:
    clip = torch.zeros(64, 3, 8, 8, 16)
    for t in range(8):  # a bright bar moving right, in frame t at x = t + 2
        clip[:, :, t, :, t + 2] = 0.9
    moving_right, moving_left = 1, 0
    y = torch.full((64,), moving_right)
    perm = [1, 0, 2]  # labels 0 <-> 1, like MoveLeft <-> MoveRight
    out, labels = mirror_clips(clip, y, {"hflip": perm, "reverse": perm}, torch.Generator().manual_seed(0))
    steps = out.mean(dim=(1, 3)).argmax(-1).diff(dim=1)  # (64, 7): the bar's x step per frame
    assert ((steps == 1).all(1) == (labels == moving_right)).all()
    assert ((steps == -1).all(1) == (labels == moving_left)).all()
    assert 16 < int((labels == moving_left).sum()) < 48  # one symmetry, not both: about half
    assert not torch.equal(out, clip) and torch.equal(y, torch.full((64,), moving_right))  # inputs kept


def test_pixel_scores() -> None:
    target = torch.zeros(1, 1, 4, 4)
    target[..., :2, :2] = 1
    logits = torch.full((1, 1, 4, 4), -5.0)
    logits[..., :2, :1] = 5
    logits[..., 3, 3] = 5
    s = pixel_scores(logits, target)
    assert s["precision"] == pytest.approx(2 / 3) and s["recall"] == pytest.approx(0.5)
    assert s["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 2))


# ---------------------------------------------------------------- classifier


def test_classifier_resume_is_bit_identical(tmp_path: Path, synth: Path) -> None:
    tiny = {"widths": TINY3D["widths"]}
    full = recipe(tmp_path / "a", synth, steps=4, checkpoint_every=10, eval_every=10)
    train_classifier(full, model_kwargs=tiny)
    killed = recipe(tmp_path / "b", synth, steps=2, checkpoint_every=1, eval_every=10)
    train_classifier(killed, model_kwargs=tiny)
    resumed = recipe(tmp_path / "b", synth, steps=4, checkpoint_every=1, eval_every=10)
    seen: list[int] = []
    result = train_classifier(resumed, model_kwargs=tiny, resume=True, on_progress=lambda s, n, m: seen.append(s))
    assert seen == [3, 4] and result.steps == 4
    assert_same_weights(state(tmp_path / "a/run/classifier.pt"), state(result.path))
    assert load_model(result.path).spec.clip_len == 8


def test_resume_needs_a_matching_checkpoint(tmp_path: Path, synth: Path) -> None:
    with pytest.raises(CheckpointError, match="nothing to resume"):
        train_classifier(recipe(tmp_path, synth), model_kwargs={"widths": TINY3D["widths"]}, resume=True)
    train_classifier(recipe(tmp_path, synth, steps=1), model_kwargs={"widths": TINY3D["widths"]})
    with pytest.raises(ConfigError, match="batch"):
        train_classifier(recipe(tmp_path, synth, batch=2), model_kwargs={"widths": TINY3D["widths"]}, resume=True)


@pytest.mark.slow
def test_classifier_trains_on_mirrored_clips_with_swapped_labels(
    tmp_path: Path, synth: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import streamguard.training.downstream as training
    from streamguard.data import SYNTH_CLASSES, symmetry_labels

    calls: list[dict[str, list[int]]] = []
    mirror = training.mirror_clips

    def spy(x: torch.Tensor, y: torch.Tensor, labels: dict[str, list[int]], gen: torch.Generator) -> Any:
        calls.append(labels)
        return mirror(x, y, labels, gen)

    monkeypatch.setattr(training, "mirror_clips", spy)
    tiny = {"widths": TINY3D["widths"]}
    r = recipe(tmp_path / "mirrored", synth, steps=2, eval_every=10)
    r.train.classifier.symmetries = ["hflip", "reverse"]
    mirrored = train_classifier(r, model_kwargs=tiny)
    expected = {name: symmetry_labels("synthmotion", name, SYNTH_CLASSES) for name in ("hflip", "reverse")}
    assert calls == [expected, expected]  # every step
    plain = train_classifier(recipe(tmp_path / "plain", synth, steps=2, eval_every=10), model_kwargs=tiny)
    assert len(calls) == 2  # no symmetries, no mirroring
    a, b = state(mirrored.path), state(plain.path)
    assert any(not torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point())


def test_classifier_vortex_setting_builds_tiny3d_with_vortex_features(tmp_path: Path, synth: Path) -> None:
    r = recipe(tmp_path, synth, steps=1, eval_every=10)
    r.train.classifier.vortex = [2.0, 3.0]
    result = train_classifier(r, model_kwargs={"widths": TINY3D["widths"]})
    assert load_checkpoint(result.path)[1]["kwargs"]["vortex"] == [2.0, 3.0]
    assert load_model(result.path).net.vortex.kernels.shape[0] == 2


def test_classifier_learns_above_chance(tmp_path: Path, synth: Path) -> None:
    r = recipe(tmp_path, synth, steps=60, batch=6, lr=3e-3, checkpoint_every=100, eval_every=100)
    result = train_classifier(r, model_kwargs={"widths": (8, 8, 16, 16)})
    train_clips = UCF101Clips(synth, "train", clip_len=8, size=32)
    accuracy = top1(load_model(result.path), train_clips, 12, torch.device("cpu"))
    assert accuracy >= 0.5  # chance is 1/12
    assert result.metrics["loss"] < 2.0 and "top1" in result.metrics


# ---------------------------------------------------------------- detector


def test_attack_cache_resumes_without_corrupt_entries(tmp_path: Path, synth: Path, victim: Path) -> None:
    r = recipe(tmp_path, synth, victim, area_range=[0.05, 0.1])
    cache = build_attack_cache(r)
    entries = sorted(cache.glob("[0-9]*.pt"))
    assert len(entries) == 12
    first = torch.load(entries[0], weights_only=True)
    assert first["clip"].dtype == torch.uint8 and first["clip"].shape == (3, 8, 32, 32)
    assert {torch.load(e, weights_only=True)["method"] for e in entries} == {"pgd", "apgd"}
    # a killed run: two entries never written, one half-written temp file left behind
    entries[3].unlink()
    entries[7].unlink()
    stray = cache / f".{entries[3].name}.999.tmp"
    stray.write_bytes(b"\x80half a pickle")
    untouched = entries[0].stat().st_mtime_ns
    done: list[int] = []
    build_attack_cache(r, on_progress=lambda s, n, m: done.append(s))
    assert done == [12] and not stray.exists() and entries[0].stat().st_mtime_ns == untouched
    for path in sorted(cache.glob("[0-9]*.pt")):
        entry = torch.load(path, weights_only=True)
        area = entry["mask"].float()[0, 0].mean().item()
        assert 0.03 <= area <= 0.12 and (entry["mask"] == entry["mask"][:, :1]).all()  # fixed location
    with pytest.raises(ConfigError, match="other settings"):
        build_attack_cache(recipe(tmp_path, synth, victim, area_range=[0.2, 0.3]))


def test_attack_cache_refuses_a_retrained_model_at_the_same_path(tmp_path: Path, synth: Path) -> None:
    model = tmp_path / "classifier.pt"
    torch.manual_seed(0)
    save_model(build_model("tiny3d", 12, **TINY3D), model)
    r = recipe(tmp_path, synth, model, area_range=[0.05, 0.1], cache_videos=2)
    build_attack_cache(r)
    torch.manual_seed(1)
    save_model(build_model("tiny3d", 12, **TINY3D), model)  # retrained: same path, other weights
    with pytest.raises(ConfigError, match=r"other settings \(model\)"):
        build_attack_cache(r)


@pytest.fixture(scope="module")
def stage1(tmp_path_factory: pytest.TempPathFactory, synth: Path, victim: Path) -> Path:
    tmp = tmp_path_factory.mktemp("stage1")
    r = recipe(tmp, synth, victim, steps=2)
    build_attack_cache(r)
    return train_detector_stage1(r, detector_kwargs=TINY_PSP).path


def test_stage1_trains_a_loadable_defense(tmp_path: Path, synth: Path, victim: Path, stage1: Path) -> None:
    from streamguard.patchzero import load_defense

    trained = load_defense(stage1)
    assert trained.mean.tolist() == pytest.approx(list(load_model(victim).spec.mean))
    _, meta = load_checkpoint(stage1)
    assert meta["stage"] == 1 and meta["steps"] == 2 and set(meta["metrics"]) >= {"loss", "f1"}
    cache = str(stage1.parent.parent / "cache")
    untrained = train_detector_stage1(recipe(tmp_path, synth, victim, steps=0, cache=cache), detector_kwargs=TINY_PSP)
    before, after = state(untrained.path), state(stage1)
    assert [k for k in before if k.endswith("weight") and not torch.equal(before[k], after[k])]


def test_stage1_resume_is_bit_identical(tmp_path: Path, synth: Path, victim: Path, stage1: Path) -> None:
    cache = str(stage1.parent.parent / "cache")
    full = recipe(tmp_path / "a", synth, victim, steps=3, cache=cache, checkpoint_every=10)
    a = train_detector_stage1(full, detector_kwargs=TINY_PSP)
    killed = recipe(tmp_path / "b", synth, victim, steps=1, cache=cache, checkpoint_every=1)
    train_detector_stage1(killed, detector_kwargs=TINY_PSP)
    resumed = recipe(tmp_path / "b", synth, victim, steps=3, cache=cache, checkpoint_every=1)
    b = train_detector_stage1(resumed, detector_kwargs=TINY_PSP, resume=True)
    assert_same_weights(state(a.path), state(b.path))


PATCHES = {"textures": ["uniform", "stripes", "checker"], "procedural": 1.0}


def test_stage1_trains_on_procedural_patches(
    tmp_path: Path, synth: Path, victim: Path, stage1: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Half of every batch carries a procedural patch (no cache needed), and resume stays bit-exact."""
    import streamguard.training.stages as stages

    seen: list[float] = []
    step = stages._detector_step

    def spy(detector: Any, optimizer: Any, x: torch.Tensor, mask: torch.Tensor, aux_weight: float, **kw: Any) -> Any:
        seen.append(mask.flatten(1).amax(1).sum().item())  # clips with a patch
        return step(detector, optimizer, x, mask, aux_weight, **kw)

    monkeypatch.setattr(stages, "_detector_step", spy)
    missing_cache = str(tmp_path / "no-cache")
    full = recipe(tmp_path / "a", synth, victim, steps=3, cache=missing_cache, checkpoint_every=10, patches=PATCHES)
    a = train_detector_stage1(full, detector_kwargs=TINY_PSP)
    assert seen == [2, 2, 2]  # batch 4: 2 benign + 2 procedural, none from the (absent) cache
    killed = recipe(tmp_path / "b", synth, victim, steps=1, cache=missing_cache, checkpoint_every=1, patches=PATCHES)
    train_detector_stage1(killed, detector_kwargs=TINY_PSP)
    resumed = recipe(tmp_path / "b", synth, victim, steps=3, cache=missing_cache, checkpoint_every=1, patches=PATCHES)
    b = train_detector_stage1(resumed, detector_kwargs=TINY_PSP, resume=True)
    assert_same_weights(state(a.path), state(b.path))
    other = {**PATCHES, "textures": ["fractal"]}
    with pytest.raises(ConfigError, match="patches"):
        train_detector_stage1(recipe(tmp_path / "b", synth, victim, steps=4, cache=missing_cache, patches=other),
                              detector_kwargs=TINY_PSP, resume=True)  # fmt: skip


def test_stage1_refine_decoder_is_saved_and_loaded(tmp_path: Path, synth: Path, victim: Path, stage1: Path) -> None:
    from streamguard.patchzero import load_defense

    r = recipe(tmp_path, synth, victim, steps=1, cache=str(stage1.parent.parent / "cache"))
    r.defense.refine = True
    result = train_detector_stage1(r, detector_kwargs=TINY_PSP)
    defense = load_defense(result.path)
    assert defense.detector.refine and defense.input_size == (32, 32)
    assert defense.mask(torch.rand(1, 3, 2, 96, 96)).shape == (1, 1, 2, 96, 96)


RACE = {"pool": 6, "draw": 2, "iters": 1, "refresh": 1, "do": 1, "procedural": 0, "benign": 1, "eval_iters": 2}


def race_recipe(tmp: Path, synth: Path, victim: Path, stage1: Path, **train: Any) -> Recipe:
    return recipe(tmp, synth, victim, cache=str(stage1.parent.parent / "cache"), race=RACE, **train)


def test_stage2_race_trains_against_bpda(tmp_path: Path, synth: Path, victim: Path, stage1: Path) -> None:
    r = race_recipe(tmp_path, synth, victim, stage1, steps=2, eval_every=1)
    result = train_detector_stage2(r, init=stage1, eval_videos=4)
    assert result.steps == 2
    assert set(result.metrics) >= {"loss", "f1", "robust_acc", "clean_acc", "race_recall", "pool_fooled", "pool_iters"}
    assert 0 <= result.metrics["robust_acc"] <= result.metrics["clean_acc"] + 1e-6
    before, after = state(stage1), state(result.path)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.endswith("weight"))
    _, meta = load_checkpoint(result.path)
    assert meta["stage"] == 2 and meta["init"] == str(stage1) and meta["best_step"] in (1, 2)
    pool, _ = load_checkpoint(tmp_path / "run" / "detector-stage2-state.pt")
    assert pool["buffers"]["pool"]["content"].shape[0] == RACE["pool"]
    assert 0 < pool["buffers"]["pool"]["iters"].sum() <= 2 * RACE["draw"] * RACE["iters"]  # refreshed ones restart


def test_an_apgd_race_keeps_each_pool_patchs_step(tmp_path: Path, synth: Path, victim: Path, stage1: Path) -> None:
    race = {**RACE, "method": "apgd", "iters": 5, "eval_method": "apgd"}
    r = recipe(tmp_path, synth, victim, cache=str(stage1.parent.parent / "cache"), race=race, steps=1, eval_every=1)
    assert train_detector_stage2(r, init=stage1, eval_videos=4).steps == 1
    pool, _ = load_checkpoint(tmp_path / "run" / "detector-stage2-state.pt")
    drawn = pool["buffers"]["pool"]["iters"] > 0
    steps = pool["buffers"]["pool"]["step"]
    started_or_halved = torch.isclose(steps[drawn, None], torch.tensor([0.4, 0.2], dtype=steps.dtype), atol=1e-6).any(1)
    assert drawn.any() and started_or_halved.all() and not steps[~drawn].any()
    with pytest.raises(ConfigError, match="multiple of 5"):
        bad = recipe(tmp_path / "b", synth, victim, cache=str(stage1.parent.parent / "cache"), race={**race, "iters": 4}, steps=1)
        train_detector_stage2(bad, init=stage1, eval_videos=4)


def test_race_validation_clips_are_training_clips_the_pool_never_draws(tmp_path: Path, synth: Path, victim: Path, stage1: Path) -> None:
    from streamguard.training.attack_cache import load_downstream
    from streamguard.training.core import recipe_dataset
    from streamguard.training.stages import held_out_race, race_split

    r = race_recipe(tmp_path, synth, victim, stage1)
    pool, val = race_split(r, 12, 4)
    assert len(val) == 4 and sorted(pool + val) == list(range(12))
    assert set(val) < set(race_split(r, 12, 6)[1])  # more validation clips extend fewer
    x = held_out_race(r, load_downstream(r, torch.device("cpu")), 4, torch.device("cpu"))[0]
    train, test = recipe_dataset(r, "train"), recipe_dataset(r, "test")
    assert torch.equal(x, torch.stack([train[i][0] for i in val]))
    assert not any(torch.equal(c, test[j][0]) for c in x for j in range(len(test)))  # never the tables' videos


def test_stage2_race_resumes_exactly_pool_included(tmp_path: Path, synth: Path, victim: Path, stage1: Path) -> None:
    full = race_recipe(tmp_path / "a", synth, victim, stage1, steps=3, eval_every=10, checkpoint_every=10)
    train_detector_stage2(full, init=stage1, eval_videos=2)
    killed = race_recipe(tmp_path / "b", synth, victim, stage1, steps=1, eval_every=10, checkpoint_every=1)
    train_detector_stage2(killed, init=stage1, eval_videos=2)
    resumed = race_recipe(tmp_path / "b", synth, victim, stage1, steps=3, eval_every=10, checkpoint_every=1)
    train_detector_stage2(resumed, init=stage1, eval_videos=2, resume=True)
    # the last weights (the outputs are each run's best, and the killed run was scored at its step 1)
    sa = load_checkpoint(tmp_path / "a" / "run" / "detector-stage2-state.pt")[0]
    sb = load_checkpoint(tmp_path / "b" / "run" / "detector-stage2-state.pt")[0]
    assert_same_weights(sa["model"], sb["model"])
    pa, pb = sa["buffers"]["pool"], sb["buffers"]["pool"]
    assert all(torch.equal(pa[k], pb[k]) for k in pa)


def test_stage2_scores_and_keeps_the_weights_moving_average(tmp_path: Path, synth: Path, victim: Path, stage1: Path) -> None:
    """``average``: the state file carries the average through a kill, and the kept detector is it."""
    from streamguard.patchzero import load_defense

    race, cache = {**RACE, "average": 0.5, "edge_weight": 2.0}, str(stage1.parent.parent / "cache")

    def run(tmp: Path, steps: int, resume: bool = False) -> Any:
        r = recipe(tmp, synth, victim, cache=cache, race=race, steps=steps, eval_every=2, checkpoint_every=1)
        return train_detector_stage2(r, init=stage1, eval_videos=2, resume=resume)

    run(tmp_path / "a", 1)
    first = state(tmp_path / "a" / "run" / "detector-stage2-state.pt")["model"]
    run(tmp_path / "a", 2, resume=True)
    whole = run(tmp_path / "b", 2)
    resumed, straight = (state(tmp_path / d / "run" / "detector-stage2-state.pt") for d in ("a", "b"))
    last, ema = resumed["model"], resumed["buffers"]["ema"]
    assert_same_weights(ema, straight["buffers"]["ema"])
    floats = [k for k in last if last[k].is_floating_point()]
    assert any(not torch.equal(first[k], last[k]) for k in floats)
    for k in floats:  # the first update copies the weights, the second averages them with decay 0.5
        assert torch.allclose(ema["module." + k], 0.5 * first[k] + 0.5 * last[k], atol=1e-6)
    assert load_checkpoint(whole.path)[1]["best_step"] == 2  # scored only at step 2: the average is kept
    kept = load_defense(whole.path).detector.state_dict()
    assert all(torch.equal(kept[k], ema["module." + k]) for k in floats)


def test_benign_mining_ranks_the_clip_the_detector_nearly_masks_first(tmp_path: Path, synth: Path, victim: Path, stage1: Path) -> None:
    from streamguard.training.stages import hardest_benign

    class Reads(torch.nn.Module):  # a defense whose patch probability is the red channel
        def probabilities(self, x: torch.Tensor) -> torch.Tensor:
            return x[:, :1]

    clips = torch.zeros(3, 3, 2, 10, 10)
    clips[0, 0] = 0.3  # moderate everywhere
    clips[1, 0, 0, :2, :2] = 0.9  # confident on 4 of 200 pixels: the top 2%
    assert hardest_benign(Reads(), clips, 2, batch=2).tolist() == [1, 0]
    r = race_recipe(tmp_path, synth, victim, stage1, steps=1)
    r.train.race.hard = 1  # mining needs real footage, which this recipe has none of
    with pytest.raises(ConfigError, match="footage"):
        train_detector_stage2(r, init=stage1, eval_videos=2)


def test_stage2_race_mines_hard_benign_footage(tmp_path: Path, synth: Path, victim: Path, stage1: Path) -> None:
    import cv2

    from streamguard.data.footage import FootageClips, build_footage
    from streamguard.training.stages import HARD_KEEP

    src = tmp_path / "photos"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        cv2.imwrite(str(src / f"photo{i}.png"), cv2.GaussianBlur(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8), (5, 5), 0))
    footage = build_footage([src], tmp_path / "footage", size=32, clip_len=8, clips_per_photo=2, seed=0)
    n_train = len(FootageClips(footage, "train"))
    r = race_recipe(tmp_path, synth, victim, stage1, steps=2, eval_every=10, checkpoint_every=1)
    r.train.patches.footage, r.train.race.hard = str(footage), 2
    train_detector_stage2(r, init=stage1, eval_videos=2)
    hard = state(tmp_path / "run" / "detector-stage2-state.pt")["buffers"]["hard"]
    assert len(hard) == min(HARD_KEEP, n_train) and len(set(hard.tolist())) == len(hard)
    assert 0 <= int(hard.min()) and int(hard.max()) < n_train


def test_stage2_race_mines_the_tasks_own_clean_clips(tmp_path: Path, synth: Path, victim: Path, stage1: Path) -> None:
    from streamguard.training.core import recipe_dataset
    from streamguard.training.stages import HARD_KEEP, race_split

    r = race_recipe(tmp_path, synth, victim, stage1, steps=2, eval_every=10, checkpoint_every=1)
    r.train.race.hard_task = 2  # no footage needed: the clips are the race's own training videos
    train_detector_stage2(r, init=stage1, eval_videos=2)
    buffers = state(tmp_path / "run" / "detector-stage2-state.pt")["buffers"]
    n_pool = len(race_split(r, len(recipe_dataset(r, "train")), 2)[0])
    mined = buffers["hard_task"]
    assert len(mined) == min(HARD_KEEP, n_pool) and len(set(mined.tolist())) == len(mined)
    assert 0 <= int(mined.min()) and int(mined.max()) < n_pool and len(buffers["hard"]) == 0


def test_race_attacks_its_first_slots_and_the_held_out_race_through_another_view(
    tmp_path: Path, synth: Path, victim: Path, stage1: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``uncompleted``: the drawn pool slots below it are attacked through another view of the defense
    (after the others), ``uncompleted_view``: without its box completion, or with the soft mask spread by
    the patch's side; ``eval_uncompleted`` attacks the held-out race the same way."""
    from streamguard.training import stages
    from streamguard.training.race import PatchPool

    calls: list[tuple[str, str, int]] = []
    attack = stages.patch_attack

    def recorded(model: Any, defense: Any, x: torch.Tensor, *a: Any, **k: Any) -> Any:
        calls.append((defense.complete, defense.soft_reach, len(x)))
        return attack(model, defense, x, *a, **k)

    monkeypatch.setattr(stages, "patch_attack", recorded)
    monkeypatch.setattr(PatchPool, "draw", lambda self, k, rng: [4, 1][:k])  # slot 1 is below uncompleted = 3, slot 4 is not
    cases = (
        (3, "uncompleted", [("box", "rim", 1), ("none", "rim", 1), ("none", "rim", 2)]),
        (3, "spread", [("box", "rim", 1), ("box", "patch", 1), ("box", "patch", 2)]),
        (0, "uncompleted", [("box", "rim", 2), ("box", "rim", 2)]),
    )
    for uncompleted, view, expected in cases:
        calls.clear()
        r = race_recipe(tmp_path / f"{uncompleted}-{view}", synth, victim, stage1, steps=1, eval_every=1)
        r.defense.complete = "box"
        r.train.race.uncompleted, r.train.race.eval_uncompleted = uncompleted, bool(uncompleted)
        r.train.race.uncompleted_view = view
        train_detector_stage2(r, init=stage1, eval_videos=2)
        assert calls == expected  # one training step's draws, then the held-out race of 2 clips
    r.train.race.uncompleted = RACE["pool"] + 1
    with pytest.raises(ConfigError, match="uncompleted"):
        train_detector_stage2(r, init=stage1, eval_videos=2)


def test_race_attacks_its_completion_blind_slots_by_their_own_method_and_iterations(
    tmp_path: Path, synth: Path, victim: Path, stage1: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``uncompleted_iters`` / ``uncompleted_method``: the blind slots' draws are their own attack, a
    fresh AutoPGD from the stored content in a PGD race, and the pool counts the iterations each got."""
    from streamguard.training import stages
    from streamguard.training.race import PatchPool

    calls: list[tuple[str, int, str, bool]] = []
    attack = stages.patch_attack

    def recorded(model: Any, defense: Any, x: Any, y: Any, m: Any, z: Any, iters: int, step: Any, method: str = "pgd", **k: Any) -> Any:
        calls.append((defense.complete, iters, method, k.get("steps") is not None))
        return attack(model, defense, x, y, m, z, iters, step, method, **k)

    monkeypatch.setattr(stages, "patch_attack", recorded)
    monkeypatch.setattr(PatchPool, "draw", lambda self, k, rng: [4, 1][:k])  # slot 1 is blind, slot 4 is not
    r = race_recipe(tmp_path, synth, victim, stage1, steps=1, eval_every=10, checkpoint_every=1)
    r.defense.complete, r.train.race.refresh = "box", 0.0
    r.train.race.uncompleted, r.train.race.uncompleted_iters, r.train.race.uncompleted_method = 3, 5, "apgd"
    train_detector_stage2(r, init=stage1, eval_videos=2)
    held_out = ("box", RACE["eval_iters"], "pgd", False)
    assert calls == [("box", RACE["iters"], "pgd", False), ("none", 5, "apgd", False), held_out]
    pool = state(tmp_path / "run" / "detector-stage2-state.pt")["buffers"]["pool"]
    assert pool["iters"][1] == 5 and pool["iters"][4] == RACE["iters"]
    assert pool["step"][1] == 0 and pool["step"][4] == 0  # a pgd race keeps no AutoPGD step


def test_a_pool_patchs_pgd_step_halves_with_the_iterations_it_has_accumulated(
    tmp_path: Path, synth: Path, victim: Path, stage1: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from streamguard.training import stages
    from streamguard.training.race import PatchPool

    steps: list[list[float]] = []
    attack = stages.patch_attack

    def recorded(model: Any, defense: Any, x: torch.Tensor, y: Any, m: Any, z: Any, iters: int, step: Any, *a: Any, **k: Any) -> Any:
        steps.append(torch.as_tensor(step).flatten().tolist())
        return attack(model, defense, x, y, m, z, iters, step, *a, **k)

    monkeypatch.setattr(stages, "patch_attack", recorded)
    monkeypatch.setattr(PatchPool, "draw", lambda self, k, rng: [4, 1][:k])  # refresh replaces slot 4 every step; slot 1 ages
    r = race_recipe(tmp_path, synth, victim, stage1, steps=6, eval_every=10)
    r.train.race.step_halflife = 1  # RACE: 1 iteration a draw
    train_detector_stage2(r, init=stage1, eval_videos=2)
    aged = [0.2 / 2**i for i in range(stages.STEP_HALVINGS + 1)] + [0.2 / 2**stages.STEP_HALVINGS]  # then no lower
    assert [len(s) for s in steps] == [2] * len(aged) + [1]  # the last: the held-out race's fresh attack
    assert sum(steps, []) == pytest.approx([v for s in aged for v in (0.2, s)] + [0.2])


def test_race_score_counts_what_the_defense_masks_on_the_clean_clips(tmp_path: Path, synth: Path, victim: Path, stage1: Path) -> None:
    from streamguard.patchzero import build_defense
    from streamguard.training.attack_cache import load_downstream
    from streamguard.training.stages import held_out_race, race_score

    r = race_recipe(tmp_path, synth, victim, stage1)
    model = load_downstream(r, torch.device("cpu")).eval()
    x, y, mask, z0 = held_out_race(r, model, 2, torch.device("cpu"))
    for threshold, masked in ((1e-9, 1.0), (1 - 1e-9, 0.0)):  # the logits of this detector are far inside +-20
        defense = build_defense(r.defense, weights=stage1, mean=model.spec.mean, bpda=True, threshold=threshold)
        assert race_score(model, defense, x, y, mask, z0, 1, 0.2)["clean_fpr"] == masked


def test_stage2_keeps_no_checkpoint_that_masks_the_clean_validation_clips(
    tmp_path: Path, synth: Path, victim: Path, stage1: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from streamguard.patchzero import load_defense
    from streamguard.training import stages

    score = stages.race_score
    monkeypatch.setattr(stages, "benign_fpr", lambda *a, **k: 0.0)  # the held-out benign clips pass the guard
    for clean_fpr, lr in ((0.0, 0.0), (0.5, 1e-3)):  # lr 0: the clean score stays the start's, so the guard decides
        monkeypatch.setattr(stages, "race_score", lambda *a, f=clean_fpr, **k: {**score(*a, **k), "clean_fpr": f})
        r = race_recipe(tmp_path / str(clean_fpr), synth, victim, stage1, steps=2, eval_every=1, lr=lr)
        r.train.race.max_benign_fpr, r.train.race.average = 0.1, 0.5
        result = train_detector_stage2(r, init=stage1, eval_videos=2)
        assert (load_checkpoint(result.path)[1]["best_step"] is None) == bool(clean_fpr)
    # nothing inside the guards: what is kept is the last of what was scored, the average, not the raw weights
    ema = state(tmp_path / "0.5" / "run" / "detector-stage2-state.pt")["buffers"]["ema"]
    kept = load_defense(result.path).detector.state_dict()
    assert all(torch.equal(kept[k], ema["module." + k]) for k in kept if kept[k].is_floating_point())


def test_stage2_keeps_the_best_race_checkpoint_and_stops(tmp_path: Path, synth: Path, victim: Path, stage1: Path) -> None:
    r = race_recipe(tmp_path, synth, victim, stage1, steps=12, eval_every=1, patience=2)
    result = train_detector_stage2(r, init=stage1, eval_videos=2)
    _, meta = load_checkpoint(result.path)
    best = next(h for h in result.history if h["step"] == meta["best_step"])
    assert result.metrics["robust_acc"] == best["robust_acc"]
    later = [h for h in result.history if h["step"] > meta["best_step"]]
    assert result.stopped_early == (result.steps < 12) and (not result.stopped_early or len(later) == 2)
    best_weights = state(tmp_path / "run" / "detector-stage2-best.pt")
    assert_same_weights(best_weights, state(result.path))


# ---------------------------------------------------------------- command line


def test_cli_trains_and_reports_errors_on_one_line(tmp_path: Path, synth: Path) -> None:
    from typer.testing import CliRunner

    from streamguard.cli import app

    toml = tmp_path / "r.toml"
    toml.write_text(
        f'[model]\nname = "tiny3d"\n[data]\nroot = "{synth}"\nsize = 32\nclip_len = 8\nframes = 12\n'
        f'[train]\noutput = "{tmp_path / "run"}"\nbatch = 2\nsteps = 5\n'
    )
    runner = CliRunner()
    result = runner.invoke(app, ["train", "classifier", str(toml), "--steps", "1"])
    assert result.exit_code == 0, result.output
    _, meta = load_checkpoint(tmp_path / "run/classifier.pt")
    assert meta["steps"] == 1 and meta["command"].startswith("streamguard")
    result = runner.invoke(app, ["train", "detector", "--stage", "2", str(toml)])
    assert result.exit_code == 2 and "--init" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["train", "detector", "--stage", "2", str(toml), "--init", "synth-patchzero", "--steps", "0"])
    assert result.exit_code == 0, result.output  # a shipped name starts it
    assert "no evaluation was inside the guards" in result.output  # zero steps: nothing scored, the last weights kept
    assert load_checkpoint(tmp_path / "run/detector-stage2.pt")[1]["init"] == "synth-patchzero"
