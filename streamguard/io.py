"""Video in and out, all through PyAV.

Sources (:func:`open_source`) yield :class:`Frame` objects: ``uint8`` RGB arrays ``(H, W, 3)``
with the display rotation applied and every pixel format (grayscale, 10-bit, ...) converted
to ``rgb24``. The sinks are in :mod:`streamguard.sinks`.

Decisions worth knowing:

* **Truncated files.** A file whose moov/index is missing fails at open. A file that decodes
  fewer frames than its header announces yields the frames it can decode and then raises
  :class:`InputError` ("truncated: decoded 7 of 12 frames"), unless ``tolerate_truncation=True``.
* **Timestamps.** ``Frame.time`` is seconds since the first decoded frame; ``Frame.pts`` is the
  source's presentation timestamp in ``VideoSource.time_base`` units (kept by the sink, so the
  output has the source's timing and the copied audio stays in sync).
* **Huge frames.** A stream whose header announces more than ``max_pixels`` (8K UHD by default)
  per frame is refused at open, from the stream header, before any frame is converted or queued.
* **Resolution changes.** Frames are scaled to the first frame's size, so a stream that changes
  resolution mid-way keeps one size (as sinks and clips need).
* **Live failures.** A read error on a live source is a :class:`StreamError` (as a stall is);
  :class:`ReconnectingSource` reopens the source instead, with backoff. A live source is opened in
  a helper thread (:func:`_open_interruptibly`), so Ctrl-C while a silent source is awaited stops
  at once instead of when the open timeout ends.
* **Cameras.** ``/dev/videoN`` opens with FFmpeg's ``video4linux2`` input; when PyAV cannot open
  it (no v4l2 support in the build, an unsupported pixel format) OpenCV's ``VideoCapture`` is used.
* **Real-time pacing** (``realtime=True``, ffmpeg's ``-re``). A file or a lavfi graph is read as
  fast as it decodes; paced, each frame is handed out no earlier than its presentation time
  (``Frame.time``) after the first one, on a monotonic clock started when iteration begins. A
  jump in the timestamps (backwards, or more than :data:`PACING_MAX_GAP` seconds ahead) restarts
  the clock instead of stalling. A paced source behaves like a camera, and the pipeline runs it in
  live mode. ``VideoSource.paced_wait`` adds up the seconds spent waiting.
* **Low latency.** Network streams open with :func:`demuxer_options`' defaults
  (``flags=+low_delay``, and ``rtsp_transport=tcp`` for RTSP), each overridable with ``options``
  (an empty value removes a default); ``fflags=+nobuffer`` is opt-in (see there why). Decoding uses frame threads
  for files (throughput) and slice threads for live sources (no frames held back in the decoder);
  ``flags=low_delay`` is also set on a live source's decoder.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import av
import numpy as np

from .errors import InputError, StreamError

NETWORK_SCHEMES = frozenset(
    {"rtsp", "rtsps", "rtmp", "rtmps", "tcp", "udp", "rtp", "srt", "http", "https", "hls", "mms", "mmsh"}
)
DEFAULT_FPS = 25.0
MAX_PIXELS = 7680 * 4320
PACING_MAX_GAP = 2.0  # seconds: a larger jump between consecutive frames' times restarts the pacing clock
LOW_DELAY_OPTIONS = {"flags": "+low_delay"}  # "+": added to FFmpeg's defaults
RTSP_OPTIONS = {"rtsp_transport": "tcp"}
_RTSP = frozenset({"rtsp", "rtsps"})
_CAMERA = re.compile(r"/dev/video\d+")


@dataclass
class Frame:
    """One decoded frame: ``image`` is ``(H, W, 3)`` ``uint8`` RGB."""

    image: np.ndarray
    index: int
    pts: int | None
    time: float


def first_line(err: BaseException) -> str:
    text = (getattr(err, "strerror", None) or str(err)).strip()
    return text.splitlines()[0] if text else type(err).__name__


class VideoSource:
    """An opened PyAV video source; iterate it for :class:`Frame` objects (once).

    The first frame is decoded at open, so an unreadable source fails there and ``width`` /
    ``height`` are the displayed (rotated) size. Audio packets of the first audio stream are
    kept (undecoded) for a :class:`VideoSink` that remuxes them.
    """

    def __init__(
        self, container: Any, name: str, *, live: bool, tolerate_truncation: bool = False, max_pixels: int = MAX_PIXELS,
        realtime: bool = False, codec_options: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.container = container
        self.is_live = live
        self.realtime = realtime
        self.paced_wait = 0.0
        self.tolerate_truncation = tolerate_truncation
        if not container.streams.video:
            container.close()
            raise InputError(f"{name}: no video stream")
        self.stream = container.streams.video[0]
        width, height = self.stream.codec_context.width, self.stream.codec_context.height
        if width * height > max_pixels:
            container.close()
            raise InputError(
                f"{name}: {width}x{height} frames ({width * height / 1e6:.1f} Mpixels) exceed the "
                f"{max_pixels / 1e6:.1f} Mpixel limit"
            )
        self.stream.thread_type = "SLICE" if live else "FRAME"  # frame threads hold frames back: not live
        if codec_options:
            self.stream.codec_context.options = dict(codec_options)
        self.audio_stream = container.streams.audio[0] if container.streams.audio else None
        rate = self.stream.average_rate or self.stream.guessed_rate
        self.fps = float(rate) if rate else DEFAULT_FPS
        self.time_base: Fraction | None = self.stream.time_base
        self.frame_count: int | None = None if live else (self.stream.frames or None)
        self.decoded = 0
        self._audio: deque[av.Packet] = deque(maxlen=4096)
        self._first_pts: int | None = None
        self._size: tuple[int, int] | None = None
        self._frames = self._decode()
        self._peeked = self._next_or_fail()
        self.height, self.width = self._peeked.image.shape[:2]

    def _next_or_fail(self) -> Frame:
        try:
            return next(self._frames)
        except StopIteration:
            self.close()
            raise InputError(f"{self.name}: no decodable video frames") from None

    def __iter__(self) -> Iterator[Frame]:
        return _paced(self._unpaced(), self) if self.realtime else self._unpaced()

    def _unpaced(self) -> Iterator[Frame]:
        if self._peeked is not None:
            first, self._peeked = self._peeked, None
            yield first
        yield from self._frames

    def _decode(self) -> Iterator[Frame]:
        streams = [self.stream] + ([self.audio_stream] if self.audio_stream is not None else [])
        try:
            for packet in self.container.demux(*streams):
                if packet.stream.type == "audio":
                    if packet.dts is not None:
                        self._audio.append(packet)
                    continue
                for frame in packet.decode():
                    yield self._to_frame(frame)
        except av.error.ExitError:
            raise StreamError(f"{self.name}: no data for {self._timeout_s()} s (source stalled)") from None
        except (av.error.FFmpegError, OSError) as err:
            if self.is_live and not self.tolerate_truncation:
                raise StreamError(f"{self.name}: connection lost after {self.decoded} frames ({first_line(err)})") from None
            if not self.tolerate_truncation:
                raise InputError(
                    f"{self.name}: corrupt or truncated after {self.decoded} frames ({first_line(err)})"
                ) from None
        if self.frame_count and self.decoded < self.frame_count and not self.tolerate_truncation:
            raise InputError(f"{self.name}: truncated: decoded {self.decoded} of {self.frame_count} frames")

    def _timeout_s(self) -> str:
        timeout = getattr(self.container, "read_timeout", None)
        return f"{timeout:g}" if isinstance(timeout, (int, float)) else "?"

    def _to_frame(self, frame: av.VideoFrame) -> Frame:
        quarter_turns = round(frame.rotation / 90) % 4 if frame.rotation else 0
        if self._size is None:
            self._size = (frame.width, frame.height)
        width, height = self._size
        image = frame.to_ndarray(format="rgb24", width=width, height=height)
        if quarter_turns:
            image = np.ascontiguousarray(np.rot90(image, k=quarter_turns))
        pts = frame.pts
        if pts is not None and self._first_pts is None:
            self._first_pts = pts
        if pts is not None and self.time_base is not None:
            seconds = float((pts - self._first_pts) * self.time_base)
        else:
            seconds = self.decoded / self.fps
        out = Frame(image, self.decoded, pts, seconds)
        self.decoded += 1
        return out

    def pop_audio(self, until: float | None = None) -> list[av.Packet]:
        """Audio packets demuxed so far whose time is ``<= until`` seconds (all when ``None``)."""
        out = []
        while self._audio:
            packet = self._audio[0]
            stamp = packet.pts if packet.pts is not None else packet.dts
            if until is not None and float(stamp * packet.time_base) > until:
                break
            out.append(self._audio.popleft())
        return out

    def close(self) -> None:
        """Close the container, unless a reader thread is blocked inside it (a stalled live read):
        freeing it under that thread would crash; it is released when that thread finishes."""
        frames = getattr(self, "_frames", None)
        if frames is not None and getattr(frames, "gi_running", False):
            return
        self.container.close()

    def __enter__(self) -> VideoSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        kind = "live" if self.is_live else f"{self.frame_count or '?'} frames"
        return f"VideoSource({self.name!r}, {self.width}x{self.height} @ {self.fps:.3g} fps, {kind})"


class OpenCVSource(VideoSource):
    """Camera fallback through ``cv2.VideoCapture`` (no audio, wall-clock timestamps)."""

    def __init__(self, capture: Any, name: str) -> None:
        import cv2

        self.name = name
        self.capture = capture
        self.is_live = True
        self.tolerate_truncation = True
        self.stream = None
        self.audio_stream = None
        self.fps = float(capture.get(cv2.CAP_PROP_FPS)) or DEFAULT_FPS
        self.realtime = False
        self.paced_wait = 0.0
        self.time_base = None
        self.frame_count = None
        self.decoded = 0
        self._audio = deque()
        self._frames = self._read()
        self._peeked = self._next_or_fail()
        self.height, self.width = self._peeked.image.shape[:2]

    def _read(self) -> Iterator[Frame]:
        import cv2

        start = time.monotonic()
        while True:
            ok, bgr = self.capture.read()
            if not ok:
                return
            yield Frame(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), self.decoded, None, time.monotonic() - start)
            self.decoded += 1

    def close(self) -> None:
        self.capture.release()


def _paced(frames: Iterator[Frame], source: VideoSource) -> Iterator[Frame]:
    """``frames``, each handed out no earlier than its ``time`` after the first (see the module docstring)."""
    anchor = last = None  # monotonic time of Frame.time 0; the previous frame's time
    for frame in frames:
        now = time.monotonic()
        if anchor is None or frame.time < last or frame.time - last > PACING_MAX_GAP:
            anchor = now - frame.time  # first frame or a timestamp jump: (re)start the clock here
        elif (wait := anchor + frame.time - now) > 0:
            time.sleep(wait)
            source.paced_wait += wait
        last = frame.time
        yield frame


def demuxer_options(uri: str, options: dict[str, str] | None = None) -> dict[str, str]:
    """The demuxer/decoder options ``open_source`` uses for ``uri``: defaults, then ``options``.

    Network streams default to low latency: ``flags=+low_delay`` (the decoder outputs frames as
    soon as it can) and, for RTSP, ``rtsp_transport=tcp`` (no UDP packet loss behind firewalls and
    NAT). Files and lavfi graphs get no defaults. An entry of ``options`` replaces a default; an
    empty value removes it.

    ``fflags=+nobuffer`` (ffplay's low-latency tip) is *not* a default: it discards the packets
    read while probing the stream, keyframe included, so decoding starts only at the next keyframe
    (measured: a 25 fps MPEG-TS stream with x264's default 250-frame GOP opened 10 s late; a lavfi
    graph loses its first frame). What it saves, the probe packets' backlog, live mode drops
    anyway (newest frames win). Pass it where the GOP is short and the first second matters.
    """
    scheme = urlparse(str(uri)).scheme
    merged: dict[str, str] = {}
    if scheme in NETWORK_SCHEMES:
        merged |= LOW_DELAY_OPTIONS
    if scheme in _RTSP:
        merged |= RTSP_OPTIONS
    merged |= {str(k): str(v) for k, v in (options or {}).items()}
    return {k: v for k, v in merged.items() if v != ""}


def is_live_uri(uri: str | os.PathLike[str]) -> bool:
    """Whether ``uri`` is a live source (a network stream or a camera) rather than a file or lavfi graph."""
    uri = str(uri)
    return bool(_CAMERA.fullmatch(uri)) or urlparse(uri).scheme in NETWORK_SCHEMES


def _open_av(uri: str, name: str, *, format: str | None, live: bool, timeout: float,
             tolerate_truncation: bool, options: dict[str, str] | None = None,
             max_pixels: int = MAX_PIXELS, realtime: bool = False) -> VideoSource:
    options = options or {}
    try:
        if live:
            container = _open_interruptibly(uri, format=format, options=options, timeout=timeout)
        else:
            container = av.open(uri, format=format, options=options)
    except av.error.ExitError:
        raise StreamError(f"{name}: no answer within {timeout:g} s") from None
    except (av.error.FFmpegError, OSError) as err:
        raise InputError(f"{name}: cannot open ({first_line(err)})") from None
    codec_options = {k: options[k] for k in ("flags", "flags2") if k in options}
    try:
        return VideoSource(container, name, live=live, tolerate_truncation=tolerate_truncation, max_pixels=max_pixels,
                           realtime=realtime, codec_options=codec_options)
    except BaseException:
        container.close()
        raise


def _open_interruptibly(uri: str, **kw: Any) -> Any:
    """``av.open`` of a live source in a daemon thread, waited for in short joins: FFmpeg does not
    return to Python while it waits for a silent source (up to the open timeout), so Ctrl-C would
    otherwise be seen only when that timeout ends. Interrupted, the container is closed whenever
    the thread gets it."""
    done: dict[str, Any] = {}
    lock = threading.Lock()

    def run() -> None:
        try:
            container = av.open(uri, **kw)
        except BaseException as err:  # handed to the caller
            done["error"] = err
            return
        with lock:
            if done.get("abandoned"):
                container.close()
            else:
                done["container"] = container

    thread = threading.Thread(target=run, name="open", daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(0.1)
    except BaseException:
        with lock:
            done["abandoned"] = True
            if "container" in done:
                done.pop("container").close()
        raise
    if "error" in done:
        raise done["error"]
    return done["container"]


def _open_camera(uri: str, timeout: float, options: dict[str, str] | None = None) -> VideoSource:
    try:
        return _open_av(uri, uri, format="video4linux2", live=True, timeout=timeout, tolerate_truncation=True,
                        options=options)
    except (InputError, StreamError) as av_error:
        import cv2

        capture = cv2.VideoCapture(uri)
        if not capture.isOpened():
            raise InputError(f"{uri}: cannot open camera ({av_error})") from None
        return OpenCVSource(capture, uri)


def open_source(
    uri: str | os.PathLike[str],
    *,
    live: bool | None = None,
    timeout: float = 10.0,
    format: str | None = None,
    tolerate_truncation: bool = False,
    max_pixels: int = MAX_PIXELS,
    realtime: bool = False,
    options: dict[str, str] | None = None,
) -> VideoSource:
    """Open a file, a lavfi graph, a network stream or a camera.

    ``uri`` forms: a path (``clip.mp4``), ``lavfi:testsrc=size=64x48:rate=8:duration=1`` (or the
    graph with ``format="lavfi"``), a URL (``rtsp://``, ``tcp://``, ``http(s)://``, ``srt://``,
    ``udp://``; ``live`` defaults to ``True`` for these), or ``/dev/videoN``. ``timeout`` bounds
    every blocking network read, so a stalled live source raises :class:`StreamError`. A stream
    whose frames have more than ``max_pixels`` pixels is refused (:class:`InputError`).

    ``realtime=True`` paces the frames at the source's own rate (by their presentation times, as
    ffmpeg's ``-re``): meant for files and lavfi graphs standing in for a camera; live sources are
    real time already. ``options`` are FFmpeg demuxer options (``{"rtsp_transport": "udp"}``,
    ``{"probesize": "32"}``...) merged over :func:`demuxer_options`' low-latency defaults for network
    streams; ``flags``/``flags2`` also reach the decoder.
    """
    uri = str(uri)
    if uri.startswith("lavfi:") or format == "lavfi":
        graph = uri.removeprefix("lavfi:")
        return _open_av(graph, f"lavfi:{graph}", format="lavfi", live=bool(live), timeout=timeout,
                        tolerate_truncation=tolerate_truncation, max_pixels=max_pixels, realtime=realtime,
                        options=demuxer_options(graph, options))
    if _CAMERA.fullmatch(uri):
        return _open_camera(uri, timeout, demuxer_options(uri, options))  # real time already
    if urlparse(uri).scheme in NETWORK_SCHEMES:
        live = True if live is None else live
        return _open_av(uri, uri, format=format, live=live, timeout=timeout,
                        tolerate_truncation=tolerate_truncation, max_pixels=max_pixels, realtime=realtime,
                        options=demuxer_options(uri, options))
    path = Path(uri)
    if not path.is_file():
        raise InputError(f"video not found: {path}")
    return _open_av(uri, uri, format=format, live=bool(live), timeout=timeout,
                    tolerate_truncation=tolerate_truncation, max_pixels=max_pixels, realtime=realtime,
                    options=demuxer_options(uri, options))


class ReconnectingSource:
    """A live source that reopens ``uri`` when it stalls, drops, sends garbage or ends.

    Up to ``attempts`` tries in a row (the count restarts once frames flow again), waiting
    ``backoff * 2**k`` seconds (at most 8) before try ``k``; :class:`StreamError` when they run out.
    The frames form one stream: indices continue, ``pts`` continue on the first connection's time
    base (the outage is not kept as a gap), and every image has the first connection's size
    (resized if a reconnect brings another). ``events`` lists what happened, one line each.
    Audio is not carried (``audio_stream`` is ``None``). ``options`` and ``realtime`` are passed to
    every :func:`open_source`.
    """

    MAX_BACKOFF = 8.0

    def __init__(self, uri: str, *, attempts: int, timeout: float = 10.0, backoff: float = 0.25,
                 options: dict[str, str] | None = None, realtime: bool = False) -> None:
        self.uri, self.name = uri, uri
        self.attempts, self.timeout, self.backoff = attempts, timeout, backoff
        self.options, self.realtime = options, realtime
        self.paced_wait = 0.0
        self.is_live = True
        self.frame_count = None
        self.audio_stream = None
        self.events: list[str] = []
        self.reconnects = 0
        self.decoded = 0
        self._closed = threading.Event()
        self._current: VideoSource | None = None
        self._current = self._open("first connection", first=True)
        first = self._current
        self.width, self.height, self.fps = first.width, first.height, first.fps
        self.time_base = first.time_base or Fraction(1, 90000)
        self._step = max(1, round(1 / (self.fps * self.time_base)))  # one frame interval in time_base units
        self._next_pts = 0

    def _open(self, reason: str, first: bool = False) -> VideoSource:
        for attempt in range(0 if first else 1, self.attempts + 1):
            if attempt:
                delay = min(self.backoff * 2 ** (attempt - 1), self.MAX_BACKOFF)
                self.events.append(f"{self.uri}: {reason}; reconnecting in {delay:g} s ({attempt}/{self.attempts})")
                if self._closed.wait(delay):
                    break
            try:
                source = open_source(self.uri, live=True, timeout=self.timeout, options=self.options,
                                     realtime=self.realtime)
            except (InputError, StreamError) as err:
                reason = str(err).removeprefix(f"{self.uri}: ")
                continue
            self.reconnects += attempt > 0
            return source
        raise StreamError(f"{self.uri}: {reason}; gave up after {self.attempts} reconnect attempt(s)")

    def __iter__(self) -> Iterator[Frame]:
        while True:
            try:
                yield from self._frames_of(self._current)
                reason = "the stream ended"
            except (InputError, StreamError) as err:
                reason = str(err).removeprefix(f"{self.uri}: ")
            if self._closed.is_set():
                return
            self._current.close()
            self._current = self._open(reason)

    def _frames_of(self, source: VideoSource) -> Iterator[Frame]:
        """``source``'s frames re-timed onto this stream's time line and resized to its size."""
        base: int | None = None
        waited = source.paced_wait
        for frame in source:
            self.paced_wait += source.paced_wait - waited
            waited = source.paced_wait
            pts = frame.pts if frame.pts is not None and source.time_base else frame.index * self._step
            if source.time_base and source.time_base != self.time_base:
                pts = round(pts * source.time_base / self.time_base)
            if base is None:
                base = self._next_pts - pts
            out_pts = max(pts + base, self._next_pts)
            image = frame.image
            if image.shape[:2] != (self.height, self.width):
                import cv2

                image = cv2.resize(image, (self.width, self.height), interpolation=cv2.INTER_AREA)
            yield Frame(image, self.decoded, out_pts, float(out_pts * self.time_base))
            self.decoded += 1
            self._next_pts = out_pts + self._step

    def pop_audio(self, until: float | None = None) -> list[av.Packet]:
        return []

    def close(self) -> None:
        self._closed.set()
        if self._current is not None:
            self._current.close()

    def __enter__(self) -> ReconnectingSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ReconnectingSource({self.uri!r}, {self.width}x{self.height} @ {self.fps:.3g} fps, {self.reconnects} reconnects)"


__all__ = ["Frame", "VideoSource", "OpenCVSource", "ReconnectingSource", "open_source", "demuxer_options", "is_live_uri",
           "NETWORK_SCHEMES", "first_line"]  # fmt: skip
