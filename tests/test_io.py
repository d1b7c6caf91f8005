"""PyAV sources and sinks: formats, rotation, odd sizes, audio remux, atomic writes, clear errors."""

from __future__ import annotations

import socket
import threading
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from streamguard.errors import InputError, StreamError
from streamguard.io import Frame, open_source
from streamguard.sinks import JsonlSink, VideoSink

BITS = 4  # frame index drawn as 4 black/white columns in the top half


def pattern(index: int, height: int = 48, width: int = 64) -> np.ndarray:
    """``(H, W, 3)`` uint8 frame whose top half encodes ``index`` in binary, bottom half mid-gray."""
    image = np.full((height, width, 3), 128, np.uint8)
    col = width // BITS
    for bit in range(BITS):
        image[: height // 2, bit * col : (bit + 1) * col] = 255 if index >> bit & 1 else 0
    return image


def read_index(image: np.ndarray) -> int:
    height, width = image.shape[:2]
    col = width // BITS
    return sum(1 << bit for bit in range(BITS) if image[: height // 2, bit * col + 2 : (bit + 1) * col - 2].mean() > 128)


def make_video(
    path: Path,
    frames: int = 12,
    size: tuple[int, int] = (48, 64),
    fps: int = 12,
    audio: bool = True,
    faststart: bool = False,
    image_fn=pattern,
) -> Path:
    """An H.264 MP4 (with AAC audio) whose frame ``i`` is ``image_fn(i, H, W)``."""
    options = {"movflags": "+faststart"} if faststart else {}
    with av.open(str(path), "w", container_options=options) as out:
        video = out.add_stream("libx264", rate=fps, options={"crf": "10"})
        video.width, video.height, video.pix_fmt = size[1], size[0], "yuv420p"
        sound = out.add_stream("aac", rate=16000) if audio else None
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(image_fn(i, *size), format="rgb24")
            frame.pts = i
            out.mux(video.encode(frame))
        out.mux(video.encode())
        if sound is not None:
            samples = 16000 * frames // fps
            tone = (0.3 * np.sin(np.arange(samples) * 2 * np.pi * 440 / 16000)).astype(np.float32)[None]
            chunk = 1024
            for start in range(0, samples, chunk):
                af = av.AudioFrame.from_ndarray(tone[:, start : start + chunk].copy(), format="flt", layout="mono")
                af.sample_rate, af.pts = 16000, start
                out.mux(sound.encode(af))
            out.mux(sound.encode())
    return path


def audio_packets(path: Path) -> list[bytes]:
    with av.open(str(path)) as c:
        return [bytes(p) for p in c.demux(audio=0) if p.size]


def test_file_source_metadata_and_order(tmp_path: Path) -> None:
    path = make_video(tmp_path / "in.mp4", frames=12)
    with open_source(path) as src:
        assert (src.width, src.height, src.fps, src.frame_count, src.is_live) == (64, 48, 12.0, 12, False)
        assert src.audio_stream is not None and src.time_base is not None
        frames = list(src)
    assert [f.index for f in frames] == list(range(12))
    assert [read_index(f.image) for f in frames] == list(range(12))
    assert all(f.image.dtype == np.uint8 and f.image.shape == (48, 64, 3) for f in frames)
    assert [f.time for f in frames] == pytest.approx([i / 12 for i in range(12)], abs=1e-3)


def test_sink_copies_audio_untouched_and_keeps_timing(tmp_path: Path) -> None:
    src_path = make_video(tmp_path / "in.mp4", frames=12)
    out = tmp_path / "out.mp4"
    with open_source(src_path) as src:
        with VideoSink(out, src.width, src.height, src.fps, time_base=src.time_base, audio_from=src) as sink:
            for frame in src:
                sink.write(frame.image, frame.pts)
    assert audio_packets(out) == audio_packets(src_path)
    with open_source(out) as res:
        assert (res.width, res.height, res.fps, res.frame_count) == (64, 48, 12.0, 12)
        assert res.audio_stream.codec_context.name == "aac"
        assert [read_index(f.image) for f in res] == list(range(12))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.mp4", "out.mp4"]


def test_pcm_audio_is_reencoded_for_mp4(tmp_path: Path) -> None:
    src_path = tmp_path / "pcm.mkv"
    with av.open(str(src_path), "w") as c:
        v = c.add_stream("ffv1", rate=8)
        v.width, v.height, v.pix_fmt = 32, 32, "yuv420p"
        a = c.add_stream("pcm_s16le", rate=8000, layout="mono")
        for i in range(8):
            c.mux(v.encode(av.VideoFrame.from_ndarray(pattern(i, 32, 32), format="rgb24")))
        c.mux(v.encode())
        af = av.AudioFrame.from_ndarray(np.zeros((1, 8000), np.int16), format="s16", layout="mono")
        af.sample_rate = 8000
        c.mux(a.encode(af))
        c.mux(a.encode())
    with open_source(src_path) as src, VideoSink(tmp_path / "o.mp4", 32, 32, src.fps, audio_from=src) as sink:
        for f in src:
            sink.write(f.image)
    with av.open(str(tmp_path / "o.mp4")) as c:
        assert c.streams.audio[0].codec_context.name == "aac"
        assert c.streams.video[0].frames == 8


def test_odd_size_is_padded_by_one_pixel(tmp_path: Path) -> None:
    with open_source("lavfi:testsrc=size=33x21:rate=8:duration=1") as src:
        assert (src.width, src.height, src.frame_count, len(list(src))) == (33, 21, None, 8)
    with VideoSink(tmp_path / "odd.mp4", 33, 21, 8) as sink:
        for i in range(8):
            sink.write(pattern(i, 21, 33))
    with open_source(tmp_path / "odd.mp4") as res:
        assert (res.width, res.height, res.frame_count) == (34, 22, 8)
        frames = [f.image for f in res]
    assert [read_index(f[:21, :33]) for f in frames] == list(range(8))
    assert np.abs(frames[3][:21, :33].astype(float) - pattern(3, 21, 33)).mean() < 8


def test_lavfi_format_argument() -> None:
    with open_source("color=c=red:size=16x16:rate=4:duration=1", format="lavfi") as src:
        frames = list(src)
    assert len(frames) == 4 and frames[0].image[..., 0].mean() > 200 and frames[0].image[..., 2].mean() < 50


def test_display_rotation_is_applied(tmp_path: Path) -> None:
    path = tmp_path / "rot.mp4"
    image = np.zeros((32, 48, 3), np.uint8)
    image[:8, :8] = 255  # top-left marker
    with av.open(str(path), "w") as c:
        v = c.add_stream("libx264", rate=8)
        v.width, v.height, v.pix_fmt = 48, 32, "yuv420p"
        v.set_display_rotation(90)  # counter-clockwise
        for _ in range(2):
            c.mux(v.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        c.mux(v.encode())
    with open_source(path) as src:
        assert (src.width, src.height) == (32, 48)
        shown = next(iter(src)).image
    assert shown[-8:, :8].mean() > 200 and shown[:8, :8].mean() < 50  # top-left went to bottom-left


@pytest.mark.parametrize("pix_fmt", ["gray", "yuv420p10le"])
def test_gray_and_10bit_become_rgb24(tmp_path: Path, pix_fmt: str) -> None:
    path = tmp_path / f"{pix_fmt}.mkv"
    with av.open(str(path), "w") as c:
        v = c.add_stream("ffv1", rate=8)
        v.width, v.height, v.pix_fmt = 32, 32, pix_fmt
        for i in range(3):
            c.mux(v.encode(av.VideoFrame.from_ndarray(pattern(i, 32, 32), format="rgb24")))
        c.mux(v.encode())
    with open_source(path) as src:
        frames = list(src)
    assert [f.image.shape for f in frames] == [(32, 32, 3)] * 3 and frames[0].image.dtype == np.uint8
    assert [read_index(f.image) for f in frames] == [0, 1, 2]


def test_missing_corrupt_and_videoless_files(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="video not found: .*nope.mp4"):
        open_source(tmp_path / "nope.mp4")
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(InputError, match="corrupt.mp4: cannot open"):
        open_source(corrupt)
    sound = tmp_path / "sound.m4a"
    with av.open(str(sound), "w") as c:
        a = c.add_stream("aac", rate=8000)
        af = av.AudioFrame.from_ndarray(np.zeros((1, 2048), np.float32), format="flt", layout="mono")
        af.sample_rate = 8000
        c.mux(a.encode(af))
        c.mux(a.encode())
    with pytest.raises(InputError, match="sound.m4a: no video stream"):
        open_source(sound)


def test_truncated_file_yields_what_decodes_then_raises(tmp_path: Path) -> None:
    full = make_video(tmp_path / "full.mp4", frames=16, audio=False, faststart=True,
                      image_fn=lambda i, h, w: np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8))
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size * 2 // 3])
    seen: list[Frame] = []
    with pytest.raises(InputError, match=r"cut.mp4: truncated: decoded \d+ of 16 frames"):
        with open_source(cut) as src:
            seen.extend(src)
    assert 0 < len(seen) < 16
    with open_source(cut, tolerate_truncation=True) as src:
        assert len(list(src)) == len(seen)
    moov_at_end = make_video(tmp_path / "plain.mp4", frames=8, audio=False)
    moov_at_end.write_bytes(moov_at_end.read_bytes()[:-200])
    with pytest.raises(InputError, match="plain.mp4"):
        list(open_source(moov_at_end))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_and_stalled_network_sources() -> None:
    with pytest.raises(InputError, match="Connection refused"):
        open_source(f"tcp://127.0.0.1:{free_port()}", timeout=2)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    accepted: list[socket.socket] = []
    threading.Thread(target=lambda: accepted.append(server.accept()[0]), daemon=True).start()
    tic = time.monotonic()
    with pytest.raises(StreamError, match="no answer within 0.5 s"):
        open_source(f"tcp://127.0.0.1:{server.getsockname()[1]}", timeout=0.5)
    assert time.monotonic() - tic < 3
    server.close()
    for conn in accepted:
        conn.close()


def test_camera_that_does_not_exist() -> None:
    with pytest.raises(InputError, match="/dev/video99: cannot open camera"):
        open_source("/dev/video99")


def test_sinks_are_atomic(tmp_path: Path) -> None:
    out = tmp_path / "v.mp4"
    with pytest.raises(RuntimeError):
        with VideoSink(out, 32, 32, 8) as sink:
            for i in range(8):
                sink.write(pattern(i, 32, 32))
            assert not out.exists() and all(p.name.startswith(".v.") for p in tmp_path.iterdir())
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with JsonlSink(tmp_path / "p.jsonl") as sink:
        sink.write({"a": 1})
        assert not (tmp_path / "p.jsonl").exists()
        sink.write({"b": [1.5]})
    assert (tmp_path / "p.jsonl").read_text().splitlines() == ['{"a": 1}', '{"b": [1.5]}']
    sink = JsonlSink(tmp_path / "q.jsonl")
    sink.write({"a": 1})
    sink.abort()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.jsonl"]


def test_sink_with_source_time_base_keeps_gaps(tmp_path: Path) -> None:
    tb = Fraction(1, 90000)
    with VideoSink(tmp_path / "gap.mp4", 32, 32, 10, time_base=tb) as sink:
        for i in (0, 1, 5, 6):  # frames 2-4 dropped (live)
            sink.write(pattern(i, 32, 32), pts=i * 9000)
    with open_source(tmp_path / "gap.mp4") as src:
        times = [f.time for f in src]
    assert times == pytest.approx([0.0, 0.1, 0.5, 0.6], abs=1e-3)


def test_stale_partial_files_of_dead_writers_are_removed(tmp_path: Path) -> None:
    import os
    import subprocess

    from streamguard.sinks import VideoSink

    finished = subprocess.Popen(["true"])
    finished.wait()
    stale = tmp_path / f".out.{finished.pid}.partial.mp4"
    other_output = tmp_path / f".other.{finished.pid}.partial.mp4"
    running_writer = tmp_path / f".out.{os.getppid()}.partial.mp4"
    for f in (stale, other_output, running_writer):
        f.write_bytes(b"x")
    with VideoSink(tmp_path / "out.mp4", 32, 32, 10) as sink:
        sink.write(np.zeros((32, 32, 3), np.uint8))
    assert not stale.exists(), "a dead writer's partial file was kept"
    assert other_output.exists() and running_writer.exists(), "only this output's dead writers' files may go"
    assert (tmp_path / "out.mp4").is_file()


def test_realtime_paces_a_file_at_its_frame_rate(tmp_path: Path) -> None:
    """``realtime=True`` (ffmpeg's -re): a 25 fps file read for about 2 s gives about 50 frames."""
    path = make_video(tmp_path / "25fps.mp4", frames=100, fps=25, audio=False)
    with open_source(path, realtime=True) as src:
        assert src.realtime and not src.is_live
        frames, tic = [], time.monotonic()
        for frame in src:
            if time.monotonic() - tic > 2.0:
                break
            frames.append(frame)
        waited = src.paced_wait
    assert 40 <= len(frames) <= 60
    assert [read_index(f.image) for f in frames] == [i % 16 for i in range(len(frames))]
    assert waited > 1.0  # the time went into pacing, not decoding
    with open_source(path) as src:  # unpaced: the whole file, no waiting
        assert len(list(src)) == 100 and src.paced_wait == 0


def test_realtime_restarts_the_clock_on_a_timestamp_jump(tmp_path: Path) -> None:
    """A 60 s gap in the timestamps does not stall a paced read for 60 s."""
    path = tmp_path / "gap.mp4"
    with VideoSink(path, 32, 32, 25, time_base=Fraction(1, 25)) as sink:
        for i, pts in enumerate([0, 1, 2, 3, 1500, 1501, 1502, 1503]):
            sink.write(pattern(i, 32, 32), pts=pts)
    tic = time.monotonic()
    with open_source(path, realtime=True) as src:
        times = [f.time for f in src]
    assert times[4] == pytest.approx(60.0, abs=0.01) and len(times) == 8
    assert time.monotonic() - tic < 3.0  # about 6 frame intervals, not a minute


def test_demuxer_options_defaults_and_overrides() -> None:
    from streamguard.io import demuxer_options, is_live_uri

    assert demuxer_options("rtsp://cam/stream") == {"flags": "+low_delay", "rtsp_transport": "tcp"}
    assert demuxer_options("tcp://127.0.0.1:5000") == {"flags": "+low_delay"}
    assert demuxer_options("clip.mp4") == {} and demuxer_options("testsrc=size=32x32") == {}
    assert demuxer_options("rtsp://cam/stream", {"rtsp_transport": "udp", "flags": "", "fflags": "+nobuffer", "probesize": 32}) == {
        "rtsp_transport": "udp", "fflags": "+nobuffer", "probesize": "32"}
    assert is_live_uri("rtsp://cam") and is_live_uri("/dev/video0") and not is_live_uri("clip.mp4")
    assert not is_live_uri("lavfi:testsrc")


def test_demuxer_options_reach_the_container_and_decoder(tmp_path: Path) -> None:
    nobuffer, low_delay = 0x40, 1 << 19  # AVFMT_FLAG_NOBUFFER, AV_CODEC_FLAG_LOW_DELAY
    graph = "lavfi:testsrc=size=32x32:rate=8:duration=1"
    with open_source(graph) as src:
        assert not src.container.flags & nobuffer and not src.stream.codec_context.flags & low_delay
        assert src.stream.thread_type.name == "FRAME"  # files and graphs: frame threads (throughput)
    with open_source(graph, options={"fflags": "+nobuffer", "flags": "+low_delay"}) as src:
        assert src.container.flags & nobuffer and src.stream.codec_context.flags & low_delay
    with open_source(graph, live=True) as src:
        assert src.stream.thread_type.name == "SLICE" and len(list(src)) == 8  # live: no frames held back
    raw = tmp_path / "clip.rgb"  # headerless: opens only with the rawvideo demuxer's options
    raw.write_bytes(b"".join(pattern(i, 24, 32).tobytes() for i in range(5)))
    with open_source(raw, format="rawvideo", options={"video_size": "32x24", "pixel_format": "rgb24", "framerate": "10"}) as src:
        assert (src.width, src.height, src.fps) == (32, 24, 10.0)
        assert [read_index(f.image) for f in src] == list(range(5))
