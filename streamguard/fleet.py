"""Many streams, one model: a :class:`~streamguard.pipeline.Pipeline` per source, all sharing the
loaded detector and downstream networks.

Each source keeps its own reader thread (newest frame wins), its own drop count, latency and
recordings, and its own PatchZero state (the live EMA must not mix cameras: :meth:`PatchZero.fork`);
the networks' weights are loaded once and run from every stream's thread (PyTorch and ONNX Runtime
release the GIL while they compute). A source that fails is reported and the others go on.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError, InputError
from .pipeline import Pipeline, Status, Summary


def read_streams_file(path: str | Path) -> list[str]:
    """The sources of a ``.streams`` file: one URL, device or path a line; ``#`` comments and blank
    lines are skipped."""
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read the streams file ({e.__class__.__name__})") from None
    sources = [s for s in (line.split("#", 1)[0].strip() for line in lines) if s]
    if not sources:
        raise InputError(f"{path}: no sources in the streams file")
    return sources


def expand_sources(sources: Sequence[str]) -> list[str]:
    """Command-line sources with every ``*.streams`` file replaced by its lines."""
    return [s for source in sources for s in (read_streams_file(source) if source.endswith(".streams") else [source])]


def stream_names(sources: Sequence[str]) -> list[str]:
    """Short, unique, file-safe names for ``sources`` (for per-stream outputs and status)."""
    names: list[str] = []
    for source in sources:
        if source.startswith("lavfi:"):  # the first filter's name: lavfi:testsrc2=size=... -> testsrc2
            base = re.split(r"[=,:;\[]", source.removeprefix("lavfi:"), maxsplit=1)[0]
        elif "://" in source:  # host, port and path: rtsp://cam1:8554/live -> cam1-8554-live
            base = source.split("://", 1)[1].split("?", 1)[0].split("@")[-1]
        else:
            base = Path(source).stem
        name = re.sub(r"[^A-Za-z0-9_-]+", "-", base).strip("-")[:48] or "stream"
        candidate, n = name, 2
        while candidate in names:
            candidate, n = f"{name}-{n}", n + 1
        names.append(candidate)
    return names


@dataclass
class StreamResult:
    """One source's outcome: its summary, or the error that ended it."""

    name: str
    source: str
    summary: Summary | None = None
    error: str | None = None


class Fleet:
    """``pipelines`` (one per source, sharing networks) run together until all end or :meth:`stop`."""

    def __init__(self, names: Sequence[str], pipelines: Sequence[Pipeline]) -> None:
        if len(names) != len(pipelines) or not pipelines:
            raise ConfigError("a fleet needs one name per pipeline, and at least one")
        self.names, self.pipelines = list(names), list(pipelines)
        self.results: list[StreamResult] = [StreamResult(n, str(getattr(p.source, "name", n))) for n, p in zip(names, pipelines)]

    def _serve(self, i: int) -> None:
        try:
            self.results[i].summary = self.pipelines[i].run()
        except Exception as e:  # noqa: BLE001  one camera's failure must not stop the others
            self.results[i].error = str(e).splitlines()[0] if str(e) else type(e).__name__

    def stop(self) -> None:
        for p in self.pipelines:
            p.stop()

    def run(self, on_progress: Callable[[list[Status | None]], None] | None = None, interval: float = 0.25) -> list[StreamResult]:
        """Serve every stream; ``on_progress`` gets each stream's status (``None`` once it ended).
        Ctrl-C stops them all and keeps what was recorded, then re-raises."""
        threads = [threading.Thread(target=self._serve, args=(i,), name=f"stream-{n}", daemon=True) for i, n in enumerate(self.names)]
        for t in threads:
            t.start()
        try:
            while any(t.is_alive() for t in threads):
                time.sleep(interval)
                if on_progress is not None:
                    on_progress([p.status() if t.is_alive() else None for p, t in zip(self.pipelines, threads)])
        except KeyboardInterrupt:
            self.stop()
            for t in threads:
                t.join(timeout=5.0)
            raise
        return self.results


def fleet_summary(results: Sequence[StreamResult]) -> dict[str, Any]:
    """Totals over the streams that finished: frames, drops and the slowest p95 latency."""
    done = [r.summary for r in results if r.summary is not None]
    return {
        "streams": len(results), "failed": sum(r.error is not None for r in results),
        "frames": sum(s.frames for s in done), "dropped": sum(s.dropped for s in done),
        "worst latency p95 (s)": max((s.latency_p95 for s in done), default=0.0),
    }  # fmt: skip
