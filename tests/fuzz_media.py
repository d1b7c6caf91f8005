"""Malformed media and misbehaving live sources, generated on the fly (PyAV + numpy, tiny sizes).

Shared by ``tests/test_robustness.py`` and ``benchmarks/reliability.py``:

* :func:`write_video` writes a small H.264 video whose frame ``i`` encodes ``i`` (:func:`read_index`).
* :data:`MALFORMED` maps a case name to a :class:`Case`: a builder that writes the file and what a
  correct ``streamguard sanitize`` must do with it (``"ok"``: succeed with ``frames`` frames;
  ``"error"``: exit 3 with one line containing ``fragment``; ``"either"``: one of the two).
* :func:`corrupt` / :func:`truncate` damage a valid file at given offsets (for hypothesis).
* :class:`FaultyStreamServer` serves MPEG-TS over TCP on 127.0.0.1 and stalls, drops the connection
  or sends garbage on cue.
"""

from __future__ import annotations

import socket
import struct
import subprocess
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Literal

import av
import numpy as np

BITS = 4  # the frame index is drawn as 4 black/white columns in the top half


def frame_image(index: int, height: int = 48, width: int = 64) -> np.ndarray:
    """``(H, W, 3)`` uint8 frame whose top half encodes ``index % 16`` in binary, bottom half textured."""
    image = np.full((height, width, 3), 128, np.uint8)
    col = width // BITS
    for bit in range(BITS):
        image[: height // 2, bit * col : (bit + 1) * col] = 255 if index >> bit & 1 else 0
    ramp = (np.arange(width) * 4 + index * 8) % 256
    image[height // 2 + 2 :, :, 1] = ramp.astype(np.uint8)
    return image


def read_index(image: np.ndarray) -> int:
    height, width = image.shape[:2]
    col = width // BITS
    return sum(1 << b for b in range(BITS) if image[: height // 2 - 2, b * col + 2 : (b + 1) * col - 2].mean() > 128)


def write_video(
    path: Path,
    frames: int = 12,
    size: tuple[int, int] = (48, 64),
    fps: int = 12,
    *,
    format: str | None = None,
    faststart: bool = True,
    pts: Sequence[int] | None = None,
    time_base: Fraction | None = None,
    first_index: int = 0,
    audio: bool = False,
    codec: str = "libx264",
    pix_fmt: str = "yuv420p",
) -> Path:
    """A video of ``frames`` frames ``(H, W) = size``; ``pts`` (in ``time_base``) makes it VFR."""
    options = {"movflags": "+faststart"} if faststart and (format or path.suffix) in {"mp4", ".mp4"} else {}
    with av.open(str(path), "w", format=format, container_options=options) as out:
        codec_options = {"crf": "12", "preset": "ultrafast"} if codec == "libx264" else {}
        video = out.add_stream(codec, rate=fps, options=codec_options)
        video.width, video.height, video.pix_fmt = size[1], size[0], pix_fmt
        if time_base is not None:
            video.codec_context.time_base = time_base
        sound = out.add_stream("aac", rate=16000) if audio else None
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(frame_image(first_index + i, *size), format="rgb24")
            frame.pts = pts[i] if pts is not None else first_index + i
            if time_base is not None:
                frame.time_base = time_base
            out.mux(video.encode(frame))
        out.mux(video.encode())
        if sound is not None:
            _write_tone(out, sound, frames / fps)
    return path


def _write_tone(out: av.container.OutputContainer, sound: av.AudioStream, seconds: float) -> None:
    rate = sound.rate
    samples = int(rate * seconds)
    tone = (0.3 * np.sin(np.arange(samples) * 2 * np.pi * 440 / rate)).astype(np.float32)[None]
    for start in range(0, samples, 1024):
        chunk = av.AudioFrame.from_ndarray(tone[:, start : start + 1024].copy(), format="flt", layout="mono")
        chunk.sample_rate, chunk.pts = rate, start
        out.mux(sound.encode(chunk))
    out.mux(sound.encode())


def mdat_range(data: bytes) -> tuple[int, int]:
    """``(start, end)`` byte offsets of the payload of the first top-level ``mdat`` box of an MP4."""
    offset = 0
    while offset + 8 <= len(data):
        size, kind = struct.unpack(">I4s", data[offset : offset + 8])
        header = 8
        if size == 1:
            size, header = struct.unpack(">Q", data[offset + 8 : offset + 16])[0], 16
        if kind == b"mdat":
            return offset + header, min(offset + size, len(data))
        if size < header:
            break
        offset += size
    raise ValueError("no mdat box")


def truncate(data: bytes, fraction: float) -> bytes:
    return data[: int(len(data) * fraction)]


def corrupt(data: bytes, offsets: Sequence[int], xor: Sequence[int]) -> bytes:
    """``data`` with ``data[o] ^= x`` for each offset (``x`` in 1..255, so every byte changes)."""
    out = bytearray(data)
    for o, x in zip(offsets, xor):
        out[o % len(out)] ^= x
    return bytes(out)


# ---------------------------------------------------------------- malformed files


def _truncated_faststart(path: Path) -> Path:
    full = write_video(path.with_name("full-" + path.name), frames=16, size=(48, 64))
    path.write_bytes(truncate(full.read_bytes(), 0.6))
    full.unlink()
    return path


def _truncated_moov_at_end(path: Path) -> Path:
    full = write_video(path.with_name("full-" + path.name), frames=16, faststart=False)
    path.write_bytes(truncate(full.read_bytes(), 0.6))
    full.unlink()
    return path


def _corrupt_packets(path: Path) -> Path:
    full = write_video(path.with_name("full-" + path.name), frames=12).read_bytes()
    start, end = mdat_range(full)
    rng = np.random.default_rng(0)
    path.write_bytes(corrupt(full, rng.integers(start, end, 24).tolist(), rng.integers(1, 256, 24).tolist()))
    path.with_name("full-" + path.name).unlink()
    return path


def _garbage(path: Path) -> Path:
    path.write_bytes(np.random.default_rng(1).integers(0, 256, 16384, dtype=np.uint8).tobytes())
    return path


def _text(path: Path) -> Path:
    path.write_text("this is not a video\n" * 50)
    return path


def _empty(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def _mkv_named_mp4(path: Path) -> Path:
    return write_video(path, frames=12, format="matroska")


def _mp4_named_avi(path: Path) -> Path:
    return write_video(path, frames=12, format="mp4")


def _one_frame(path: Path) -> Path:
    return write_video(path, frames=1)


def _no_frames(path: Path) -> Path:
    with av.open(str(path), "w", format="matroska") as out:
        video = out.add_stream("ffv1", rate=12)
        video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        out.start_encoding()
    return path


def _odd_size(path: Path) -> Path:
    return write_video(path, frames=12, size=(47, 33), format="matroska", codec="ffv1", pix_fmt="yuv444p")


VFR_PTS = (0, 40, 80, 200, 240, 250, 260, 500, 540, 580, 900, 940)  # milliseconds


def _vfr(path: Path) -> Path:
    return write_video(path, frames=len(VFR_PTS), fps=25, pts=VFR_PTS, time_base=Fraction(1, 1000), format="matroska")


def _resolution_change(path: Path) -> Path:
    """MPEG-TS: 8 frames at 64x48, then the same stream continues at 96x64 (a new SPS mid-way)."""
    first = write_video(path.with_name("a.ts"), frames=8, size=(48, 64), format="mpegts")
    second = write_video(path.with_name("b.ts"), frames=8, size=(64, 96), format="mpegts", first_index=8)
    path.write_bytes(first.read_bytes() + second.read_bytes())
    first.unlink()
    second.unlink()
    return path


def _audio_only(path: Path) -> Path:
    with av.open(str(path), "w", format="mp4") as out:
        _write_tone(out, out.add_stream("aac", rate=16000), 0.5)
    return path


def png_header_image(path: Path, width: int, height: int) -> Path:
    """A valid 1-bit grayscale PNG of ``width x height`` (a few kB on disk, ``3*W*H`` bytes as RGB)."""
    row = b"\x00" + b"\x00" * ((width + 7) // 8)
    compressor, body = zlib.compressobj(9), []
    for _ in range(height):
        body.append(compressor.compress(row))
    body.append(compressor.flush())

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(body)) + chunk(b"IEND", b""))
    return path


def _huge_png(path: Path) -> Path:
    return png_header_image(path, 8192, 8192)  # 67 Mpx: 201 MB as RGB, decodable


def _huge_y4m(path: Path) -> Path:
    path.write_bytes(b"YUV4MPEG2 W12000 H12000 F25:1 Ip A1:1 C420jpeg\nFRAME\n" + bytes(4096))
    return path


Outcome = Literal["ok", "error", "either"]


@dataclass(frozen=True)
class Case:
    build: Callable[[Path], Path]
    suffix: str
    expect: Outcome
    frames: int | None = None  # frames a successful sanitize writes
    fragment: str = ""  # in the error line (besides the file name)


MALFORMED: dict[str, Case] = {
    "truncated": Case(_truncated_faststart, ".mp4", "error", fragment="truncated"),
    "truncated_no_index": Case(_truncated_moov_at_end, ".mp4", "error"),
    "corrupt_packets": Case(_corrupt_packets, ".mp4", "either", frames=12),
    "garbage": Case(_garbage, ".mp4", "error"),
    "text_as_video": Case(_text, ".mp4", "error"),
    "zero_length": Case(_empty, ".mp4", "error"),
    "no_frames": Case(_no_frames, ".mkv", "error"),
    "audio_only": Case(_audio_only, ".m4a", "error", fragment="no video stream"),
    "huge_png": Case(_huge_png, ".mp4", "error", fragment="pixels"),
    "huge_y4m": Case(_huge_y4m, ".y4m", "error", fragment="pixels"),
    "mkv_named_mp4": Case(_mkv_named_mp4, ".mp4", "ok", frames=12),
    "mp4_named_avi": Case(_mp4_named_avi, ".avi", "ok", frames=12),
    "one_frame": Case(_one_frame, ".mp4", "ok", frames=1),
    "odd_size": Case(_odd_size, ".mkv", "ok", frames=12),
    "vfr": Case(_vfr, ".mkv", "ok", frames=len(VFR_PTS)),
    "resolution_change": Case(_resolution_change, ".ts", "ok", frames=16),
}


def build_case(name: str, folder: Path) -> Path:
    case = MALFORMED[name]
    return case.build(folder / f"{name}{case.suffix}")


def kill_while_writing(cmd: list[str], folder: Path, delay: float, env: dict[str, str] | None = None) -> int:
    """Run ``cmd``; SIGKILL it ``delay`` s after its first file appears in ``folder``; its exit code."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 300
    while proc.poll() is None and not (folder.exists() and any(folder.iterdir())) and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        return proc.wait(delay)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(30)


# ---------------------------------------------------------------- misbehaving live source

Fault = Literal["ok", "drop", "stall", "garbage"]


class _SocketFile:
    """The write side PyAV needs to mux straight into a socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def write(self, data: bytes) -> int:
        self.sock.sendall(data)
        return len(data)


class FaultyStreamServer:
    """H.264 in MPEG-TS over TCP on 127.0.0.1, paced at ``fps``; connection ``k`` follows ``plan[k]``.

    Each step is ``(fault, frames)``: send ``frames`` frames, then ``"ok"``/``"drop"`` close the
    socket (graceful / reset), ``"stall"`` keeps it open and silent until the client hangs up (the
    next connection is served after that), ``"garbage"`` sends random
    bytes for a second and closes. After the plan, new connections are refused (the port closes).
    Frame indices (and pts) continue across connections, as a camera's clock would.
    """

    def __init__(self, plan: Sequence[tuple[Fault, int]], fps: int = 25, size: tuple[int, int] = (48, 64)) -> None:
        self.plan, self.fps, self.size = list(plan), fps, size
        self.sent = 0  # frames sent, all connections
        self.connections = 0
        self._stop = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.port = self._listener.getsockname()[1]
        self.url = f"tcp://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._serve, name="faulty-stream", daemon=True)

    def __enter__(self) -> FaultyStreamServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._listener.close()

    def _serve(self) -> None:
        for fault, frames in self.plan:
            conn = self._accept()
            if conn is None:
                return
            self.connections += 1
            with conn:
                try:
                    self._stream(conn, frames)
                    self._finish(conn, fault)
                except OSError:
                    pass  # the client hung up
        self._listener.close()

    def _accept(self) -> socket.socket | None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
                return conn
            except TimeoutError:
                continue
        return None

    def _stream(self, conn: socket.socket, frames: int) -> None:
        height, width = self.size
        out = av.open(_SocketFile(conn), "w", format="mpegts", options={"flush_packets": "1"})
        video = out.add_stream("libx264", rate=self.fps, options={"tune": "zerolatency", "preset": "ultrafast", "g": "8"})
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        for _ in range(frames):
            if self._stop.is_set():
                break
            frame = av.VideoFrame.from_ndarray(frame_image(self.sent, height, width), format="rgb24")
            frame.pts = self.sent
            out.mux(video.encode(frame))
            self.sent += 1
            time.sleep(1 / self.fps)
        out.mux(video.encode())
        out.close()

    def _finish(self, conn: socket.socket, fault: Fault) -> None:
        if fault == "drop":
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST
        elif fault == "stall":  # silent until the client hangs up
            conn.settimeout(0.05)
            while not self._stop.is_set():
                try:
                    if not conn.recv(4096):
                        return
                except TimeoutError:
                    continue
        elif fault == "garbage":
            rng = np.random.default_rng(self.connections)
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline and not self._stop.is_set():
                conn.sendall(rng.integers(0, 256, 1880, dtype=np.uint8).tobytes())
                time.sleep(0.02)


__all__ = [
    "frame_image", "read_index", "write_video", "mdat_range", "truncate", "corrupt", "png_header_image",
    "Case", "MALFORMED", "build_case", "VFR_PTS", "FaultyStreamServer", "kill_while_writing",
]  # fmt: skip
