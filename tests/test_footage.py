"""Real footage as detector backgrounds (:mod:`streamguard.data.footage`), on a tiny generated folder."""

from __future__ import annotations

import json
import shutil
import warnings
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
import torch

from streamguard.data.footage import (
    FootageClips,
    FootageWarning,
    build_footage,
    find_sources,
    source_group,
    split_of,
)
from streamguard.errors import InputError

SETTINGS = {"size": 32, "clip_len": 8, "clips_per_video": 3, "clips_per_photo": 2}


def _write_video(path: Path, seed: int, frames: int = 40, width: int = 96, height: int = 80) -> None:
    rng = np.random.default_rng(seed)
    base = cv2.resize(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8), (width * 2, height * 2), interpolation=cv2.INTER_CUBIC)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(25, 1), options={"crf": "20", "preset": "ultrafast"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for t in range(frames):  # a panning texture: real motion between frames
            image = np.ascontiguousarray(base[t : t + height, t : t + width])
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())


def _make_folder(root: Path) -> Path:
    root.mkdir(parents=True)
    _write_video(root / "vtest.avi", 1)
    (root / "clips").mkdir()
    _write_video(root / "clips" / "street.mp4", 2)
    rng = np.random.default_rng(3)
    cv2.imwrite(str(root / "cat.png"), rng.integers(0, 256, (90, 120, 3), dtype=np.uint8))
    cv2.imwrite(str(root / "clips" / "dog.jpg"), cv2.GaussianBlur(rng.integers(0, 256, (70, 100, 3), dtype=np.uint8), (5, 5), 0))
    cv2.imwrite(str(root / "grey.png"), rng.integers(0, 256, (64, 64), dtype=np.uint8))  # grayscale: read as RGB
    (root / "notes.txt").write_text("not footage")
    (root / "logo.svg").write_text("<svg/>")
    return root


def _clip_bytes(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.glob("*/*.npy"))}


@pytest.fixture(scope="module")
def footage(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("footage")
    src = _make_folder(base / "src")
    out = build_footage([src], base / "out", seed=0, **SETTINGS)
    return src, out


def test_find_sources_sorted_and_by_kind(footage: tuple[Path, Path]) -> None:
    src, _ = footage
    found = find_sources(src)
    assert [p.relative_to(src).as_posix() for p in found] == ["cat.png", "clips/dog.jpg", "clips/street.mp4", "grey.png", "vtest.avi"]
    assert find_sources(src / "cat.png") == [src / "cat.png"]  # a file may be named directly
    with pytest.raises(InputError, match="not found"):
        find_sources(src / "nope")


def test_clip_shapes_dtype_and_metadata(footage: tuple[Path, Path]) -> None:
    _, out = footage
    meta = json.loads((out / "footage.json").read_text())
    assert meta["skipped"] == [] and len(meta["sources"]) == 5
    assert len(meta["clips"]) == 2 * 3 + 3 * 2
    for clip in meta["clips"]:
        array = np.load(out / clip["file"])
        assert array.shape == (8, 32, 32, 3) and array.dtype == np.uint8
        assert clip["kind"] in {"video", "photo"} and len(clip["sha256"]) == 16 and isinstance(clip["augment"], dict)
        assert clip["file"].startswith(clip["split"] + "/")
    assert sum(meta["counts"].values()) == len(meta["clips"])
    grey = np.load(out / next(c["file"] for c in meta["clips"] if c["source"].endswith("grey.png")))
    assert np.abs(grey[..., 0].astype(int) - grey[..., 1]).mean() < 12  # grey read as RGB: channels alike up to noise/codec


def test_split_is_by_source_and_vtest_is_test(footage: tuple[Path, Path]) -> None:
    _, out = footage
    meta = json.loads((out / "footage.json").read_text())
    splits: dict[str, set[str]] = {}
    for clip in meta["clips"]:
        splits.setdefault(clip["source"], set()).add(clip["split"])
    assert all(len(s) == 1 for s in splits.values())  # no source in both splits
    assert splits[next(s for s in splits if s.endswith("vtest.avi"))] == {"test"}
    assert "train" in set().union(*splits.values())
    assert split_of("/else/where/VTEST.avi", test_fraction=0.0) == "test"
    assert all(split_of(f"x/{n}", 0.2) == split_of(f"y/{n}", 0.2) for n in ("cat.png", "left01.jpg", "a.mp4"))
    for a, b in (("Megamind.avi", "Megamind_bugy.avi"), ("Elephants.jpg", "Elephants_3840x2160.jpg"),
                 ("wood-d.webp", "wood-l.webp"), ("aloeL.jpg", "aloeR.jpg"), ("left07.jpg", "right07.jpg")):  # fmt: skip
        assert source_group(a) == source_group(b)
        assert split_of(a, 0.5) == split_of(b, 0.5)


def test_deterministic_given_seed(footage: tuple[Path, Path], tmp_path: Path) -> None:
    src, out = footage
    again = build_footage([src], tmp_path / "same", seed=0, workers=2, **SETTINGS)
    assert _clip_bytes(again) == _clip_bytes(out)  # and independent of workers
    other = build_footage([src], tmp_path / "other", seed=1, **SETTINGS)
    a, b = _clip_bytes(out), _clip_bytes(other)
    assert a.keys() == b.keys() and all(a[k] != b[k] for k in a)


def test_resume_restores_identical(footage: tuple[Path, Path], tmp_path: Path) -> None:
    src, out = footage
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    before = _clip_bytes(copy)
    victim = sorted(copy.glob("*/*.npy"))[3]
    kept = min(copy.glob("*/*.npy"))
    mtime = kept.stat().st_mtime_ns
    victim.unlink()
    (copy / "footage.json").unlink()
    with pytest.raises(InputError, match="streamguard data footage"):
        FootageClips(copy)
    build_footage([src], copy, seed=0, **SETTINGS)
    assert _clip_bytes(copy) == before
    assert kept.stat().st_mtime_ns == mtime  # existing clip files are kept, not rewritten
    assert json.loads((copy / "footage.json").read_text())["clips"] == json.loads((out / "footage.json").read_text())["clips"]


def test_footage_clips_dataset(footage: tuple[Path, Path]) -> None:
    _, out = footage
    train, test = FootageClips(out, "train"), FootageClips(out, "test")
    meta = json.loads((out / "footage.json").read_text())
    assert len(train) == meta["counts"]["train"] and len(test) == meta["counts"]["test"] >= 3
    clip, label = test[0]
    assert clip.shape == (3, 8, 32, 32) and clip.dtype == torch.float32 and label == 0
    assert 0.0 <= float(clip.min()) and float(clip.max()) <= 1.0
    batch, labels = next(iter(torch.utils.data.DataLoader(train, batch_size=2)))
    assert batch.shape == (2, 3, 8, 32, 32) and labels.tolist() == [0, 0]


def test_corrupt_inputs_skipped_with_warning_count(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    _write_video(src / "good.mp4", 4, frames=12)
    png = cv2.imencode(".png", np.full((40, 40, 3), 128, np.uint8))[1].tobytes()
    (src / "truncated.png").write_bytes(png[:40])  # right magic, undecodable
    (src / "garbage.jpg").write_bytes(b"this is not a jpeg at all")  # wrong magic
    (src / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypisom" + bytes(200))  # an MP4 header and nothing else
    with pytest.warns(FootageWarning, match="skipped 1 footage file"):
        assert find_sources(src) == sorted([src / "broken.mp4", src / "good.mp4", src / "truncated.png"])
    with pytest.warns(FootageWarning, match="skipped 3 footage file"):
        out = build_footage([src], tmp_path / "out", seed=0, **SETTINGS)
    meta = json.loads((out / "footage.json").read_text())
    assert sorted(Path(s["path"]).name for s in meta["skipped"]) == ["broken.mp4", "garbage.jpg", "truncated.png"]
    assert [s["path"] for s in meta["sources"]] == [str(src / "good.mp4")] and len(meta["clips"]) == 3


def test_missing_or_unreadable_footage_is_input_error(footage: tuple[Path, Path], tmp_path: Path) -> None:
    with pytest.raises(InputError, match="run `streamguard data footage"):
        FootageClips(tmp_path)
    _, out = footage
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    ds = FootageClips(copy, "train")
    (copy / ds.records[0]["file"]).write_bytes(b"junk")
    with pytest.raises(InputError, match="unreadable footage clip"):
        ds[0]


def test_cli_data_footage(footage: tuple[Path, Path], tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from streamguard.cli import app

    src, out = footage
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = CliRunner().invoke(app, ["data", "footage", str(src), "--output", str(tmp_path / "cli"), "--size", "32",
                                          "--clip-len", "8", "--clips-per-video", "3", "--clips-per-photo", "2"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "clips (train / test)" in result.output
    assert _clip_bytes(tmp_path / "cli") == _clip_bytes(out)
    missing = CliRunner().invoke(app, ["data", "footage", str(tmp_path / "nope"), "--output", str(tmp_path / "x")])
    assert missing.exit_code == 3 and "not found" in missing.output
