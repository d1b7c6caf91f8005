"""Video and predictions out: the MP4 sink (H.264, audio copied) and the JSON-lines sink.

Sinks write to a hidden temporary name in the destination folder and rename on a successful
:meth:`close`, so a crash or a ``kill -9`` never leaves a half-written file under the final name.
An odd width or height is padded by one pixel (H.264 in ``yuv420p`` needs even sizes).
"""

from __future__ import annotations

import glob
import json
import os
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np

from .errors import InputError
from .io import VideoSource, first_line

MP4_AUDIO_COPY = frozenset({"aac", "mp3", "opus", "flac", "alac", "ac3", "eac3", "mp2"})  # audio codecs an MP4 takes as they are


def partial_name(path: Path) -> Path:
    """This process's temporary name for ``path``; stale ones left by killed writers are removed."""
    _remove_stale_partials(path)
    return path.with_name(f".{path.stem}.{os.getpid()}.partial{path.suffix}")


def _remove_stale_partials(path: Path) -> None:
    """Delete ``.STEM.PID.partial.SUFFIX`` files next to ``path`` whose writer process is gone."""
    for stale in path.parent.glob(f".{glob.escape(path.stem)}.*.partial{path.suffix}"):
        pid = stale.name[len(path.stem) + 2 : -len(f".partial{path.suffix}")]
        if pid.isdigit() and not _alive(int(pid)):
            stale.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class VideoSink:
    """H.264 (libx264, ``yuv420p``) writer with the source's timing, audio remuxed untouched.

    ``time_base`` given: frames keep their source ``pts`` (variable frame rate and dropped live
    frames keep their true timing); otherwise frame ``n`` is shown at ``n / fps``. Audio from
    ``audio_from`` is copied packet by packet, interleaved by time; a codec MP4 cannot hold
    (PCM, Vorbis...) is re-encoded to AAC instead. Odd sizes are padded by one pixel.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        width: int,
        height: int,
        fps: float,
        *,
        time_base: Fraction | None = None,
        audio_from: VideoSource | None = None,
        crf: int = 18,
        preset: str = "veryfast",
    ) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = partial_name(self.path)
        self.width, self.height = width + width % 2, height + height % 2
        self.source = audio_from
        self.frames = 0
        self._last_pts = -1
        rate = Fraction(fps).limit_denominator(1001)
        mp4 = self.path.suffix.lower() in {".mp4", ".m4v", ".mov"}
        try:
            self.container = av.open(str(self.tmp), "w", container_options={"movflags": "+faststart"} if mp4 else {})
        except (av.error.FFmpegError, OSError) as err:
            raise InputError(f"{self.path}: cannot write ({first_line(err)})") from None
        self.video = self.container.add_stream("libx264", rate=rate, options={"crf": str(crf), "preset": preset})
        self.video.width, self.video.height, self.video.pix_fmt = self.width, self.height, "yuv420p"
        self.time_base = time_base or 1 / rate
        self.video.codec_context.time_base = self.time_base
        self.audio, self._transcode = self._add_audio(audio_from, mp4)

    def _add_audio(self, source: VideoSource | None, mp4: bool) -> tuple[Any, bool]:
        template = source.audio_stream if source is not None else None
        if template is None:
            return None, False
        if mp4 and template.codec_context.name not in MP4_AUDIO_COPY:
            rate = template.codec_context.sample_rate or 48000
            return self.container.add_stream("aac", rate=rate), True
        return self.container.add_stream_from_template(template), False

    def write(self, image: np.ndarray, pts: int | None = None) -> None:
        """Encode one ``(H, W, 3)`` ``uint8`` RGB image; ``pts`` in ``time_base`` units."""
        if image.shape[0] != self.height or image.shape[1] != self.width:
            image = _pad_to(image, self.height, self.width)
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
        pts = self.frames if pts is None else pts
        frame.pts = self._last_pts = max(pts, self._last_pts + 1)
        frame.time_base = self.time_base
        self._mux_audio(until=float(frame.pts * self.time_base))
        self.container.mux(self.video.encode(frame))
        self.frames += 1

    def _mux_audio(self, until: float | None) -> None:
        if self.audio is None:
            return
        for packet in self.source.pop_audio(until):
            if self._transcode:
                for frame in packet.decode():
                    frame.pts = None
                    self.container.mux(self.audio.encode(frame))
            else:
                packet.stream = self.audio
                self.container.mux(packet)

    def close(self) -> None:
        """Flush the encoder, finish the container and move it to its final name."""
        try:
            self.container.mux(self.video.encode())
            self._mux_audio(until=None)
            if self._transcode:
                self.container.mux(self.audio.encode())
            self.container.close()
        except BaseException:
            self.abort()
            raise
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        """Discard everything written; nothing appears under the final name."""
        try:
            self.container.close()
        except (av.error.FFmpegError, OSError):
            pass
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> VideoSink:
        return self

    def __exit__(self, exc_type: type | None, *exc: object) -> None:
        self.abort() if exc_type is not None else self.close()


def _pad_to(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Repeat the last row/column of ``(h, w, 3)`` up to ``(height, width, 3)``."""
    h, w = image.shape[:2]
    return np.pad(image, ((0, height - h), (0, width - w), (0, 0)), mode="edge")


class JsonlSink:
    """One JSON record per line, flushed per record, renamed into place on :meth:`close`."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = partial_name(self.path)
        self.records = 0
        self._file = open(self.tmp, "w", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        self.records += 1

    def close(self) -> None:
        self._file.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self._file.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> JsonlSink:
        return self

    def __exit__(self, exc_type: type | None, *exc: object) -> None:
        self.abort() if exc_type is not None else self.close()


__all__ = ["VideoSink", "JsonlSink", "partial_name"]
