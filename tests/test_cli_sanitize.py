"""``streamguard sanitize`` / ``watch`` end to end: outputs, one-line errors, kill safety, live streams."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_io import audio_packets, free_port, make_video, read_index
from torch import nn
from typer.testing import CliRunner

from streamguard.cli import app
from streamguard.detector import PSPNet
from streamguard.io import open_source
from streamguard.models import build_model, save_model
from streamguard.patchzero import PatchZero, save_defense

runner = CliRunner()


def detector_checkpoint(path: Path, bias: float) -> Path:
    """A tiny untrained PatchZero whose mask is forced to everything (bias > 0) or nothing."""
    detector = PSPNet("mobilenet_v3", aux=False, width=0.25)
    nn.init.constant_(detector.head[-1].bias, bias)
    save_defense(PatchZero(detector, mean=(0.5, 0.5, 0.5), dilate=1), path)
    return path


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    model = build_model("tiny3d", num_classes=3, widths=(4, 4, 4, 4), clip_len=4, size=16)
    save_model(model, root / "model.pt")
    return {"none": detector_checkpoint(root / "none.pt", -30.0), "all": detector_checkpoint(root / "all.pt", 30.0),
            "model": root / "model.pt"}


def one_error_line(result, code: int, *fragments: str) -> None:
    assert result.exit_code == code, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output, result.output
    for fragment in fragments:
        assert fragment in lines[0]


def test_sanitize_round_trip_keeps_frames_order_size_fps_audio(tmp_path: Path, ckpts: dict[str, Path]) -> None:
    src = make_video(tmp_path / "in.mp4", frames=16, fps=12)
    out, preds = tmp_path / "out.mp4", tmp_path / "p.jsonl"
    result = runner.invoke(app, ["sanitize", str(src), "-o", str(out), "--detector", str(ckpts["none"]),
                                 "--model", str(ckpts["model"]), "--predictions", str(preds), "--stride", "4"])
    assert result.exit_code == 0, result.output
    assert "frames with patches" in result.output and "16" in result.output
    with open_source(out) as res:
        assert (res.width, res.height, res.fps, res.frame_count) == (64, 48, 12.0, 16)
        assert [read_index(f.image) for f in res] == list(range(16))
    assert audio_packets(out) == audio_packets(src)
    records = [json.loads(line) for line in preds.read_text().splitlines()]
    assert [(r["start_frame"], r["end_frame"]) for r in records] == [(0, 3), (4, 7), (8, 11), (12, 15)]


def test_sanitize_threshold_and_overlay(tmp_path: Path, ckpts: dict[str, Path]) -> None:
    src = make_video(tmp_path / "in.mp4", frames=8, audio=False)
    out, ov = tmp_path / "out.mp4", tmp_path / "ov.mp4"
    result = runner.invoke(app, ["sanitize", str(src), "-o", str(out), "--detector", str(ckpts["all"]),
                                 "--overlay", str(ov), "--clip-len", "4", "--dilate", "0", "--threshold", "0.9"])
    assert result.exit_code == 0, result.output
    with open_source(out) as res:
        assert all(np.abs(f.image.astype(float) - 128).max() <= 2 for f in res)
    with open_source(ov) as res:
        first = next(iter(res)).image
    assert first.shape == (48, 192, 3) and read_index(first[:, :64]) == 0


def test_corrupt_truncated_and_missing_inputs_give_one_line(tmp_path: Path, ckpts: dict[str, Path]) -> None:
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(np.random.default_rng(0).integers(0, 256, 8192, dtype=np.uint8).tobytes())
    full = make_video(tmp_path / "full.mp4", frames=16, audio=False, faststart=True,
                      image_fn=lambda i, h, w: np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8))
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size * 2 // 3])
    det = ["--detector", str(ckpts["none"])]
    out = str(tmp_path / "out.mp4")
    one_error_line(runner.invoke(app, ["sanitize", str(corrupt), "-o", out, *det]), 3, "corrupt.mp4")
    one_error_line(runner.invoke(app, ["sanitize", str(cut), "-o", out, *det]), 3, "cut.mp4", "truncated")
    one_error_line(runner.invoke(app, ["sanitize", str(tmp_path / "nope.mp4"), "-o", out, *det]), 3, "nope.mp4")
    one_error_line(runner.invoke(app, ["sanitize", str(full), "-o", out, "--detector", "nope.pt"]), 4, "nope.pt")
    one_error_line(runner.invoke(app, ["sanitize", str(full), "-o", out, *det, "--predictions", "p.jsonl"]), 2)
    assert not Path(out).exists() and sorted(p.name for p in tmp_path.iterdir()) == ["corrupt.mp4", "cut.mp4", "full.mp4"]


def start_sanitize(out: Path, detector: Path) -> subprocess.Popen:
    """``streamguard sanitize`` on a long generated clip, in a subprocess, once it is writing."""
    cmd = [sys.executable, "-c", "from streamguard.cli import main; main()", "sanitize",
           "lavfi:testsrc=size=96x64:rate=25:duration=60", "-o", str(out), "--detector", str(detector)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 30
    while not list(out.parent.glob(f".{out.stem}.*.partial.mp4")):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"sanitize did not start writing: {proc.stderr.read().decode()}")
        time.sleep(0.05)
    time.sleep(0.3)
    return proc


@pytest.mark.slow
def test_sigkill_during_sanitize_leaves_no_output(tmp_path: Path, ckpts: dict[str, Path]) -> None:
    out = tmp_path / "out.mp4"
    proc = start_sanitize(out, ckpts["none"])
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()


@pytest.mark.slow
def test_ctrl_c_during_sanitize_keeps_a_playable_output(tmp_path: Path, ckpts: dict[str, Path]) -> None:
    out = tmp_path / "out.mp4"
    proc = start_sanitize(out, ckpts["none"])
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130 and "Traceback" not in stderr.decode()
    with open_source(out) as res:
        assert 1 <= len(list(res)) < 1500
    assert list(tmp_path.glob(".*partial*")) == []


PUSHER = """
import sys, time, av
sys.path.insert(0, sys.argv[2])
from test_io import pattern
url, fps = f"tcp://127.0.0.1:{sys.argv[1]}", 25
while True:  # until the watcher listens
    try:
        container = av.open(url, "w", format="mpegts")
        break
    except OSError:
        time.sleep(0.02)
video = container.add_stream("libx264", rate=fps, options={"tune": "zerolatency", "preset": "ultrafast"})
video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
for i in range(fps * 20):
    frame = av.VideoFrame.from_ndarray(pattern(i % 16), format="rgb24")
    frame.pts = i
    container.mux(video.encode(frame))
    time.sleep(1 / fps)
"""


def test_watch_consumes_a_live_loopback_stream(tmp_path: Path, ckpts: dict[str, Path]) -> None:
    """A real-time MPEG-TS stream from another process (PyAV's open holds the GIL while it listens)."""
    port = free_port()
    pusher = subprocess.Popen([sys.executable, "-c", PUSHER, str(port), str(Path(__file__).parent)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out = tmp_path / "live.mp4"
    try:
        tic = time.monotonic()
        result = runner.invoke(app, ["watch", f"tcp://127.0.0.1:{port}?listen=1", "--duration", "1.5",
                                     "--output", str(out), "--detector", str(ckpts["none"]), "--timeout", "10"])
        elapsed = time.monotonic() - tic
    finally:
        pusher.kill()
        pusher.wait()
    assert result.exit_code == 0, result.output
    assert elapsed < 8
    assert "streamguard watch" in result.output and "dropped" in result.output
    with open_source(out) as res:
        frames = [read_index(f.image) for f in res]
    assert 5 <= len(frames) <= 60
    assert all((b - a) % 16 >= 1 for a, b in zip(frames, frames[1:]))  # in order; drops allowed


def test_watch_stalled_source_times_out(tmp_path: Path, ckpts: dict[str, Path]) -> None:
    port = free_port()
    tic = time.monotonic()
    result = runner.invoke(app, ["watch", f"tcp://127.0.0.1:{port}?listen=1", "--timeout", "0.5",
                                 "--detector", str(ckpts["none"])])
    one_error_line(result, 5, "no answer within 0.5 s")
    assert time.monotonic() - tic < 4


def test_watch_takes_a_recipe(tmp_path: Path, ckpts: dict[str, Path]) -> None:
    """The camera-style recipe sets the model, the detector and the pipeline of a live run."""
    recipe = tmp_path / "live.toml"
    recipe.write_text(
        f'model = {{ name = "tiny3d", weights = "{ckpts["model"]}" }}\n'
        f'defense = {{ weights = "{ckpts["all"]}", temporal = "ema" }}\n'
        "pipeline = { clip_len = 4, stride = 4, batch = 1, queue = 2, topk = 2 }\n"
    )
    predictions = tmp_path / "p.jsonl"
    result = runner.invoke(app, ["watch", "lavfi:testsrc=size=32x32:rate=25", "--duration", "1", "--recipe", str(recipe),
                                 "--predictions", str(predictions)])  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in predictions.read_text().splitlines()]
    clips = [r for r in lines if "topk" in r]
    assert clips and all(len(r["topk"]) == 2 for r in clips)  # the recipe's topk; live windows may skip frames
    bad = runner.invoke(app, ["watch", "lavfi:testsrc", "--recipe", str(tmp_path / "absent.toml")])
    one_error_line(bad, 2, "recipe not found")


def _table_value(output: str, row: str) -> str:
    import re

    match = re.search(rf"{re.escape(row)}\s*│\s*([^│]+?)\s*│", output)
    assert match, output
    return match.group(1)


def test_progress_in_a_log_file_is_plain_lines(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Not a terminal (``nohup streamguard train ... > log``): a plain line at most every
    ``PLAIN_EVERY`` seconds and one at the end, so a background run's log shows where it is."""
    from streamguard.cli import common

    monkeypatch.setenv("STREAMGUARD_NO_PROGRESS", "0")
    monkeypatch.setattr(common, "PLAIN_EVERY", 1e9)
    with common.progress_bar("evaluate", 4, "metrics") as update:
        for done in (1, 2, 3):
            update(completed=done, metrics=f"loss {done / 10:.1f}")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith("evaluate  1/4  ") and lines[0].endswith("loss 0.1")
    assert lines[1].startswith("evaluate  3/4  ") and "left" in lines[1] and lines[1].endswith("loss 0.3")
    monkeypatch.setenv("STREAMGUARD_NO_PROGRESS", "1")
    with common.progress_bar("evaluate", 4) as update:
        assert update is None
    assert capsys.readouterr().err == ""


def test_plain_progress_times_a_resumed_run_by_its_own_work(monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """A run resumed at 60 of 100 that does 10 more in 50 s has 150 s left, not the 25 s that 70 done in
    50 s would say (``evaluate`` reports the resumed count first, before any work of its own)."""
    import time

    from streamguard.cli import common

    now = [0.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    monkeypatch.setenv("STREAMGUARD_NO_PROGRESS", "0")
    monkeypatch.setattr(common, "PLAIN_EVERY", 1e9)
    with common.progress_bar("evaluate", 100) as update:
        update(completed=60)
        now[0] = 50.0
        update(completed=70)
    first, last = capsys.readouterr().err.splitlines()
    assert first == "evaluate  60/100  0 s", first  # nothing of its own done yet: no estimate
    assert last == "evaluate  70/100  50 s  ~150 s left", last


def test_watch_paces_a_file_prints_status_lines_and_snapshots(tmp_path: Path, ckpts: dict[str, Path],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """``watch`` on a 25 fps file reads it at 25 fps (not as fast as it decodes): about 50 frames in 2 s."""
    import cv2

    monkeypatch.setenv("STREAMGUARD_NO_PROGRESS", "0")  # stderr is not a terminal: plain status lines
    src = make_video(tmp_path / "25fps.mp4", frames=150, fps=25, audio=False)
    snap, preds = tmp_path / "snap.jpg", tmp_path / "p.jsonl"
    result = runner.invoke(app, ["watch", str(src), "--duration", "2", "--detector", str(ckpts["none"]),
                                 "--model", str(ckpts["model"]), "--predictions", str(preds), "--vid-stride", "2",
                                 "--snapshot", str(snap), "--snapshot-every", "0.5"])  # fmt: skip
    assert result.exit_code == 0, result.output
    frames, dropped = int(_table_value(result.stdout, "frames")), int(_table_value(result.stdout, "dropped"))
    assert 40 <= frames + dropped <= 60 and dropped <= 2  # paced; a tiny model keeps up
    assert _table_value(result.stdout, "paced (realtime)") == "yes"
    assert _table_value(result.stdout, "model stride").startswith("every 2")
    status = [line for line in result.stderr.splitlines() if "latency p50" in line]
    assert 1 <= len(status) <= 4 and all("fps" in line and "dropped" in line for line in status)
    records = [json.loads(line) for line in preds.read_text().splitlines()]
    assert records and all(r["vid_stride"] == 2 for r in records)
    assert len(records) <= (frames // 4 + 1) // 2 + 1  # every 2nd window of 4 frames
    assert cv2.imread(str(snap)).shape == (48, 3 * 64, 3)
    fast = runner.invoke(app, ["watch", str(src), "--no-realtime", "--detector", str(ckpts["none"])])
    assert fast.exit_code == 0, fast.output
    assert _table_value(fast.stdout, "paced (realtime)") == "no"
    assert int(_table_value(fast.stdout, "frames")) + int(_table_value(fast.stdout, "dropped")) == 150


def test_watch_demuxer_options_reach_the_container(tmp_path: Path, ckpts: dict[str, Path],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import streamguard.io

    opened = []
    real_open = streamguard.io.open_source

    def spy(*args, **kwargs):
        source = real_open(*args, **kwargs)
        opened.append((kwargs, source.container.flags))
        return source

    monkeypatch.setattr(streamguard.io, "open_source", spy)
    result = runner.invoke(app, ["watch", "lavfi:testsrc=size=32x32:rate=25", "--duration", "0.3", "--detector",
                                 str(ckpts["none"]), "--demuxer-option", "fflags=+nobuffer",
                                 "--demuxer-option", "probesize=32"])  # fmt: skip
    assert result.exit_code == 0, result.output
    (kwargs, flags), = opened
    assert kwargs["options"] == {"fflags": "+nobuffer", "probesize": "32"} and kwargs["realtime"] is True
    assert flags & 0x40  # AVFMT_FLAG_NOBUFFER set on the container
    bad = runner.invoke(app, ["watch", "lavfi:testsrc", "--demuxer-option", "fflags", "--detector", str(ckpts["none"])])
    one_error_line(bad, 2, "--demuxer-option", "KEY=VALUE")


def test_sanitize_vid_stride_and_snapshot(tmp_path: Path, ckpts: dict[str, Path]) -> None:
    src = make_video(tmp_path / "in.mp4", frames=16, audio=False)
    out, preds, snap = tmp_path / "out.mp4", tmp_path / "p.jsonl", tmp_path / "snap.jpg"
    result = runner.invoke(app, ["sanitize", str(src), "-o", str(out), "--detector", str(ckpts["none"]),
                                 "--model", str(ckpts["model"]), "--predictions", str(preds), "--stride", "4",
                                 "--vid-stride", "2", "--snapshot", str(snap)])  # fmt: skip
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in preds.read_text().splitlines()]
    assert [(r["start_frame"], r["vid_stride"]) for r in records] == [(0, 2), (8, 2)]
    assert _table_value(result.stdout, "model stride") == "every 2 (2 model runs)"
    with open_source(out) as res:
        assert res.frame_count == 16  # every frame sanitized and written
    assert snap.read_bytes()[:2] == b"\xff\xd8"


def _spy_on_defenses(monkeypatch: pytest.MonkeyPatch, attribute: str) -> list[Any]:
    """The ``attribute`` of every defense the one factory builds from now on, in order."""
    import streamguard.patchzero as patchzero

    seen: list[Any] = []
    build = patchzero.build_defense

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        defense = build(*args, **kwargs)
        seen.append(getattr(defense, attribute))
        return defense

    monkeypatch.setattr(patchzero, "build_defense", spy)
    return seen


def test_imgsz_and_the_recipes_input_size_reach_the_defense(tmp_path: Path, ckpts: dict[str, Path],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """One factory: ``--imgsz`` over the recipe's ``defense.input_size`` over the weights' own working size."""
    sizes = _spy_on_defenses(monkeypatch, "input_size")
    src = make_video(tmp_path / "in.mp4", frames=8, audio=False)
    recipe = tmp_path / "small.toml"
    recipe.write_text('extends = "camera"\n\n[defense]\ninput_size = 32\n')
    base = ["sanitize", str(src), "-o", str(tmp_path / "out.mp4"), "--detector", str(ckpts["none"])]
    for extra in ([], ["--recipe", str(recipe)], ["--recipe", str(recipe), "--imgsz", "24"], ["--imgsz", "40"]):
        result = runner.invoke(app, base + extra)
        assert result.exit_code == 0, result.output
    assert sizes == [None, (32, 32), (24, 24), (40, 40)]


def test_complete_reaches_the_defense_and_a_bad_value_is_one_line(tmp_path: Path, ckpts: dict[str, Path],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """``--complete`` over the recipe's ``defense.complete`` over the weights' (none)."""
    seen = _spy_on_defenses(monkeypatch, "complete")
    src = make_video(tmp_path / "in.mp4", frames=8, audio=False)
    recipe = tmp_path / "hull.toml"
    recipe.write_text('extends = "camera"\n\n[defense]\ncomplete = "hull"\n')
    base = ["sanitize", str(src), "-o", str(tmp_path / "out.mp4"), "--detector", str(ckpts["none"])]
    for extra in ([], ["--complete", "box"], ["--recipe", str(recipe)], ["--recipe", str(recipe), "--complete", "none"],
                  ["--complete", "square"], ["--complete", "cover"]):  # fmt: skip
        result = runner.invoke(app, base + extra)
        assert result.exit_code == 0, result.output
    assert seen == ["none", "box", "hull", "none", "square", "cover"]
    bad = runner.invoke(app, base + ["--complete", "circle"])
    assert bad.exit_code != 0 and "defense.complete" in bad.output and "Traceback" not in bad.output


def test_min_core_reaches_the_defense(tmp_path: Path, ckpts: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """``--min-core`` over the recipe's ``defense.min_core`` over the weights' (0), for one video and for many."""
    seen = _spy_on_defenses(monkeypatch, "min_core")
    src = make_video(tmp_path / "in.mp4", frames=8, audio=False)
    recipe = tmp_path / "specks.toml"
    recipe.write_text('extends = "camera"\n\n[defense]\nmin_core = 4\n')
    base = ["sanitize", str(src), "-o", str(tmp_path / "out.mp4"), "--detector", str(ckpts["none"])]
    for extra in ([], ["--min-core", "2"], ["--recipe", str(recipe)], ["--recipe", str(recipe), "--min-core", "0"]):
        result = runner.invoke(app, base + extra)
        assert result.exit_code == 0, result.output
    many = runner.invoke(app, ["sanitize", str(tmp_path / "in*.mp4"), "-o", str(tmp_path / "many"), "--detector",
                               str(ckpts["none"]), "--min-core", "3"])  # fmt: skip
    assert many.exit_code == 0, many.output
    assert seen == [0, 2, 4, 0, 3]
