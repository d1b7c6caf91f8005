import json
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from streamguard.data import (
    SYNTH_CLASSES,
    SYNTH_SYMMETRIES,
    UCF101Clips,
    load_boxes,
    make_loader,
    make_synthmotion,
    render_video,
    symmetry_labels,
    write_video,
)
from streamguard.data.synthmotion import _track
from streamguard.errors import ConfigError, InputError

FRAMES = 10  # frames per video in the hand-made UCF101 tree


def level(i: int) -> int:
    """Grey level of frame i in the hand-made videos, so a decoded clip tells which frames it holds."""
    return 20 * i + 10


def frame_ids(clip: torch.Tensor) -> list[int]:
    """(3, T, H, W) clip of flat grey frames -> their frame indices."""
    grey = clip.mean(dim=(0, 2, 3)).numpy() * 255
    return [int(round((g - 10) / 20)) for g in grey]


def decode_all(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


@pytest.fixture
def ucf(tmp_path: Path) -> Path:
    """A tiny tree in UCF101's layout: 3 classes x 3 videos of 10 flat grey 48x40 frames."""
    classes = ["ApplyEyeMakeup", "Basketball", "Drumming"]
    frames = np.stack([np.full((40, 48, 3), level(i), np.uint8) for i in range(FRAMES)])
    lists = tmp_path / "ucfTrainTestlist"
    lists.mkdir()
    (lists / "classInd.txt").write_text("".join(f"{i} {c}\r\n" for i, c in enumerate(classes, 1)))
    for fold in (1, 2, 3):
        train, test = [], []
        for i, c in enumerate(classes, 1):
            for g in (1, 2, 3):
                rel = f"{c}/v_{c}_g{g:02d}_c01.avi"
                if g == fold:
                    test.append(rel)
                else:
                    train.append(f"{rel} {i}")
        (lists / f"trainlist0{fold}.txt").write_text("\n".join(train) + "\n")
        (lists / f"testlist0{fold}.txt").write_text("\n".join(test) + "\n")
    for c in classes:
        (tmp_path / c).mkdir()
        for g in (1, 2, 3):
            write_video(tmp_path / c / f"v_{c}_g{g:02d}_c01.avi", frames)
    return tmp_path


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthmotion(tmp_path_factory.mktemp("synth") / "sm", videos_per_class=2, size=48, frames=12)


# ----------------------------------------------------------------------------- UCF101 layout


def test_reads_splits_folds_and_labels(ucf: Path) -> None:
    test1 = UCF101Clips(ucf, split="test", fold=1, clip_len=4, size=32)
    assert test1.classes == ["ApplyEyeMakeup", "Basketball", "Drumming"]
    assert [(p.name, y) for p, y in test1.videos] == [
        ("v_ApplyEyeMakeup_g01_c01.avi", 0),
        ("v_Basketball_g01_c01.avi", 1),
        ("v_Drumming_g01_c01.avi", 2),
    ]
    train2 = UCF101Clips(ucf, split="train", fold=2)
    assert len(train2) == 6 and all("_g02_" not in p.name for p, _ in train2.videos)
    assert sorted(y for _, y in train2.videos) == [0, 0, 1, 1, 2, 2]
    clip, label = test1[1]
    assert clip.shape == (3, 4, 32, 32) and clip.dtype == torch.float32 and label == 1
    assert 0.0 <= clip.min() and clip.max() <= 1.0


def test_split_files_directly_in_root(ucf: Path) -> None:
    for f in (ucf / "ucfTrainTestlist").iterdir():
        f.rename(ucf / f.name)
    (ucf / "ucfTrainTestlist").rmdir()
    assert len(UCF101Clips(ucf, split="train", fold=3)) == 6


def test_centered_start_stride_and_looping(ucf: Path) -> None:
    clip, _ = UCF101Clips(ucf, clip_len=4, stride=2, size=16)[0]
    assert frame_ids(clip) == [1, 3, 5, 7]  # span 7 of 10 frames, centred
    looped, _ = UCF101Clips(ucf, clip_len=8, stride=2, size=16)[0]
    assert frame_ids(looped) == [0, 2, 4, 6, 8, 0, 2, 4]  # longer than the video: wraps


def test_container_without_frame_count(ucf: Path) -> None:
    """Matroska has no frame count in its header: the clip is found by decoding the whole video."""
    with av.open(str(ucf / "Drumming" / "v_Drumming_g01_c01.mkv"), "w") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for i in range(FRAMES):
            image = np.full((32, 32, 3), level(i), np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())
    (ucf / "ucfTrainTestlist" / "testlist01.txt").write_text("Drumming/v_Drumming_g01_c01.mkv\n")
    clip, label, indices = UCF101Clips(ucf, clip_len=4, stride=2, size=16).load(0)
    assert label == 2 and indices.tolist() == [1, 3, 5, 7] and frame_ids(clip) == [1, 3, 5, 7]


def test_random_start_is_seeded(ucf: Path) -> None:
    def starts(seed: int) -> list[int]:
        ds = UCF101Clips(ucf, clip_len=3, size=16, start="random", seed=seed)
        return [frame_ids(ds[0][0])[0] for _ in range(12)]

    first = starts(0)
    assert first == starts(0)
    assert len(set(first)) > 2 and all(0 <= s <= FRAMES - 3 for s in first)
    assert first != starts(1)


def test_subset_is_reproducible(ucf: Path) -> None:
    def subset(seed: int) -> list[str]:
        return [p.name for p, _ in UCF101Clips(ucf, split="train", subset=3, seed=seed).videos]

    assert subset(0) == subset(0) and len(set(subset(0))) == 3
    assert len({tuple(subset(s)) for s in range(8)}) > 1
    with pytest.raises(ConfigError, match="subset"):
        UCF101Clips(ucf, split="train", subset=7)


def test_missing_files_are_named(ucf: Path) -> None:
    with pytest.raises(InputError, match="nowhere"):
        UCF101Clips(ucf / "nowhere")
    (ucf / "ucfTrainTestlist" / "testlist03.txt").unlink()
    with pytest.raises(InputError, match="testlist03.txt"):
        UCF101Clips(ucf, fold=3)
    missing = ucf / "Basketball" / "v_Basketball_g01_c01.avi"
    missing.unlink()
    with pytest.raises(InputError, match="v_Basketball_g01_c01.avi"):
        UCF101Clips(ucf, fold=1)
    (ucf / "ucfTrainTestlist" / "classInd.txt").unlink()
    with pytest.raises(InputError, match="classInd.txt"):
        UCF101Clips(ucf, fold=2)


def test_corrupt_video_is_named_at_load(ucf: Path) -> None:
    bad = ucf / "Drumming" / "v_Drumming_g01_c01.avi"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    ds = UCF101Clips(ucf, fold=1, clip_len=2, size=16)
    ds[0]
    with pytest.raises(InputError, match="v_Drumming_g01_c01.avi"):
        ds[2]


def test_bad_options_are_config_errors(ucf: Path) -> None:
    for field, value in [("fold", 4), ("split", "val"), ("start", "end"), ("stride", 0)]:
        with pytest.raises(ConfigError, match=field):
            UCF101Clips(ucf, **{field: value})


def test_loader_workers_seeded_and_errors_are_one_line(ucf: Path) -> None:
    ds = UCF101Clips(ucf, split="train", clip_len=3, size=16, start="random")

    def run(seed: int) -> list[list[int]]:
        return [[frame_ids(c)[0] for c in clips] for clips, _ in make_loader(ds, batch=3, workers=2, seed=seed)]

    clips, labels = next(iter(make_loader(ds, batch=3, workers=2, seed=0)))
    assert clips.shape == (3, 3, 3, 16, 16) and labels.tolist() == [0, 0, 1]
    assert run(0) == run(0)
    (ucf / "Basketball" / "v_Basketball_g02_c01.avi").write_bytes(b"not a video")
    with pytest.raises(InputError) as err:
        list(make_loader(ds, batch=2, workers=2, seed=0))
    assert "\n" not in str(err.value) and "v_Basketball_g02_c01.avi" in str(err.value)


# ----------------------------------------------------------------------------- SynthMotion


def test_render_is_deterministic() -> None:
    a, boxes_a, info_a = render_video(3, seed=7, size=48, frames=6)
    b, boxes_b, info_b = render_video(3, seed=7, size=48, frames=6)
    c, _, _ = render_video(3, seed=8, size=48, frames=6)
    assert np.array_equal(a, b) and np.array_equal(boxes_a, boxes_b) and info_a == info_b
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("class_index", range(len(SYNTH_CLASSES)))
def test_boxes_are_tight_around_drawn_pixels(class_index: int) -> None:
    """Over black and white backgrounds a pixel's values give the object's coverage exactly:
    ``white - black = 255 * (1 - coverage)``. The box must be the extent of coverage >= 0.5."""
    for seed in range(3):
        photo, boxes, _ = render_video(class_index, seed, size=64, frames=10)
        black, boxes_black, _ = render_video(class_index, seed, size=64, frames=10, plain=0)
        white, boxes_white, _ = render_video(class_index, seed, size=64, frames=10, plain=255)
        assert np.array_equal(boxes, boxes_black) and np.array_equal(boxes, boxes_white)
        coverage = 1 - (white.astype(float) - black).mean(-1) / 255  # (T, H, W), +-1/255
        for t, (x1, y1, x2, y2) in enumerate(boxes.astype(int)):
            inside = np.zeros((64, 64), bool)
            inside[y1:y2, x1:x2] = True
            assert not (coverage[t] > 0.51)[~inside].any(), (SYNTH_CLASSES[class_index], seed, t)
            box = coverage[t][y1:y2, x1:x2]
            edges = [box[:, 0], box[:, -1], box[0], box[-1]]  # each box side touches the object
            assert all(edge.max() > 0.49 for edge in edges), (SYNTH_CLASSES[class_index], seed, t)
        opaque = coverage > 0.999  # there the photo render shows the same object pixels
        assert opaque.any(axis=(1, 2)).all() and np.abs(photo.astype(int) - black)[opaque].max() <= 1


def test_synthmotion_tree_is_deterministic(synth: Path, tmp_path: Path) -> None:
    again = make_synthmotion(tmp_path / "again", videos_per_class=2, size=48, frames=12)
    other = make_synthmotion(tmp_path / "other", videos_per_class=2, size=48, frames=12, seed=1)
    for name in ["MoveLeft/v_MoveLeft_g01_c01.avi", "Shake/v_Shake_g02_c01.avi"]:
        assert np.array_equal(decode_all(synth / name), decode_all(again / name))
        assert (synth / f"{name}.boxes.json").read_text() == (again / f"{name}.boxes.json").read_text()
        assert not np.array_equal(decode_all(synth / name), decode_all(other / name))
    meta, meta_again = (json.loads((r / "synthmotion.json").read_text()) for r in (synth, again))
    assert {k: v for k, v in meta.items() if k != "seconds"} == {k: v for k, v in meta_again.items() if k != "seconds"}


def test_synthmotion_layout_and_metadata(synth: Path) -> None:
    meta = json.loads((synth / "synthmotion.json").read_text())
    assert meta["seed"] == 0 and meta["size"] == 48 and meta["frames"] == 12
    assert meta["classes"] == list(SYNTH_CLASSES) and len(SYNTH_CLASSES) >= 10
    assert all(b["licence"] and b["source"].startswith("skimage.data.") for b in meta["backgrounds"])
    lines = (synth / "ucfTrainTestlist" / "classInd.txt").read_text().splitlines()
    assert lines[0] == "1 MoveLeft" and len(lines) == len(SYNTH_CLASSES)
    for name in ("trainlist01.txt", "testlist01.txt", "trainlist03.txt", "testlist03.txt"):
        assert (synth / "ucfTrainTestlist" / name).is_file()
    assert not list(synth.rglob("*.tmp"))


def test_synthmotion_loads_through_ucf101clips(synth: Path) -> None:
    test = UCF101Clips(synth, split="test", clip_len=8, size=32)
    train = UCF101Clips(synth, split="train", clip_len=8, size=32)
    assert test.classes == list(SYNTH_CLASSES)
    assert len(test) == len(train) == len(SYNTH_CLASSES)  # 2 videos per class, 1 test + 1 train
    assert {y for _, y in test.videos} == set(range(len(SYNTH_CLASSES)))
    assert test.mean == tuple(json.loads((synth / "synthmotion.json").read_text())["mean"])
    clip, label = test[5]
    assert clip.shape == (3, 8, 32, 32) and label == 5 and 0 <= clip.min() and clip.max() <= 1
    assert clip.std() > 0.05


def test_written_boxes_match_render(synth: Path) -> None:
    video = synth / "ZoomIn" / "v_ZoomIn_g02_c01.avi"
    boxes, labels = load_boxes(video)
    _, rendered, _ = render_video(6, np.random.SeedSequence([0, 6, 2]), size=48, frames=12)
    assert len(boxes) == 12 and all(b.shape == (1, 4) and b.dtype == np.float32 for b in boxes)
    assert np.array_equal(np.concatenate(boxes), rendered)
    assert all(lab.tolist() == [SYNTH_CLASSES.index("ZoomIn") + 1] for lab in labels)
    with pytest.raises(InputError, match="boxes.json"):
        load_boxes(synth / "ZoomIn" / "missing.avi")


def test_classes_differ_in_motion(synth: Path) -> None:
    def track(name: str, group: int) -> np.ndarray:
        boxes, _ = load_boxes(synth / name / f"v_{name}_g{group:02d}_c01.avi")
        return np.concatenate(boxes)  # (T, 4)

    moves = {"MoveLeft": (0, -1), "MoveRight": (0, 1), "MoveUp": (1, -1), "MoveDown": (1, 1)}
    for group in (1, 2):
        for name, (axis, sign) in moves.items():
            boxes = track(name, group)
            centre = (boxes[:, axis] + boxes[:, axis + 2]) / 2 * sign  # increasing along the motion
            assert np.all(np.diff(centre) >= -0.5) and centre[-1] - centre[0] > 3, name
        area = {n: np.prod(track(n, group)[:, 2:] - track(n, group)[:, :2], axis=1) for n in ("ZoomIn", "ZoomOut")}
        assert area["ZoomIn"][-1] > 2 * area["ZoomIn"][0] and area["ZoomOut"][-1] < area["ZoomOut"][0] / 2


def test_bad_synth_settings(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="videos_per_class"):
        make_synthmotion(tmp_path, videos_per_class=1)
    with pytest.raises(ConfigError, match="size"):
        make_synthmotion(tmp_path, size=33)


def test_cli_data_synth(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from streamguard.cli import app

    runner = CliRunner()
    args = ["data", "synth", str(tmp_path / "sm"), "--videos-per-class", "2", "--size", "32", "--frames", "4"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "streamguard data synth" in result.output and "12 / 12" in result.output
    assert len(UCF101Clips(tmp_path / "sm", split="train", clip_len=4, size=32)) == len(SYNTH_CLASSES)
    bad = runner.invoke(app, ["data", "synth", str(tmp_path / "bad"), "--size", "33"])
    assert bad.exit_code == 2 and "size" in bad.output


def test_recipe_clips_redoes_an_interrupted_synthmotion_tree(tmp_path: Path) -> None:
    from streamguard.data import recipe_clips
    from streamguard.recipes import DataSection

    root = tmp_path / "synth"
    (root / "MoveLeft").mkdir(parents=True)  # what a killed generation leaves: no synthmotion.json
    d = DataSection(root=str(root), size=32, clip_len=4, frames=4, videos_per_class=2)
    clips = recipe_clips(d, "test")
    assert (root / "synthmotion.json").is_file()
    clip, label = clips[0]
    assert tuple(clip.shape) == (3, 4, 32, 32) and 0 <= label < len(clips.classes)


def test_rotation_speed_is_a_recorded_setting(tmp_path: Path) -> None:
    from streamguard.data import recipe_clips
    from streamguard.recipes import DataSection

    rotate = SYNTH_CLASSES.index("RotateClockwise")
    _, _, slow = render_video(rotate, seed=5, size=48, frames=6)
    _, _, fast = render_video(rotate, seed=5, size=48, frames=6, rotation=(20.0, 20.0))
    assert -10 <= np.diff(slow["angle"]).mean() <= -5 and np.allclose(np.diff(fast["angle"]), -20)
    moving = SYNTH_CLASSES.index("MoveLeft")  # the other classes draw nothing from it
    assert render_video(moving, 5, 48, 6)[2] == render_video(moving, 5, 48, 6, rotation=(20.0, 20.0))[2]
    with pytest.raises(ConfigError, match="rotation"):
        make_synthmotion(tmp_path / "bad", rotation=(0.0, 10.0))

    d = DataSection(root=str(tmp_path / "fast"), size=32, clip_len=4, frames=4, videos_per_class=2, rotation=[12.0, 20.0])
    recipe_clips(d, "test")
    assert json.loads((tmp_path / "fast" / "synthmotion.json").read_text())["rotation"] == [12.0, 20.0]


def motion_signature(center: np.ndarray, angle: np.ndarray, scale: np.ndarray) -> tuple[int, ...]:
    """Signs of the net x, y, angle and scale change over a track (0 when it barely moves)."""
    net = (center[-1, 0] - center[0, 0], center[-1, 1] - center[0, 1], angle[-1] - angle[0], np.log(scale[-1] / scale[0]))
    return tuple(int(np.sign(v)) if abs(v) > 1e-3 else 0 for v in net)


@pytest.mark.parametrize("symmetry", ["hflip", "reverse"])
def test_symmetry_table_matches_the_generator(symmetry: str) -> None:
    """A mirrored / reversed track of each direction class moves like the class the table names."""
    size, perm = 64, symmetry_labels("synthmotion", symmetry, SYNTH_CLASSES)
    swapped = {c for pair in SYNTH_SYMMETRIES[symmetry].items() for c in pair}
    for i, name in enumerate(SYNTH_CLASSES[:8]):  # the classes with one direction each
        for seed in range(3):
            t = _track(name, np.random.default_rng(seed), 16, size, radius=8.0)
            center, angle, scale = t.center.copy(), t.angle.copy(), t.scale.copy()
            if symmetry == "hflip":  # mirroring x also turns a rotation the other way
                center[:, 0], angle = size - 1 - center[:, 0], -angle
            else:
                center, angle, scale = center[::-1], angle[::-1], scale[::-1]
            target = _track(SYNTH_CLASSES[perm[i]], np.random.default_rng(seed), 16, size, radius=8.0)
            assert motion_signature(center, angle, scale) == motion_signature(target.center, target.angle, target.scale)
        assert (perm[i] != i) == (name in swapped)
    assert sorted(perm) == list(range(len(SYNTH_CLASSES))) and [perm[p] for p in perm] == list(range(len(perm)))


def test_symmetry_labels_refuses_what_is_not_label_safe() -> None:
    assert symmetry_labels("ucf101", "hflip", ["A", "B"]) == [0, 1]
    with pytest.raises(ConfigError, match="'reverse' is not label-safe for ucf101"):
        symmetry_labels("ucf101", "reverse", ["A", "B"])
    with pytest.raises(ConfigError, match="RotateCounterClockwise"):
        symmetry_labels("synthmotion", "hflip", ["MoveLeft", "MoveRight", "RotateClockwise"])
