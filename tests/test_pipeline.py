"""Pipeline threads: exactly-once ordered sanitizing, clip windows, live drops, errors, interrupts."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_io import make_video, pattern, read_index
from torch import Tensor, nn

from streamguard.detector import PSPNet
from streamguard.errors import InputError
from streamguard.io import open_source
from streamguard.models import ModelSpec, build_model
from streamguard.patchzero import PatchZero
from streamguard.pipeline import Pipeline, overlay

SQUARE = (slice(28, 44), slice(40, 56))  # rows, cols of the pasted patch (bottom half, clear of the bits)
MEAN = (0.5, 0.5, 0.5)


def patched(index: int, height: int, width: int) -> np.ndarray:
    image = pattern(index, height, width)
    image[SQUARE] = np.random.default_rng(index).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    return image


class KnownMask:
    """Test double for the sanitize protocol: the patch location is known, repaint it with MEAN."""

    def __init__(self, delay: float = 0.0, fail_at: int | None = None) -> None:
        self.seen: list[int] = []  # chunk lengths, in call order
        self.calls = self.resets = 0
        self.delay, self.fail_at = delay, fail_at

    def sanitize(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("detector exploded")
        time.sleep(self.delay)
        self.seen += [x.shape[2]] * x.shape[0]
        mask = torch.zeros_like(x[:, :1])
        mask[..., SQUARE[0], SQUARE[1]] = 1
        return x * (1 - mask) + 0.5 * mask, mask

    def reset(self) -> None:
        self.resets += 1


class SlowFrameDetector(nn.Module):
    """Test double for a torchvision detector: one confident and one weak box per frame."""

    def __init__(self, delay: float = 0.0) -> None:
        super().__init__()
        self.spec = ModelSpec("fake", "frame", MEAN, (1.0, 1.0, 1.0), 1, (48, 64), 3, ("bg", "car", "cat"))
        self.delay = delay

    def forward(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        time.sleep(self.delay)
        box = torch.tensor([[1.0, 2.0, 10.0, 12.0], [0.0, 0.0, 5.0, 5.0]])
        return [{"boxes": box, "labels": torch.tensor([1, 2]), "scores": torch.tensor([0.9, 0.1])} for _ in images]


def tiny_classifier(clip_len: int = 4) -> nn.Module:
    return build_model("tiny3d", num_classes=3, widths=(4, 4, 4, 4), clip_len=clip_len, size=16)


def test_every_frame_sanitized_once_in_order_and_patch_removed(tmp_path: Path) -> None:
    src_path = make_video(tmp_path / "in.mp4", frames=14, image_fn=patched)
    defense = KnownMask()
    with open_source(src_path) as src:
        summary = Pipeline(src, defense, output=tmp_path / "out.mp4", clip_len=4, batch=2).run()
    assert defense.seen == [4, 4, 4, 2] and defense.resets == 1  # 14 = 3 full chunks + 2
    assert (summary.frames, summary.dropped, summary.chunks, summary.frames_with_patches) == (14, 0, 4, 14)
    assert summary.mean_masked_area == pytest.approx(16 * 16 / (48 * 64))
    with open_source(tmp_path / "out.mp4") as res:
        frames = [f.image.astype(float) for f in res]
    assert [read_index(f) for f in frames] == list(range(14))
    for i, image in enumerate(frames):
        assert np.abs(image[SQUARE] - 128).mean() < 4  # noise gone: mean gray
        assert np.abs(image[:24] - pattern(i)[:24]).mean() < 4  # the rest untouched


def test_clip_windows_with_overlapping_stride(tmp_path: Path) -> None:
    src_path = make_video(tmp_path / "in.mp4", frames=12, audio=False)
    with open_source(src_path) as src:
        summary = Pipeline(src, KnownMask(), tiny_classifier(4), predictions=tmp_path / "p.jsonl",
                           clip_len=3, stride=2, batch=1, topk=2).run()
    records = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [(r["start_frame"], r["end_frame"]) for r in records] == [(0, 3), (2, 5), (4, 7), (6, 9), (8, 11)]
    assert summary.clips == 5
    assert records[1]["start"] == pytest.approx(2 / 12, abs=1e-3) and records[1]["end"] == pytest.approx(6 / 12, abs=1e-3)
    for r in records:
        assert len(r["topk"]) == 2 and r["topk"][0]["score"] >= r["topk"][1]["score"]
        assert r["masked_fraction"] == pytest.approx(16 * 16 / (48 * 64), abs=1e-6)


def test_clip_predictions_match_direct_model_call(tmp_path: Path) -> None:
    src_path = make_video(tmp_path / "in.mp4", frames=8, audio=False)
    model = tiny_classifier(4)
    with open_source(src_path) as src:
        Pipeline(src, None, model, predictions=tmp_path / "p.jsonl", stride=4).run()
    with open_source(src_path) as src:
        x = torch.from_numpy(np.stack([f.image for f in src])).permute(0, 3, 1, 2)  # (8, 3, H, W) uint8
    clips = torch.nn.functional.interpolate(x, size=(16, 16), mode="bilinear", antialias=True).float() / 255  # in uint8
    clips = clips.permute(1, 0, 2, 3).unflatten(1, (2, 4)).permute(1, 0, 2, 3, 4)  # (2, 3, 4, 16, 16)
    with torch.no_grad():
        expected = model(clips).softmax(1).max(1)
    records = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [r["topk"][0]["label"] for r in records] == expected.indices.tolist()
    assert [r["topk"][0]["score"] for r in records] == pytest.approx(expected.values.tolist(), abs=1e-5)


def test_short_video_is_classified_once(tmp_path: Path) -> None:
    with open_source("lavfi:testsrc=size=32x32:rate=8:duration=0.375") as src:  # 3 frames < clip_len 4
        summary = Pipeline(src, None, tiny_classifier(4), predictions=tmp_path / "p.jsonl").run()
    records = (tmp_path / "p.jsonl").read_text().splitlines()
    assert summary.clips == 1 and len(records) == 1 and '"end_frame": 2' in records[0]


def test_frame_detector_records(tmp_path: Path) -> None:
    src_path = make_video(tmp_path / "in.mp4", frames=6, audio=False, image_fn=patched)
    with open_source(src_path) as src:
        summary = Pipeline(src, KnownMask(), SlowFrameDetector(), predictions=tmp_path / "d.jsonl", clip_len=2).run()
    records = [json.loads(line) for line in (tmp_path / "d.jsonl").read_text().splitlines()]
    assert [r["frame"] for r in records] == list(range(6)) and summary.detections == 6
    assert records[0]["detections"] == [{"box": [1.0, 2.0, 10.0, 12.0], "label": 1, "name": "car", "score": 0.9}]


@pytest.mark.parametrize("bias, masked", [(30.0, 1.0), (-30.0, 0.0)])
def test_real_patchzero_end_to_end(tmp_path: Path, bias: float, masked: float) -> None:
    detector = PSPNet("mobilenet_v3", aux=False, width=0.25)
    nn.init.constant_(detector.head[-1].bias, bias)  # force every pixel in / out of the mask
    defense = PatchZero(detector, mean=MEAN, threshold=0.5, dilate=1)
    src_path = make_video(tmp_path / "in.mp4", frames=8, size=(32, 48), audio=False)
    with open_source(src_path) as src:
        summary = Pipeline(src, defense, output=tmp_path / "out.mp4", overlay=tmp_path / "ov.mp4", clip_len=4).run()
    assert summary.frames == 8 and summary.mean_masked_area == masked
    assert summary.frames_with_patches == (8 if masked else 0)
    with open_source(tmp_path / "out.mp4") as res:
        frames = [f.image.astype(float) for f in res]
    with open_source(tmp_path / "ov.mp4") as ov:
        assert (ov.width, ov.height, ov.frame_count) == (144, 32, 8)
    if masked:
        assert all(np.abs(f - 128).max() <= 2 for f in frames)
    else:
        assert [read_index(f) for f in frames] == list(range(8))


def test_live_drops_newest_win_while_file_mode_drops_nothing(tmp_path: Path) -> None:
    graph = "lavfi:testsrc=size=32x32:rate=25:duration=2"  # 50 frames, decoded far faster than processed
    with open_source(graph, live=True) as src:
        live = Pipeline(src, KnownMask(), SlowFrameDetector(delay=0.02), clip_len=2).run()
    assert live.live and live.dropped > 0
    assert live.frames + live.dropped == 50 and live.frames >= 2
    statuses = []
    with open_source(graph) as src:
        file = Pipeline(src, KnownMask(), SlowFrameDetector(delay=0.002), clip_len=2).run(statuses.append, interval=0.01)
    assert (file.frames, file.dropped, file.detections) == (50, 0, 50)
    assert statuses[-1].written == 50 and statuses[-1].dropped == 0


@pytest.mark.parametrize("where", ["defense", "model"])
def test_stage_error_stops_everything_and_names_the_stage(tmp_path: Path, where: str) -> None:
    src_path = make_video(tmp_path / "in.mp4", frames=16, audio=False)

    class Broken(SlowFrameDetector):
        def forward(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
            raise RuntimeError("model exploded")

    defense = KnownMask(fail_at=2 if where == "defense" else None)
    model = Broken() if where == "model" else None
    tic = time.monotonic()
    with open_source(src_path) as src, pytest.raises(RuntimeError, match="exploded") as info:
        Pipeline(src, defense, model, output=tmp_path / "out.mp4", predictions=tmp_path / "p.jsonl" if model else None,
                 clip_len=2, batch=1).run()
    assert info.value.stage == where and time.monotonic() - tic < 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.mp4"]  # no output, no partial files


def test_truncated_input_error_carries_the_stage(tmp_path: Path) -> None:
    full = make_video(tmp_path / "full.mp4", frames=16, audio=False, faststart=True,
                      image_fn=lambda i, h, w: np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8))
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size * 2 // 3])
    with open_source(cut) as src, pytest.raises(InputError, match=r"^\[decode\] .*cut.mp4: truncated"):
        Pipeline(src, KnownMask(), output=tmp_path / "out.mp4").run()
    assert not (tmp_path / "out.mp4").exists()


def test_keyboard_interrupt_keeps_a_playable_partial_output(tmp_path: Path) -> None:
    src_path = make_video(tmp_path / "in.mp4", frames=16)

    def interrupt(status) -> None:
        if status.written >= 4:
            raise KeyboardInterrupt

    with open_source(src_path) as src, pytest.raises(KeyboardInterrupt):
        Pipeline(src, KnownMask(delay=0.05), output=tmp_path / "out.mp4", clip_len=2, batch=1).run(interrupt, interval=0.01)
    with open_source(tmp_path / "out.mp4") as res:
        indices = [read_index(f.image) for f in res]
    assert 4 <= len(indices) < 16 and indices == list(range(len(indices)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.mp4", "out.mp4"]


def test_overlay_panels() -> None:
    image = np.full((32, 40, 3), 90, np.uint8)
    mask = np.zeros((32, 40), bool)
    mask[10:20, 10:20] = True
    clean = image.copy()
    clean[mask] = 128
    panels = overlay(image, mask, clean)
    assert panels.shape == (32, 120, 3)
    assert (panels[15, 40 + 15] == (255, 0, 0)).all() and (panels[15, 80 + 15] == 128).all()
    assert (panels[10, 10] == (255, 0, 0)).all()  # outline on the input panel


def test_paced_file_runs_live_and_a_fast_defense_keeps_up(tmp_path: Path) -> None:
    src_path = make_video(tmp_path / "25fps.mp4", frames=100, fps=25, audio=False)
    statuses = []
    with open_source(src_path, realtime=True) as src:
        summary = Pipeline(src, KnownMask(), clip_len=4, batch=1, duration=2.0).run(statuses.append, interval=0.1)
    assert summary.live  # a paced source behaves like a camera: newest frames win
    assert 40 <= summary.frames <= 60 and summary.dropped == 0
    assert summary.stage_busy["decode"] < 1.0  # pacing waits are not counted as decode work
    assert 0 < statuses[-1].latency_p50 <= statuses[-1].latency_p95
    with open_source(src_path) as src:  # not paced: file mode, as before
        assert not Pipeline(src, KnownMask()).live


def test_unpaced_live_graph_still_drops_under_load() -> None:
    with open_source("lavfi:testsrc=size=32x32:rate=25:duration=2", live=True) as src:
        assert not src.realtime
        tic = time.monotonic()
        summary = Pipeline(src, KnownMask(delay=0.05), clip_len=2).run()
    assert summary.live and summary.dropped > 20 and summary.frames + summary.dropped == 50
    assert time.monotonic() - tic < 1.9  # read as fast as it decodes, not at 25 fps


def test_vid_stride_runs_the_model_on_every_nth_window_or_frame(tmp_path: Path) -> None:
    src_path = make_video(tmp_path / "in.mp4", frames=16, audio=False, image_fn=patched)
    model = tiny_classifier(4)
    with open_source(src_path) as src:
        every = Pipeline(src, KnownMask(), model, predictions=tmp_path / "all.jsonl", stride=4).run()
    with open_source(src_path) as src:
        half = Pipeline(src, KnownMask(), model, predictions=tmp_path / "half.jsonl", stride=4,
                        vid_stride=2, output=tmp_path / "out.mp4").run()
    all_records = [json.loads(line) for line in (tmp_path / "all.jsonl").read_text().splitlines()]
    records = [json.loads(line) for line in (tmp_path / "half.jsonl").read_text().splitlines()]
    assert (every.clips, half.clips, half.model_runs, half.vid_stride) == (4, 2, 2, 2)
    assert [r["start_frame"] for r in records] == [0, 8] and all(r["vid_stride"] == 2 for r in records)
    assert [r["topk"] for r in records] == [all_records[0]["topk"], all_records[2]["topk"]]
    assert (half.frames, half.frames_with_patches) == (16, 16)  # the defense still ran on every frame
    with open_source(tmp_path / "out.mp4") as res:
        assert all(np.abs(f.image[SQUARE].astype(float) - 128).mean() < 4 for f in res)
    with open_source(src_path) as src:
        det = Pipeline(src, KnownMask(), SlowFrameDetector(), predictions=tmp_path / "d.jsonl", clip_len=4,
                       vid_stride=3).run()
    frames = [json.loads(line)["frame"] for line in (tmp_path / "d.jsonl").read_text().splitlines()]
    assert frames == [0, 3, 6, 9, 12, 15] and det.detections == 6 and det.model_runs == 6
    with pytest.raises(ValueError, match="vid_stride"):
        Pipeline(src, vid_stride=0)


def test_snapshot_is_an_atomic_jpeg_of_input_mask_sanitized(tmp_path: Path) -> None:
    import cv2

    from streamguard.errors import ConfigError

    src_path = make_video(tmp_path / "in.mp4", frames=12, audio=False, image_fn=patched)
    snap = tmp_path / "snaps" / "live.jpg"
    with open_source(src_path) as src:
        summary = Pipeline(src, KnownMask(), snapshot=snap, snapshot_every=1000.0, clip_len=4).run()
    assert summary.snapshots == 1 and summary.outputs["snapshot"] == str(snap)  # the first frame, then every 1000 s
    data = snap.read_bytes()
    assert data[:2] == b"\xff\xd8" and data[-2:] == b"\xff\xd9"  # a whole JPEG
    image = cv2.cvtColor(cv2.imread(str(snap)), cv2.COLOR_BGR2RGB)
    assert image.shape == (48, 3 * 64, 3)
    assert read_index(image[:, :64]) == 0  # the input panel is frame 0
    assert np.abs(image[SQUARE[0], 128 + 44: 128 + 52].astype(float) - 128).mean() < 8  # sanitized panel: gray
    assert (np.abs(image[SQUARE[0], 64 + 44: 64 + 52].astype(float) - (255, 0, 0)).mean(-1) < 40).mean() > 0.9  # mask panel
    assert sorted(p.name for p in snap.parent.iterdir()) == ["live.jpg"]  # no temporary file left
    with open_source(src_path) as src:
        again = Pipeline(src, KnownMask(), snapshot=snap, snapshot_every=1e-9, clip_len=4).run()
    assert again.snapshots >= 2
    with open_source(src_path) as src, pytest.raises(ConfigError, match="JPEG"):
        Pipeline(src, KnownMask(), snapshot=tmp_path / "snap.png")
