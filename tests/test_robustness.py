"""Hardening (issue 7): malformed media, live stream faults, bad checkpoints and recipes, kills, load.

Every CLI call runs under a timeout (a worker thread for in-process calls, ``subprocess`` timeouts
for real processes), so a hang fails the test instead of freezing the run.
"""

from __future__ import annotations

import _thread
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from fuzz_media import (
    MALFORMED,
    VFR_PTS,
    FaultyStreamServer,
    build_case,
    corrupt,
    kill_while_writing,
    mdat_range,
    png_header_image,
    read_index,
    truncate,
    write_video,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from typer.testing import CliRunner, Result

from streamguard.checkpoints import load_checkpoint, save_checkpoint, sha256_file
from streamguard.cli import app
from streamguard.detector import PSPNet
from streamguard.errors import InputError
from streamguard.io import open_source
from streamguard.models import build_model, save_model
from streamguard.patchzero import PatchZero, save_defense
from streamguard.pipeline import Pipeline

runner = CliRunner()
CLI = [sys.executable, "-c", "from streamguard.cli import main; main()"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "STREAMGUARD_NO_PROGRESS": "1"}


def invoke(args: list[str], timeout: float = 30.0) -> Result:
    """``streamguard ARGS`` in-process, in a worker thread: a call running past ``timeout`` is a hang."""
    box: dict[str, Result] = {}
    worker = threading.Thread(target=lambda: box.setdefault("result", runner.invoke(app, args)), daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        pytest.fail(f"streamguard {' '.join(args)} hung (> {timeout:g} s)")
    return box["result"]


def assert_one_error_line(result: Result, code: int, *fragments: str) -> str:
    assert result.exit_code == code, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def assert_nothing_written(folder: Path) -> None:
    """No output and no temporary leftovers (hidden partial files) in ``folder``."""
    assert not folder.exists() or sorted(p.name for p in folder.iterdir()) == []


def frames_of(path: Path) -> list[np.ndarray]:
    with open_source(path) as src:
        return [frame.image for frame in src]


@pytest.fixture(scope="module")
def detector(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny untrained PatchZero that masks nothing (output == input up to the codec)."""
    net = PSPNet("mobilenet_v3", aux=False, width=0.25)
    nn.init.constant_(net.head[-1].bias, -30.0)
    path = tmp_path_factory.mktemp("det") / "none.pt"
    save_defense(PatchZero(net, mean=(0.5, 0.5, 0.5), dilate=1), path)
    return path


# ---------------------------------------------------------------- malformed media


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_input_is_sanitized_or_refused_in_one_line(name: str, tmp_path: Path, detector: Path) -> None:
    case = MALFORMED[name]
    src = build_case(name, tmp_path)
    out = tmp_path / "out" / "clean.mp4"
    result = invoke(["sanitize", str(src), "-o", str(out), "--detector", str(detector)])
    if case.expect == "ok" or (case.expect == "either" and result.exit_code == 0):
        assert result.exit_code == 0, result.output
        assert sorted(p.name for p in out.parent.iterdir()) == ["clean.mp4"]
        images = frames_of(out)
        assert len(images) == case.frames
        if name != "corrupt_packets":
            assert [read_index(im) for im in images] == [i % 16 for i in range(case.frames)]
    else:
        assert_one_error_line(result, 3, src.name, case.fragment)
        assert_nothing_written(out.parent)


def test_odd_sizes_are_padded_and_resolution_changes_keep_the_first_size(tmp_path: Path, detector: Path) -> None:
    for name, size in (("odd_size", (48, 34)), ("resolution_change", (48, 64))):
        out = tmp_path / f"{name}.mp4"
        result = invoke(["sanitize", str(build_case(name, tmp_path)), "-o", str(out), "--detector", str(detector)])
        assert result.exit_code == 0, result.output
        assert {im.shape[:2] for im in frames_of(out)} == {size}


def test_variable_frame_rate_keeps_its_timing(tmp_path: Path, detector: Path) -> None:
    out = tmp_path / "vfr.mp4"
    result = invoke(["sanitize", str(build_case("vfr", tmp_path)), "-o", str(out), "--detector", str(detector)])
    assert result.exit_code == 0, result.output
    with open_source(out) as src:
        times = [frame.time for frame in src]
    assert times == pytest.approx([t / 1000 for t in VFR_PTS], abs=2e-3)


def test_huge_dimensions_are_refused_from_the_header(tmp_path: Path) -> None:
    """8192x8192 decodes to 201 MB of RGB: refused before the first frame is decoded."""
    path = png_header_image(tmp_path / "huge.png", 8192, 8192)
    tic = time.monotonic()
    with pytest.raises(InputError, match=r"huge\.png.*8192x8192.*pixels"):
        open_source(path)
    assert time.monotonic() - tic < 1.0


@pytest.fixture(scope="module")
def valid_mp4(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return write_video(tmp_path_factory.mktemp("valid") / "v.mp4", frames=12).read_bytes()


def _damaged_input_outcome(data: bytes, cut: float, hits: list[tuple[int, int]], folder: Path, detector: Path) -> None:
    """Sanitize ``data`` with bytes flipped in its packets and cut at ``cut``: 12 frames or exit 3."""
    start, end = mdat_range(data)
    offsets = [start + o % (end - start) for o, _ in hits]
    damaged = truncate(corrupt(data, offsets, [x for _, x in hits]), cut)
    src, out = folder / "in" / "damaged.mp4", folder / "out" / "clean.mp4"
    src.parent.mkdir(parents=True, exist_ok=True)
    src.write_bytes(damaged)
    for stale in out.parent.glob("*") if out.parent.exists() else []:
        stale.unlink()
    result = invoke(["sanitize", str(src), "-o", str(out), "--detector", str(detector)])
    if result.exit_code == 0:
        assert len(frames_of(out)) == 12
    else:
        assert_one_error_line(result, 3, "damaged.mp4")
        assert_nothing_written(out.parent)
    if cut == 1.0 and not hits:
        assert result.exit_code == 0


DAMAGE = {
    "cut": st.one_of(st.just(1.0), st.floats(0.0, 1.0)),
    "hits": st.lists(st.tuples(st.integers(0, 2**20), st.integers(1, 255)), max_size=6),
}


@settings(max_examples=8, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(**DAMAGE)
def test_damaged_mp4_is_sanitized_or_refused(valid_mp4: bytes, tmp_path: Path, detector: Path,
                                             cut: float, hits: list[tuple[int, int]]) -> None:  # fmt: skip
    _damaged_input_outcome(valid_mp4, cut, hits, tmp_path, detector)


@pytest.mark.slow
@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(**DAMAGE)
def test_damaged_mp4_is_sanitized_or_refused_many(valid_mp4: bytes, tmp_path: Path, detector: Path,
                                                  cut: float, hits: list[tuple[int, int]]) -> None:  # fmt: skip
    _damaged_input_outcome(valid_mp4, cut, hits, tmp_path, detector)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["truncated", "zero_length", "audio_only", "huge_y4m", "resolution_change"])
def test_malformed_input_in_a_real_process(name: str, tmp_path: Path, detector: Path) -> None:
    """The real entry point: exit code, and stderr is exactly one line (no FFmpeg log noise)."""
    case = MALFORMED[name]
    src = build_case(name, tmp_path)
    out = tmp_path / "out" / "clean.mp4"
    proc = subprocess.run([*CLI, "sanitize", str(src), "-o", str(out), "--detector", str(detector)],
                          capture_output=True, text=True, timeout=120, env=ENV)  # fmt: skip
    if case.expect == "ok":
        assert proc.returncode == 0 and proc.stderr == "", proc.stderr
        assert len(frames_of(out)) == case.frames
    else:
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 3 and len(lines) == 1 and src.name in lines[0], proc.stderr
        assert_nothing_written(out.parent)


# ---------------------------------------------------------------- live stream faults


def _watch(url: str, out: Path, detector: Path, *extra: str) -> list[str]:
    return ["watch", url, "-o", str(out), "--detector", str(detector), "--timeout", "1", *extra]


def _indices(path: Path) -> list[int]:
    return [read_index(image) for image in frames_of(path)]


def test_watch_recovers_from_a_stall_and_a_drop_then_gives_up(tmp_path: Path, detector: Path) -> None:
    out = tmp_path / "live.mp4"
    with FaultyStreamServer([("stall", 24), ("drop", 24)]) as server:
        tic = time.monotonic()
        result = invoke(_watch(server.url, out, detector, "--reconnect", "1"), timeout=30)
        elapsed = time.monotonic() - tic
    assert server.connections == 2
    assert result.exit_code == 5, result.output
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith("error: ") and "reconnect" in lines[-1] and "Traceback" not in result.output
    assert "stalled" in result.output and "reconnecting" in result.output
    assert elapsed < 12
    indices = _indices(out)  # kept, playable, in order
    assert 16 <= len(indices) <= 48
    assert all((b - a) % 16 >= 1 for a, b in zip(indices, indices[1:]))


@pytest.mark.slow
def test_watch_survives_every_fault_kind(tmp_path: Path, detector: Path) -> None:
    out = tmp_path / "live.mp4"
    plan = [("drop", 24), ("stall", 24), ("garbage", 24), ("ok", 24)]
    with FaultyStreamServer(plan) as server:
        result = invoke(_watch(server.url, out, detector, "--reconnect", "2"), timeout=60)
    assert server.connections == 4
    assert result.exit_code == 5 and "gave up" in result.output.strip().splitlines()[-1], result.output
    assert len(frames_of(out)) >= 48


def test_watch_without_reconnect_fails_fast_and_keeps_the_recording(tmp_path: Path, detector: Path) -> None:
    out = tmp_path / "live.mp4"
    with FaultyStreamServer([("drop", 40)]) as server:
        result = invoke(_watch(server.url, out, detector), timeout=20)
    assert_one_error_line(result, 5, server.url)
    assert len(frames_of(out)) >= 16


def test_interrupting_the_open_of_a_silent_stream_returns_at_once() -> None:
    """Ctrl-C while FFmpeg waits for a source that accepted the connection but sends nothing: the
    open timeout (30 s) is not waited out."""
    import socket

    from streamguard.io import open_source

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)

        def interrupt() -> None:
            time.sleep(0.5)
            interrupted.append(time.monotonic())
            _thread.interrupt_main()

        interrupted: list[float] = []
        threading.Thread(target=interrupt, daemon=True).start()
        with pytest.raises(KeyboardInterrupt):
            open_source(f"tcp://127.0.0.1:{server.getsockname()[1]}", live=True, timeout=30)
        assert time.monotonic() - interrupted[0] < 2.0


def test_interrupting_a_stalled_watch_returns_quickly_with_a_playable_file(tmp_path: Path, detector: Path) -> None:
    """Ctrl-C while the source is silent (and the read timeout is long) still stops within seconds."""
    out = tmp_path / "live.mp4"
    with FaultyStreamServer([("stall", 40)]) as server:

        def interrupt_when_stalled() -> None:
            while server.sent < 40:
                time.sleep(0.05)
            time.sleep(1.0)
            interrupted.append(time.monotonic())
            _thread.interrupt_main()

        interrupted: list[float] = []
        threading.Thread(target=interrupt_when_stalled, daemon=True).start()
        result = runner.invoke(app, _watch(server.url, out, detector)[:-1] + ["60"])
        stopped = time.monotonic()
    assert interrupted and stopped - interrupted[0] < 3.0
    assert result.exit_code in (0, 130), result.output
    assert len(_indices(out)) >= 16


@pytest.mark.slow
def test_sigint_on_a_stalled_watch_process(tmp_path: Path, detector: Path) -> None:
    out = tmp_path / "live.mp4"
    with FaultyStreamServer([("stall", 40)]) as server:
        proc = subprocess.Popen([*CLI, *_watch(server.url, out, detector)[:-1], "60"], env=ENV,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        try:
            deadline = time.monotonic() + 90
            while server.sent < 40 and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(1.0)
            proc.send_signal(signal.SIGINT)
            tic = time.monotonic()
            stdout, stderr = proc.communicate(timeout=10)
            assert time.monotonic() - tic < 5, stderr
        finally:
            proc.kill()
    assert proc.returncode in (0, 130), stderr
    assert "Traceback" not in stderr
    assert len(_indices(out)) >= 16


class _SlowDefense:
    """Sanitize protocol test double: identity, ``delay`` seconds per call (a pipeline at ~1/delay calls/s)."""

    def __init__(self, delay: float) -> None:
        self.delay = delay

    def sanitize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        time.sleep(self.delay)
        return x, torch.zeros_like(x[:, :1])


def test_live_overload_drops_frames_but_keeps_latency_bounded(tmp_path: Path) -> None:
    """A realtime source at 2x what the defense sustains: newest frames win, latency stays small."""
    source = open_source("lavfi:testsrc=size=64x48:rate=40,realtime", live=True)
    with source:
        pipeline = Pipeline(source, _SlowDefense(delay=0.1), clip_len=2, batch=1, duration=2.0,
                            output=tmp_path / "live.mp4")  # fmt: skip
        summary = pipeline.run()
    assert summary.dropped >= 0.25 * (summary.frames + summary.dropped)
    assert summary.latency_max < 0.6
    assert 0.1 <= summary.latency_p50 <= summary.latency_p95 <= summary.latency_max  # each frame sits out a call
    assert len(frames_of(tmp_path / "live.mp4")) == summary.frames


# ---------------------------------------------------------------- checkpoints and recipes


class _Payload:
    """Pickles as ``os.system(COMMAND)``: runs it if anything unpickles it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return os.system, (f"touch {self.marker}",)


def test_malicious_pickle_checkpoint_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "meta": {"x": _Payload(marker)}}, evil)
    with open(tmp_path / "raw.pt", "wb") as f:
        pickle.dump(_Payload(marker), f, protocol=2)
    out = str(tmp_path / "out.mp4")
    for path in (evil, tmp_path / "raw.pt"):
        for option in ("--detector", "--model"):
            result = invoke(["sanitize", "lavfi:testsrc=size=32x32:rate=4:duration=1", "-o", out, option, str(path)])
            assert_one_error_line(result, 4, path.name)
    assert not marker.exists()
    assert not Path(out).exists()


def test_truncated_tampered_and_mismatched_checkpoints_name_the_problem(tmp_path: Path, detector: Path) -> None:
    video = "lavfi:testsrc=size=32x32:rate=4:duration=1"
    out = str(tmp_path / "out.mp4")
    data = detector.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    assert_one_error_line(invoke(["sanitize", video, "-o", out, "--detector", str(truncated)]), 4, "truncated.pt")
    model = build_model("tiny3d", num_classes=3, widths=(4, 4, 4, 4), clip_len=4, size=16)
    save_model(model, tmp_path / "classifier.pt")
    line = assert_one_error_line(invoke(["sanitize", video, "-o", out, "--detector", str(tmp_path / "classifier.pt")]),
                                 4, "classifier.pt")  # fmt: skip
    assert "backbone" in line
    state, meta = load_checkpoint(detector)
    save_checkpoint(tmp_path / "resnet.pt", state, {**meta, "backbone": "resnet18"})
    line = assert_one_error_line(invoke(["sanitize", video, "-o", out, "--detector", str(tmp_path / "resnet.pt")]),
                                 4, "resnet.pt")  # fmt: skip
    assert "does not match the network" in line and "missing (" in line
    assert not Path(out).exists()


def test_shipped_weights_with_a_wrong_hash_are_refused(tmp_path: Path, detector: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    import json

    import streamguard.checkpoints as checkpoints

    weights = tmp_path / "weights"
    weights.mkdir()
    tampered = bytearray(detector.read_bytes())
    (weights / "det.pt").write_bytes(detector.read_bytes())
    manifest = {"tiny-det": {"file": "det.pt", "sha256": sha256_file(detector), "kind": "detector", "meta": {}}}
    (weights / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setattr(checkpoints, "WEIGHTS_DIR", weights)
    video, out = "lavfi:testsrc=size=32x32:rate=4:duration=1", tmp_path / "out.mp4"
    assert invoke(["sanitize", video, "-o", str(out), "--detector", "tiny-det"]).exit_code == 0
    tampered[len(tampered) // 2] ^= 0xFF
    (weights / "det.pt").write_bytes(bytes(tampered))
    out.unlink()
    result = invoke(["sanitize", video, "-o", str(out), "--detector", "tiny-det"])
    assert_one_error_line(result, 4, "det.pt", "sha256")
    assert not out.exists()


@pytest.mark.parametrize(
    ("toml", "field"),
    [
        ("[defense]\ntreshold = 0.4\n", "defense.treshold"),
        ("[pipeline]\nbatch = \"four\"\n", "pipeline.batch"),
        ("[model]\nname = 3\n", "model.name"),
        ("colour = true\n", "colour"),
        ("[defense\nthreshold = 0.4\n", "not valid TOML"),
        ("[defense]\ntemporal = \"max\"\n", "defense.temporal"),
    ],
)
def test_bad_recipe_names_the_field(toml: str, field: str, tmp_path: Path, detector: Path) -> None:
    recipe = tmp_path / "bad.toml"
    recipe.write_text(toml)
    out = tmp_path / "out.mp4"
    result = invoke(["sanitize", "lavfi:testsrc=size=32x32:rate=4:duration=1", "-o", str(out),
                     "--detector", str(detector), "--recipe", str(recipe)])  # fmt: skip
    assert_one_error_line(result, 2, "bad.toml", field)
    assert not out.exists()


@pytest.mark.slow
def test_malicious_pickle_in_a_real_process_is_one_line(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "meta": {"x": _Payload(marker)}}, evil)
    proc = subprocess.run([*CLI, "sanitize", "lavfi:testsrc=size=32x32:rate=4:duration=1", "-o", str(tmp_path / "o.mp4"),
                           "--detector", str(evil)], capture_output=True, text=True, timeout=120, env=ENV)  # fmt: skip
    assert proc.returncode == 4 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not marker.exists()


# ---------------------------------------------------------------- kills


@pytest.mark.slow
def test_sigkill_at_random_points_never_leaves_a_partial_output(tmp_path: Path, detector: Path) -> None:
    """Kill times drawn over the writing phase (decode, encode, finalize): the output is all or nothing."""
    src = write_video(tmp_path / "in.mp4", frames=96, size=(96, 128), fps=24, audio=True)
    cmd = [*CLI, "sanitize", str(src), "--detector", str(detector)]
    for k, delay in enumerate(np.random.default_rng(7).uniform(0.0, 1.5, 5)):
        out = tmp_path / f"out{k}" / "clean.mp4"
        code = kill_while_writing([*cmd, "-o", str(out)], out.parent, float(delay), ENV)
        assert code in (0, -signal.SIGKILL)
        if code == 0 or out.exists():  # finished (maybe killed while exiting): then it is complete
            assert len(frames_of(out)) == 96, f"killed {delay:.2f} s into writing"


TINY_TRAINING = """
[model]
name = "tiny3d"
num_classes = 12
[data]
root = "{root}"
size = 32
clip_len = 4
frames = 8
videos_per_class = 2
[attack]
methods = ["pgd"]
iters = 2
batch = 2
[train]
output = "{output}"
cache = "{cache}"
steps = 40
batch = 4
attacked_per_video = 4
checkpoint_every = 2
eval_every = 1000
[train.classifier]
steps = 40
batch = 4
"""


@pytest.fixture(scope="module")
def tiny_training(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from streamguard.data import make_synthmotion

    root = tmp_path_factory.mktemp("train")
    make_synthmotion(root / "synth", 2, 0, size=32, frames=8)
    recipe = root / "tiny.toml"
    recipe.write_text(TINY_TRAINING.format(root=root / "synth", output=root / "run", cache=root / "cache"))
    return recipe


def _kill_once_started(cmd: list[str], started: Path, extra_seconds: float) -> bool:
    """Start ``cmd``, SIGKILL it ``extra_seconds`` after ``started`` exists; ``True`` if it was killed."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    deadline = time.monotonic() + 120
    while not started.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(extra_seconds)
    killed = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    return killed


@pytest.mark.slow
def test_train_killed_and_resumed_reaches_the_same_weights(tiny_training: Path, tmp_path: Path) -> None:
    cmd = [*CLI, "train", "classifier", str(tiny_training)]
    subprocess.run([*cmd, "-o", str(tmp_path / "ref")], env=ENV, check=True, timeout=300, capture_output=True)
    for k, extra in enumerate((0.0, 0.7)):
        run = tmp_path / f"run{k}"
        assert _kill_once_started([*cmd, "-o", str(run)], run / "classifier-state.pt", extra)
        assert load_checkpoint(run / "classifier-state.pt")[1]["step"] < 40
        subprocess.run([*cmd, "-o", str(run), "--resume"], env=ENV, check=True, timeout=300, capture_output=True)
        ref, _ = load_checkpoint(tmp_path / "ref" / "classifier.pt")
        got, _ = load_checkpoint(run / "classifier.pt")
        assert ref.keys() == got.keys() and all(torch.equal(ref[key], got[key]) for key in ref)


@pytest.mark.slow
def test_attack_cache_survives_a_kill_without_corrupt_entries(tiny_training: Path) -> None:
    cache = tiny_training.parent / "cache"
    cmd = [*CLI, "train", "cache", str(tiny_training)]
    assert _kill_once_started(cmd, cache / "000000.pt", 0.0)
    partial = sorted(cache.glob("[0-9]*.pt"))
    subprocess.run(cmd, env=ENV, check=True, timeout=300, capture_output=True)
    entries = sorted(cache.glob("[0-9]*.pt"))
    assert len(partial) < len(entries) and not list(cache.glob(".*.tmp"))
    for path in entries:
        entry = torch.load(path, weights_only=True)
        assert entry["clip"].dtype == torch.uint8 and entry["clip"].shape[1:] == (4, 32, 32)


# ---------------------------------------------------------------- load


@pytest.mark.slow
def test_long_sanitize_keeps_memory_flat(tmp_path: Path) -> None:
    """Median RSS over frames 4500-6000 is within 30 MB of that over frames 1500-3000 (after warm-up).

    Keeping one 57 kB frame per frame would add 170 MB; allocator noise is about +-10 MB.
    """
    samples: list[tuple[int, float]] = []

    def rss_mb() -> float:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024

    with open_source("lavfi:testsrc2=size=160x120:rate=100:duration=60") as source:
        pipeline = Pipeline(source, _SlowDefense(0.0), clip_len=8, output=tmp_path / "long.mp4")
        summary = pipeline.run(lambda status: samples.append((status.written, rss_mb())), interval=0.05)
    assert summary.frames == 6000
    early = np.median([rss for written, rss in samples if 1500 < written <= 3000])
    late = np.median([rss for written, rss in samples if written > 4500])
    assert late - early < 30, samples[::20]
