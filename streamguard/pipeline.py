"""The streaming pipeline: decode -> clip assembly + defense -> downstream model -> sinks.

Each stage is a thread joined to the next by a bounded queue, so decoding, the detector, the
model and the encoder overlap. Two modes:

* **file** (default for files): back-pressure, nothing is dropped; every frame is sanitized
  exactly once and written in order.
* **live** (default for network sources, cameras and sources paced with ``realtime=True``): the
  decoder never waits; when the defense falls behind, the oldest undelivered frame is dropped
  (newest frames win, as Ultralytics' ``stream_buffer=False`` / Roboflow's ``DROP_OLDEST``) and
  counted, which keeps latency bounded by the queue sizes rather than by the backlog. The decode
  queue holds one defense clip (``clip_len`` frames): the newest consecutive frames, so temporal
  fusion still sees neighbours.

``vid_stride=N`` runs the downstream model on every ``N``-th classifier window (clip models) or
every ``N``-th sanitized frame (frame detectors) only; the defense still runs on every frame.
``snapshot=PATH`` keeps a JPEG of ``input | mask | sanitized`` (:func:`overlay`) of the latest
frame, rewritten atomically every ``snapshot_every`` seconds, for a person to look at.

An exception in any stage stops every thread and is re-raised in the caller with the stage's
name (``err.stage``; a :class:`StreamGuardError`'s message is prefixed with ``[stage]``).
``KeyboardInterrupt`` stops the threads too, but the outputs are *finalized and kept* under their
final names (as ffmpeg does): the part written so far is a playable MP4. So are a live run's
outputs when it fails (a stream that stalls or drops): the error is raised after they are closed.
A process killed outright (SIGKILL) never leaves a file under the final name (see :mod:`streamguard.io`).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import torch
from torch import Tensor

from .errors import ConfigError, InputError, StreamGuardError
from .io import Frame, VideoSource
from .resize import resize_uint8
from .sinks import JsonlSink, VideoSink, partial_name

if TYPE_CHECKING:
    from .defenses import Defense

LATENCY_WINDOW = 100_000  # frames the summary's latency percentiles cover (about an hour at 25 fps)
STATUS_WINDOW = 250  # latest frames a Status's latency percentiles cover (10 s at 25 fps)

_END = object()


class _Stopped(Exception):
    """Raised inside a stage when another stage failed or the caller was interrupted."""


@dataclass
class Item:
    """A sanitized frame on its way to the sinks."""

    frame: Frame
    received: float  # time.monotonic() when decoded
    clean: np.ndarray  # (H, W, 3) uint8 RGB, what is written
    mask: np.ndarray  # (H, W) bool, True = repainted pixel
    masked: float  # fraction of repainted pixels
    small: np.ndarray | None = None  # (h, w, 3) uint8: ``clean`` at the detector's working size, when known


@dataclass
class Status:
    """A snapshot given to ``on_progress`` (from the caller's thread)."""

    decoded: int
    written: int
    total: int | None
    dropped: int
    clips: int
    detections: int
    elapsed: float
    fps: float
    latency: float  # seconds from decode to write, last frame
    latency_p50: float = 0.0  # over the latest STATUS_WINDOW frames
    latency_p95: float = 0.0


@dataclass
class Summary:
    source: str
    live: bool
    width: int
    height: int
    frames: int
    dropped: int
    chunks: int  # defense calls' clips
    clips: int  # downstream clip predictions
    detections: int  # downstream frame-detector boxes above min_score
    frames_with_patches: int
    mean_masked_area: float
    wall_time: float
    fps: float
    latency_mean: float
    latency_max: float
    latency_p50: float = 0.0  # over the last LATENCY_WINDOW frames
    latency_p95: float = 0.0
    vid_stride: int = 1  # the model ran on every vid_stride-th window (clip model) or frame (frame detector)
    model_runs: int = 0  # windows classified or frames run through the frame detector
    snapshots: int = 0  # times the snapshot JPEG was (re)written
    stage_busy: dict[str, float] = field(default_factory=dict)  # seconds each stage spent working
    outputs: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Pipeline:
    """Sanitize a :class:`VideoSource` with ``defense`` and optionally run ``model`` on the result.

    ``defense`` follows the sanitize protocol (``sanitize(x) -> (x_clean, mask)`` on
    ``(N, 3, T, H, W)`` in [0, 1]; ``reset()``), or is ``None`` to pass frames through.
    It sees chunks of ``clip_len`` consecutive frames, ``batch`` chunks per call. ``model`` is a
    clip classifier (``spec.task == "clip"``: windows of ``spec.clip_len`` sanitized frames resized
    to ``spec.input_size``, every ``stride`` frames) or a torchvision-style frame detector
    (``spec.task == "frame"``), or ``None``. A video shorter than one window is classified once,
    its last frame repeated. ``queue`` bounds how many frames the decoder may run ahead.
    ``vid_stride`` (>= 1) runs the model on every ``vid_stride``-th window / frame only; ``snapshot``
    is a JPEG path rewritten every ``snapshot_every`` seconds (see the module docstring). ``live``
    defaults to the source's ``is_live or realtime``.
    """

    def __init__(
        self,
        source: VideoSource,
        defense: Defense | None = None,
        model: torch.nn.Module | None = None,
        *,
        output: str | Path | None = None,
        predictions: str | Path | None = None,
        overlay: str | Path | None = None,
        clip_len: int | None = None,
        stride: int | None = None,
        batch: int = 4,
        queue: int = 8,
        topk: int = 5,
        min_score: float = 0.5,
        device: str | torch.device = "cpu",
        live: bool | None = None,
        duration: float | None = None,
        crf: int = 18,
        vid_stride: int = 1,
        snapshot: str | Path | None = None,
        snapshot_every: float = 1.0,
    ) -> None:
        self.source = source
        self.defense = defense
        self.model = model
        self.spec = getattr(model, "spec", None)
        named = {"output": output, "predictions": predictions, "overlay": overlay, "snapshot": snapshot}
        self.outputs = {k: Path(v) for k, v in named.items() if v}
        if "snapshot" in self.outputs and self.outputs["snapshot"].suffix.lower() not in {".jpg", ".jpeg"}:
            raise ConfigError(f"{self.outputs['snapshot']}: a snapshot is a JPEG (.jpg or .jpeg)")
        self.vid_stride = vid_stride
        self.snapshot_every = snapshot_every
        model_len = self.spec.clip_len if self.spec is not None and self.spec.task == "clip" else None
        self.clip_len = clip_len or model_len or 16
        self.window = model_len or 1
        self.stride = stride or self.window
        self.batch = batch
        self.queue = queue
        self.topk = topk
        self.min_score = min_score
        self.device = torch.device(device)
        self.live = (source.is_live or bool(getattr(source, "realtime", False))) if live is None else live
        self.duration = duration
        self.crf = crf
        if self.clip_len < 1 or self.stride < 1 or batch < 1 or vid_stride < 1:
            raise ValueError("clip_len, stride, batch and vid_stride must be >= 1")
        if snapshot_every <= 0:
            raise ValueError("snapshot_every must be > 0")
        for module in (defense, model):
            if isinstance(module, torch.nn.Module):
                module.to(self.device).eval()
        self._reset()

    def stop(self) -> None:
        """Ask :meth:`run`, running in another thread, to finish as if the source had ended
        (sinks are closed, not aborted). For many streams at once (:mod:`streamguard.fleet`)."""
        self._stop.set()

    # ---------------------------------------------------------------- run

    def run(self, on_progress: Callable[[Status], None] | None = None, interval: float = 0.25) -> Summary:
        """Process the whole source (or ``duration`` seconds of it) and return a :class:`Summary`."""
        self._reset()
        if hasattr(self.defense, "reset"):
            self.defense.reset()
        sinks = self._open_sinks()
        frames_q: queue.Queue = queue.Queue(self.clip_len if self.live else max(self.queue, self.clip_len * self.batch))
        clean_q: queue.Queue = queue.Queue(1 if self.live else 2)
        out_q: queue.Queue = queue.Queue(1 if self.live else 2)
        stages = [("decode", self._decode, frames_q), ("defense", self._defend, frames_q, clean_q)]
        if self.model is not None:
            stages.append(("model", self._predict, clean_q, out_q))
        else:
            out_q = clean_q
        stages.append(("write", self._write, out_q, sinks))
        threads = [self._spawn(name, fn, *args) for name, fn, *args in stages]
        interrupted = False
        try:
            while threads[-1].is_alive():
                threads[-1].join(interval)
                if on_progress is not None:
                    on_progress(self.status())
        except KeyboardInterrupt:
            interrupted = True
        self._stop.set()
        for thread in threads:  # a live decoder may sit in a network read: bounded wait, then leave it
            thread.join(timeout=1.0 if self.live and thread is threads[0] else None)
        self._wall = time.monotonic() - self._start
        if self._error is not None:
            keep = self.live and self.written > 0 and self._error[0] != "write"
            for sink in sinks.values():
                sink.close() if keep else sink.abort()
            raise self._stage_error()
        for sink in sinks.values():
            sink.close()
        if interrupted:
            raise KeyboardInterrupt
        if on_progress is not None:
            on_progress(self.status())
        return self.summary()

    def _reset(self) -> None:
        self._stop = threading.Event()
        self._error: tuple[str, BaseException] | None = None
        self._start = time.monotonic()
        self._wall = 0.0
        self.decoded = self.written = self.dropped = self.chunks = self.clips = self.detections = 0
        self.patched_frames = self.model_runs = self.snapshots = 0
        self._model_inputs = 0  # windows (clip model) or frames (frame detector) offered to the model
        self._next_snapshot = 0.0
        self._masked_sum = 0.0
        self._latency_last = 0.0
        self._latency_sum = self._latency_max = 0.0
        self._latencies: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self.busy = {"decode": 0.0, "defense": 0.0, "model": 0.0, "write": 0.0}

    def _open_sinks(self) -> dict[str, Any]:
        src = self.source
        sinks: dict[str, Any] = {}
        try:
            if "output" in self.outputs:
                sinks["output"] = VideoSink(self.outputs["output"], src.width, src.height, src.fps,
                                            time_base=src.time_base, audio_from=src, crf=self.crf)
            if "overlay" in self.outputs:
                sinks["overlay"] = VideoSink(self.outputs["overlay"], 3 * src.width, src.height, src.fps,
                                             time_base=src.time_base, crf=self.crf)
            if "predictions" in self.outputs:
                sinks["predictions"] = JsonlSink(self.outputs["predictions"])
        except BaseException:
            for sink in sinks.values():
                sink.abort()
            raise
        return sinks

    def _spawn(self, name: str, fn: Callable[..., None], *args: Any) -> threading.Thread:
        def target() -> None:
            try:
                fn(*args)
            except _Stopped:
                pass
            except BaseException as err:  # noqa: BLE001 - handed to the caller's thread
                if self._error is None:
                    self._error = (name, err)
                self._stop.set()

        thread = threading.Thread(target=target, name=f"streamguard-{name}", daemon=True)
        thread.start()
        return thread

    def _stage_error(self) -> BaseException:
        name, err = self._error
        err.stage = name
        if isinstance(err, StreamGuardError):
            err.args = (f"[{name}] {err}",)
        else:
            err.add_note(f"raised in pipeline stage {name!r}")
        return err

    # ---------------------------------------------------------------- queues

    def _put(self, q: queue.Queue, item: Any) -> None:
        while not self._stop.is_set():
            try:
                q.put(item, timeout=0.05)
                return
            except queue.Full:
                pass
        raise _Stopped

    def _get(self, q: queue.Queue) -> Any:
        while not self._stop.is_set():
            try:
                return q.get(timeout=0.05)
            except queue.Empty:
                pass
        raise _Stopped

    def _put_newest(self, q: queue.Queue, item: Any) -> None:
        """Live mode: never wait; make room by dropping the oldest queued frame."""
        while True:
            try:
                q.put_nowait(item)
                return
            except queue.Full:
                try:
                    q.get_nowait()
                    self.dropped += 1
                except queue.Empty:
                    pass

    # ---------------------------------------------------------------- stages

    def _frames(self) -> Iterator[Frame]:
        it = iter(self.source)
        while True:
            tic, waited = time.perf_counter(), getattr(self.source, "paced_wait", 0.0)
            frame = next(it, None)
            paced = getattr(self.source, "paced_wait", 0.0) - waited  # realtime pacing is not work
            self.busy["decode"] += time.perf_counter() - tic - paced
            if frame is None:
                return
            yield frame

    def _decode(self, out: queue.Queue) -> None:
        put = self._put_newest if self.live else self._put
        for frame in self._frames():
            if self._stop.is_set():
                raise _Stopped
            if self.duration is not None:
                elapsed = time.monotonic() - self._start if self.live else frame.time
                if elapsed >= self.duration:
                    break
            put(out, (frame, time.monotonic()))
            self.decoded += 1
        self._put(out, _END)

    def _defend(self, inq: queue.Queue, out: queue.Queue) -> None:
        chunk: list[tuple[Frame, float]] = []
        chunks: list[list[tuple[Frame, float]]] = []
        while (item := self._get(inq)) is not _END:
            chunk.append(item)
            if len(chunk) == self.clip_len:
                chunks, chunk = chunks + [chunk], []
            if len(chunks) == self.batch or (self.live and chunks):
                self._put(out, self._sanitize(chunks))
                chunks = []
        for group in (chunks, [chunk]):
            if group and group[0]:
                self._put(out, self._sanitize(group))
        self._put(out, _END)

    @torch.inference_mode()
    def _sanitize(self, chunks: list[list[tuple[Frame, float]]]) -> list[Item]:
        """Run the defense on ``N`` chunks of ``T`` frames: one ``(N, 3, T, H, W)`` batch."""
        tic = time.perf_counter()
        if self.defense is None:  # pass-through: no float round trip (about 20 ms a 720p frame on 2 cores)
            items = [Item(frame, received, frame.image, np.zeros(frame.image.shape[:2], bool), 0.0)
                     for chunk in chunks for frame, received in chunk]
            self.chunks += len(chunks)
            self.busy["defense"] += time.perf_counter() - tic
            return items
        if hasattr(self.defense, "sanitize_frames"):  # PatchZero: resize and repaint in uint8
            out = self.defense.sanitize_frames([[frame.image for frame, _ in chunk] for chunk in chunks])
            clean_u8, masks, small = out.clean, out.mask, out.small
        else:
            images = np.stack([[frame.image for frame, _ in chunk] for chunk in chunks])  # (N, T, H, W, 3)
            x = torch.from_numpy(images).to(self.device).permute(0, 4, 1, 2, 3).float().div_(255)
            clean, mask = self.defense.sanitize(x)
            clean_u8 = clean.mul(255).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 4, 1).cpu().numpy()
            masks, small = (mask[:, 0] > 0.5).cpu().numpy(), None  # (N, T, H, W)
        items = [
            Item(frame, received, clean_u8[n][t], masks[n][t], float(np.count_nonzero(masks[n][t]) / masks[n][t].size),
                 None if small is None else small[n, t])
            for n, chunk in enumerate(chunks)
            for t, (frame, received) in enumerate(chunk)
        ]
        self.chunks += len(chunks)
        self.busy["defense"] += time.perf_counter() - tic
        return items

    def _strided(self, count: int) -> list[bool]:
        """Which of the next ``count`` windows / frames the model runs on (every ``vid_stride``-th)."""
        first = self._model_inputs
        self._model_inputs += count
        return [(first + i) % self.vid_stride == 0 for i in range(count)]

    def _predict(self, inq: queue.Queue, out: queue.Queue) -> None:
        window: list[list[Any]] = []  # [item, resized frame or None (not needed yet)]
        position = next_start = 0
        while (items := self._get(inq)) is not _END:
            tic = time.perf_counter()
            if self.spec.task == "frame":
                records = self._detect([item for item, run in zip(items, self._strided(len(items))) if run])
            else:
                window += [[item, None] for item in items]
                position += len(items)
                starts = []
                while next_start + self.window <= position:
                    starts.append(next_start)
                    next_start += self.stride
                offset = position - len(window)
                starts = [s for s, run in zip(starts, self._strided(len(starts))) if run]
                records = self._classify([window[s - offset: s - offset + self.window] for s in starts])
                window = window[max(0, next_start - offset):]
            self.busy["model"] += time.perf_counter() - tic
            self._put(out, (items, records))
        if self.spec.task == "clip" and self._model_inputs == 0 and window:
            window += [window[-1]] * (self.window - len(window))
            self._put(out, ([], self._classify([window])))
        self._put(out, _END)

    def _resize(self, items: list[Item]) -> Tensor:
        """Sanitized frames as ``(len(items), 3, h, w)`` float at ``spec.input_size``.

        Resized as the data sets and the attacks resize them (:func:`~streamguard.resize.resize_uint8`:
        area averaging to shrink, bilinear to enlarge), so the model sees what it was trained and
        attacked at; when the model's size is the detector's working size, the defense already made them.
        """
        size = tuple(self.spec.input_size)
        frames = [item.small if item.small is not None and item.small.shape[:2] == size else resize_uint8(item.clean, size)
                  for item in items]  # fmt: skip
        return torch.from_numpy(np.stack(frames)).to(self.device).permute(0, 3, 1, 2).float().div_(255)

    @torch.inference_mode()
    def _classify(self, windows: list[list[list[Any]]]) -> list[dict[str, Any]]:
        if not windows:
            return []
        missing = list({id(e): e for w in windows for e in w if e[1] is None}.values())
        if missing:
            for entry, x in zip(missing, self._resize([e[0] for e in missing])):
                entry[1] = x
        clips = torch.stack([torch.stack([x for _, x in w], dim=1) for w in windows])  # (N, 3, T, h, w)
        probs = self.model(clips).softmax(dim=1)
        scores, labels = probs.topk(min(self.topk, probs.shape[1]), dim=1)
        records = []
        for w, s, l in zip(windows, scores.tolist(), labels.tolist()):
            first, last = w[0][0].frame, w[-1][0].frame
            records.append({
                "start": round(first.time, 6),
                "end": round(last.time + 1 / self.source.fps, 6),
                "start_frame": first.index,
                "end_frame": last.index,
                "topk": [{"label": k, "name": self._name(k), "score": round(p, 6)} for k, p in zip(l, s)],
                "masked_fraction": round(float(np.mean([item.masked for item, _ in w])), 6),
                "vid_stride": self.vid_stride,
            })
        self.clips += len(records)
        self.model_runs += len(records)
        return records

    @torch.inference_mode()
    def _detect(self, items: list[Item]) -> list[dict[str, Any]]:
        if not items:
            return []
        images = [torch.from_numpy(item.clean).to(self.device).permute(2, 0, 1).float().div_(255) for item in items]
        records = []
        for item, det in zip(items, self.model(images)):
            keep = det["scores"] >= self.min_score
            boxes, labels, scores = det["boxes"][keep].tolist(), det["labels"][keep].tolist(), det["scores"][keep].tolist()
            records.append({
                "frame": item.frame.index,
                "time": round(item.frame.time, 6),
                "masked_fraction": round(item.masked, 6),
                "vid_stride": self.vid_stride,
                "detections": [
                    {"box": [round(v, 2) for v in b], "label": k, "name": self._name(k), "score": round(p, 6)}
                    for b, k, p in zip(boxes, labels, scores)
                ],
            })
            self.detections += len(boxes)
        self.model_runs += len(records)
        return records

    def _name(self, label: int) -> str:
        names = self.spec.class_names
        return names[label] if 0 <= label < len(names) else str(label)

    def _write(self, inq: queue.Queue, sinks: dict[str, Any]) -> None:
        while (got := self._get(inq)) is not _END:
            items, records = got if isinstance(got, tuple) else (got, [])
            tic = time.perf_counter()
            for item in items:
                if "output" in sinks:
                    sinks["output"].write(item.clean, item.frame.pts)
                if "overlay" in sinks:
                    sinks["overlay"].write(overlay(item.frame.image, item.mask, item.clean), item.frame.pts)
                if "snapshot" in self.outputs and time.monotonic() >= self._next_snapshot:
                    self._write_snapshot(item)
                self._account(item)
            for record in records:
                if "predictions" in sinks:
                    sinks["predictions"].write(record)
            self.busy["write"] += time.perf_counter() - tic

    def _write_snapshot(self, item: Item) -> None:
        """``input | mask | sanitized`` of ``item`` as a JPEG: temporary name, then ``os.replace``."""
        path = self.outputs["snapshot"]
        panels = overlay(item.frame.image, item.mask, item.clean)
        ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(panels, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 85])
        if not ok:
            raise InputError(f"{path}: cannot encode the snapshot")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = partial_name(path)
        try:
            tmp.write_bytes(jpeg.tobytes())
            os.replace(tmp, path)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            raise InputError(f"{path}: cannot write the snapshot ({err.strerror or err})") from None
        self.snapshots += 1
        self._next_snapshot = time.monotonic() + self.snapshot_every

    def _account(self, item: Item) -> None:
        latency = time.monotonic() - item.received
        self._latency_last = latency
        self._latency_sum += latency
        self._latency_max = max(self._latency_max, latency)
        self._latencies.append(latency)
        self._masked_sum += item.masked
        self.patched_frames += item.masked > 0
        self.written += 1

    # ---------------------------------------------------------------- reports

    def status(self) -> Status:
        elapsed = time.monotonic() - self._start
        recent = list(itertools.islice(reversed(self._latencies), STATUS_WINDOW))
        p50, p95 = np.percentile(recent, (50, 95)).tolist() if recent else (0.0, 0.0)
        return Status(
            decoded=self.decoded,
            written=self.written,
            total=None if self.live else self.source.frame_count,
            dropped=self.dropped,
            clips=self.clips,
            detections=self.detections,
            elapsed=elapsed,
            fps=self.written / elapsed if elapsed > 0 else 0.0,
            latency=self._latency_last,
            latency_p50=p50,
            latency_p95=p95,
        )

    def summary(self) -> Summary:
        n = self.written
        wall = self._wall or time.monotonic() - self._start
        p50, p95 = np.percentile(self._latencies, (50, 95)).tolist() if self._latencies else (0.0, 0.0)
        return Summary(
            source=self.source.name,
            live=self.live,
            width=self.source.width,
            height=self.source.height,
            frames=n,
            dropped=self.dropped,
            chunks=self.chunks,
            clips=self.clips,
            detections=self.detections,
            frames_with_patches=self.patched_frames,
            mean_masked_area=self._masked_sum / n if n else 0.0,
            wall_time=wall,
            fps=n / wall if wall > 0 else 0.0,
            latency_mean=self._latency_sum / n if n else 0.0,
            latency_max=self._latency_max,
            latency_p50=p50,
            latency_p95=p95,
            vid_stride=self.vid_stride,
            model_runs=self.model_runs,
            snapshots=self.snapshots,
            stage_busy={k: round(v, 4) for k, v in self.busy.items()},
            outputs={k: str(v) for k, v in self.outputs.items()},
        )


def overlay(image: np.ndarray, mask: np.ndarray, clean: np.ndarray) -> np.ndarray:
    """Side by side ``input | mask | sanitized``: ``(H, 3W, 3)`` uint8, repainted regions outlined."""
    mask_u8 = mask.astype(np.uint8)
    shown = image.copy()
    contours, _ = cv2.findContours(mask_u8, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(shown, contours, -1, (255, 0, 0), 1)
    heat = (image // 3).copy()
    heat[mask] = (255, 0, 0)
    panels = np.concatenate([shown, heat, clean], axis=1)
    scale = max(image.shape[0] / 480, 0.3)
    for i, label in enumerate(("input", "mask", "sanitized")):
        org = (i * image.shape[1] + 4, int(14 * scale) + 2)
        cv2.putText(panels, label, org, cv2.FONT_HERSHEY_SIMPLEX, 0.45 * scale, (255, 255, 0), 1, cv2.LINE_AA)
    return panels


__all__ = ["Pipeline", "Summary", "Status", "Item", "overlay"]
