"""``sanitize`` over many videos: folders, globs, list files, a worker pool, failures reported and skipped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_cli_sanitize import detector_checkpoint
from test_io import make_video, read_index
from typer.testing import CliRunner

from streamguard.batch import (
    SanitizeSettings,
    expand_inputs,
    is_batch_input,
    plan_outputs,
    sanitize_many,
    worker_threads,
)
from streamguard.cli import app
from streamguard.errors import CheckpointError, ConfigError, InputError
from streamguard.io import open_source
from streamguard.models import build_model, save_model

runner = CliRunner()
NAMES = ("a.mp4", "b.mp4", "c.mov")


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("batch")
    model = build_model("tiny3d", num_classes=3, widths=(4, 4, 4, 4), clip_len=4, size=16)
    save_model(model, root / "model.pt")
    clips = root / "clips"
    clips.mkdir()
    for i, name in enumerate(NAMES):
        make_video(clips / name, frames=8 + 4 * i, audio=i == 0)
    (clips / "notes.txt").write_text("not a video")
    (clips / ".hidden.mp4").write_bytes(b"")
    return {"none": detector_checkpoint(root / "none.pt", -30.0), "all": detector_checkpoint(root / "all.pt", 30.0),
            "model": root / "model.pt", "clips": clips, "root": root}  # fmt: skip


def _frames(folder: Path) -> dict[str, bytes]:
    """The decoded frames of every MP4 and the bytes of every other file under ``folder``.

    (libx264 in one long-lived process has been seen to encode identical frames to a bitstream one
    byte apart, decoding to the same pixels, so outputs are compared by their frames.)
    """
    content = {}
    for p in sorted(folder.rglob("*")):
        if p.suffix == ".mp4":
            with open_source(p) as res:
                content[str(p.relative_to(folder))] = b"".join(f.image.tobytes() for f in res)
        elif p.is_file():
            content[str(p.relative_to(folder))] = p.read_bytes()
    return content


def test_expand_inputs_folder_glob_and_list(assets: dict[str, Path], tmp_path: Path) -> None:
    clips = assets["clips"]
    videos = [str(clips / n) for n in sorted(NAMES)]
    assert expand_inputs(str(clips)) == videos  # videos only, hidden files skipped, sorted
    assert expand_inputs(str(clips / "*.mp4")) == videos[:2]
    listing = tmp_path / "list.txt"
    listing.write_text(f"# clips\n{clips / 'c.mov'}\n\n  {clips / 'a.mp4'}  \nlavfi:testsrc\n")
    assert expand_inputs(f"@{listing}") == [str(clips / "c.mov"), str(clips / "a.mp4"), "lavfi:testsrc"]
    (tmp_path / "rel.txt").write_text("x/y.mp4\n")  # relative to the list file's folder
    assert expand_inputs(f"@{tmp_path / 'rel.txt'}") == [str(tmp_path / "x" / "y.mp4")]
    # one input stays one input, as before: a file, a URL with "?", a graph
    for single in (str(clips / "a.mp4"), "tcp://127.0.0.1:5000?listen=1", "lavfi:testsrc=size=32x32"):
        assert not is_batch_input(single) and expand_inputs(single) == [single]
    for empty in (str(tmp_path / "*.mkv"), str(tmp_path)):
        with pytest.raises(InputError):
            expand_inputs(empty)
    with pytest.raises(ConfigError, match="both write a.mp4"):
        plan_outputs([str(clips / "a.mp4"), str(tmp_path / "a.mkv")], tmp_path / "out")
    with pytest.raises(ConfigError, match="overwrite an input"):
        plan_outputs([str(clips / "a.mp4")], clips)
    assert worker_threads(2, cores=16) == 8 and worker_threads(4, cores=2) == 1


def test_one_corrupt_video_is_reported_and_the_rest_go_on(assets: dict[str, Path], tmp_path: Path) -> None:
    clips = tmp_path / "in"
    clips.mkdir()
    make_video(clips / "one.mp4", frames=8, audio=False)
    (clips / "two.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 8192, dtype=np.uint8).tobytes())
    make_video(clips / "three.mp4", frames=12, audio=False)
    out = tmp_path / "out"
    result = runner.invoke(app, ["sanitize", str(clips), "-o", str(out), "--detector", str(assets["none"])])
    assert result.exit_code == 3, result.output
    failures = [line for line in result.stderr.splitlines() if line.startswith("failed:")]
    assert len(failures) == 1 and "two.mp4" in failures[0]
    assert result.stderr.strip().splitlines()[-1] == "error: 1 of 3 videos failed: two.mp4"
    assert "2 done, 1 failed" in result.stdout and "Traceback" not in result.output
    for row, status in (("one.mp4", "done"), ("three.mp4", "done"), ("two.mp4", "failed")):
        assert any(row in line and status in line for line in result.stdout.splitlines()), result.stdout
    assert sorted(p.name for p in out.iterdir()) == ["one.mp4", "three.mp4"]  # no partial files left behind
    with open_source(out / "three.mp4") as res:
        assert [read_index(f.image) for f in res] == list(range(12))


def test_folder_and_list_file_give_the_same_outputs(assets: dict[str, Path], tmp_path: Path) -> None:
    det = ["--detector", str(assets["all"]), "--model", str(assets["model"]), "--stride", "4"]
    by_folder, by_list, by_option = tmp_path / "folder", tmp_path / "list", tmp_path / "option"
    listing = tmp_path / "videos.txt"
    listing.write_text("".join(f"{assets['clips'] / n}\n" for n in NAMES))
    for args in ([str(assets["clips"]), "-o", str(by_folder), "--predictions", str(by_folder / "p")],
                 [f"@{listing}", "-o", str(by_list), "--predictions", str(by_list / "p")],
                 ["--inputs", str(listing), "-o", str(by_option), "--predictions", str(by_option / "p")]):  # fmt: skip
        result = runner.invoke(app, ["sanitize", *args, *det])
        assert result.exit_code == 0, result.output
        assert "3 done, 0 failed" in result.stdout
    assert sorted(p.name for p in by_folder.iterdir()) == ["a.mp4", "b.mp4", "c.mp4", "p"]
    assert sorted(p.name for p in (by_folder / "p").iterdir()) == ["a.jsonl", "b.jsonl", "c.jsonl"]
    assert _frames(by_list) == _frames(by_folder) == _frames(by_option)
    records = [json.loads(line) for line in (by_folder / "p" / "c.jsonl").read_text().splitlines()]
    assert len(records) == 16 // 4  # c.mov: 16 frames in windows of 4
    with open_source(by_folder / "a.mp4") as res:  # the "everything" detector repaints every pixel gray
        assert all(np.abs(f.image.astype(float) - 128).max() <= 2 for f in res)


def test_two_workers_write_the_same_outputs_as_one(assets: dict[str, Path], tmp_path: Path) -> None:
    settings = SanitizeSettings(detector=str(assets["none"]), model=str(assets["model"]), stride=4)
    seen = []
    outs = {}
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        results = sanitize_many(str(assets["clips"]), out, workers=workers, settings=settings,
                                predictions_dir=out / "p", on_result=lambda r: seen.append(r.input))  # fmt: skip
        assert [Path(r.input).name for r in results] == sorted(NAMES)  # input order, whatever finished first
        assert all(r.ok and r.output == out / f"{Path(r.input).stem}.mp4" for r in results)
        assert [r.frames for r in results] == [8, 12, 16]
        outs[workers] = _frames(out)
    assert sorted(outs[1]) == ["a.mp4", "b.mp4", "c.mp4", "p/a.jsonl", "p/b.jsonl", "p/c.jsonl"]
    assert outs[2] == outs[1]  # the same frames and predictions (x264's bytes can differ: see _frames)
    assert sorted(seen) == sorted(str(assets["clips"] / n) for n in NAMES * 2)


def test_settings_errors_stop_the_batch(assets: dict[str, Path], tmp_path: Path) -> None:
    clips = str(assets["clips"])
    with pytest.raises(CheckpointError, match="nope.pt"):
        sanitize_many(clips, tmp_path / "o", settings=SanitizeSettings(detector=str(tmp_path / "nope.pt")))
    bad = runner.invoke(app, ["sanitize", clips, "-o", str(tmp_path / "o"), "--detector", str(tmp_path / "nope.pt")])
    assert bad.exit_code == 4 and bad.output.strip().startswith("error: ") and "nope.pt" in bad.output
    for args, fragment in ((["-o", str(tmp_path / "x.mp4")], "output folder"),
                           (["-o", str(tmp_path / "o"), "--predictions", str(tmp_path / "p")], "--predictions needs"),
                           (["-o", str(tmp_path / "o"), "--snapshot", str(tmp_path / "s.jpg")], "--snapshot")):  # fmt: skip
        result = runner.invoke(app, ["sanitize", clips, *args, "--detector", str(assets["none"])])
        assert result.exit_code == 2 and fragment in result.output, result.output
    assert runner.invoke(app, ["sanitize", "-o", str(tmp_path / "o")]).exit_code == 2  # no input at all


@pytest.mark.slow
def test_ray_writes_the_same_outputs_as_local_workers(assets: dict[str, Path], tmp_path: Path) -> None:
    """``sanitize --ray local`` (the ray extra): actors load the model once and write what a local run writes."""
    pytest.importorskip("ray")
    clips = tmp_path / "in"
    clips.mkdir()
    for name in NAMES[:2]:
        (clips / name).write_bytes((assets["clips"] / name).read_bytes())
    (clips / "bad.mp4").write_bytes(b"\x00" * 4096)
    args = ["--detector", str(assets["none"]), "--model", str(assets["model"]), "--stride", "4"]
    local, on_ray = tmp_path / "local", tmp_path / "ray"
    runner.invoke(app, ["sanitize", str(clips), "-o", str(local), "--predictions", str(local / "p"), *args])
    # in its own process: Ray's driver keeps threads and memory that would disturb the tests after it
    env = {**os.environ, "STREAMGUARD_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "streamguard", "sanitize", str(clips), "-o", str(on_ray), "--predictions",
                             str(on_ray / "p"), "--ray", "local", "--workers", "2", *args],
                            capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert result.returncode == 3, result.stderr[-2000:]  # bad.mp4 failed, the others went on
    assert "2 done, 1 failed" in result.stdout and "bad.mp4" in result.stderr
    assert _frames(on_ray) == _frames(local) and sorted(p.name for p in on_ray.iterdir()) == ["a.mp4", "b.mp4", "p"]
