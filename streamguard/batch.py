"""Many videos through one defense: ``sanitize`` over a folder, a glob or a list file.

:func:`expand_inputs` turns what the user typed into a list of videos; :func:`sanitize_many` runs
each through a :class:`~streamguard.pipeline.Pipeline` in a pool of worker processes (``spawn``
context, so torch never inherits a forked parent), each of which loads the defense and the model
once (:func:`build_sanitizer`) and runs with ``max(1, cores // workers)`` torch threads. With
``workers=1`` the videos run one after another in this process.

Outputs: ``out_dir/<stem>.mp4`` per input (and ``predictions_dir/<stem>.jsonl``,
``overlay_dir/<stem>.mp4`` when those folders are given), each written under a temporary name and
renamed into place by the sinks, so a folder never holds half a video. A video that fails (corrupt,
truncated, unreadable) becomes a failed :class:`BatchResult` with its one-line message and the
others go on; a problem with the settings (a missing checkpoint, a bad option) is raised at once.
"""

from __future__ import annotations

import glob
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from .errors import ConfigError, InputError, StreamGuardError

VIDEO_SUFFIXES = frozenset({".mp4", ".m4v", ".mov", ".mkv", ".avi", ".webm", ".mpg", ".mpeg", ".ts", ".flv", ".wmv"})
GLOB_CHARS = frozenset("*?[")


def _is_uri(spec: str) -> bool:
    return "://" in spec or spec.startswith(("lavfi:", "/dev/video"))


def is_batch_input(spec: str) -> bool:
    """Whether ``spec`` names many videos: a folder, ``@list.txt`` or a glob (not an existing file or a URL)."""
    if spec.startswith("@") or Path(spec).is_dir():
        return True
    return not _is_uri(spec) and not Path(spec).exists() and bool(GLOB_CHARS & set(spec))


def read_list(path: str | os.PathLike[str]) -> list[str]:
    """A list file: one input per line; blank lines and ``#`` comments skipped; relative paths are
    relative to the list file's folder (URLs and lavfi graphs as they are)."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read the list of inputs ({e.__class__.__name__})") from None
    items = [line.strip() for line in lines]
    items = [s for s in items if s and not s.startswith("#")]
    return [s if _is_uri(s) or Path(s).is_absolute() else str(path.parent / s) for s in items]


def expand_inputs(spec: str | Sequence[str]) -> list[str]:
    """The videos ``spec`` names, in a stable order.

    A folder: its video files (by suffix, :data:`VIDEO_SUFFIXES`; not recursive, hidden files
    skipped), sorted by name. ``@list.txt``: the list file's lines (:func:`read_list`). A glob
    (``clips/*.mp4``, quoted so the shell leaves it alone): its matches, sorted. Anything else, one
    input as it is. A sequence: each item expanded, in order. ``InputError`` when nothing matches.
    """
    if not isinstance(spec, str):
        return [v for item in spec for v in expand_inputs(item)]
    if spec.startswith("@"):
        items = read_list(spec[1:])
        if not items:
            raise InputError(f"{spec[1:]}: the list of inputs is empty")
        return items
    path = Path(spec)
    if path.is_dir():
        videos = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES
                        and not p.name.startswith("."))  # fmt: skip
        if not videos:
            raise InputError(f"{path}: no video files ({', '.join(sorted(VIDEO_SUFFIXES))})")
        return [str(p) for p in videos]
    if is_batch_input(spec):
        matches = sorted(m for m in glob.glob(spec) if Path(m).is_file())
        if not matches:
            raise InputError(f"{spec}: no file matches")
        return matches
    return [spec]


@dataclass(frozen=True)
class SanitizeSettings:
    """What every worker needs to build the same sanitizer (plain values, so it pickles): the
    ``sanitize`` command's options, with the same precedence (command line > recipe > weights)."""

    detector: str | None = None  # PatchZero weights: shipped name or checkpoint path
    model: str | None = None  # downstream model: registry name, shipped weights or checkpoint
    recipe: str | None = None  # recipe name or TOML path
    threshold: float | None = None
    dilate: int | None = None
    complete: str | None = None  # shape completion: none, hull, box, square or cover
    min_core: int | None = None  # regions with fewer pixels over the threshold are dropped as specks
    input_size: int | None = None  # --imgsz
    clip_len: int | None = None
    stride: int | None = None
    vid_stride: int = 1
    device: str = "cpu"
    options: dict[str, str] = field(default_factory=dict)  # FFmpeg demuxer options


def build_sanitizer(settings: SanitizeSettings) -> tuple[Any, Any, dict[str, Any]]:
    """``(defense, model or None, Pipeline keyword arguments)`` from the settings, as ``sanitize`` builds them."""
    import torch

    from . import models
    from .patchzero import build_defense
    from .recipes import load_recipe

    rec = load_recipe(settings.recipe) if settings.recipe is not None else None
    device = torch.device(settings.device)
    if settings.model is not None:
        net = models.load_model(settings.model)
    elif rec is not None:
        net = models.build_model(rec.model.name, rec.model.num_classes, rec.model.weights)
    else:
        net = None
    net = net.to(device).eval() if net is not None else None
    defense = build_defense(rec.defense if rec is not None else None, weights=settings.detector,
                            mean=net.spec.mean if net is not None else None, threshold=settings.threshold,
                            dilate=settings.dilate, complete=settings.complete, min_core=settings.min_core,
                            input_size=settings.input_size)  # fmt: skip
    p = rec.pipeline if rec is not None else None
    if p is None:
        kwargs: dict[str, Any] = {"clip_len": settings.clip_len, "stride": settings.stride, "batch": 4}
    else:
        kwargs = {"clip_len": settings.clip_len or p.clip_len, "stride": settings.stride or p.stride, "batch": p.batch,
                  "queue": p.queue, "topk": p.topk, "min_score": p.min_score}  # fmt: skip
    return defense, net, kwargs | {"device": device, "vid_stride": settings.vid_stride}


@dataclass
class BatchResult:
    """One input's outcome: its outputs and summary when ``ok``, else the one-line ``error``."""

    input: str
    output: Path
    ok: bool
    error: str | None = None
    predictions: Path | None = None
    overlay: Path | None = None
    frames: int = 0
    seconds: float = 0.0
    summary: dict[str, Any] | None = None


@dataclass(frozen=True)
class Job:
    input: str
    output: Path
    predictions: Path | None
    overlay: Path | None


def plan_outputs(inputs: Sequence[str], out_dir: str | os.PathLike[str], predictions_dir: str | os.PathLike[str] | None = None,
                 overlay_dir: str | os.PathLike[str] | None = None) -> list[Job]:  # fmt: skip
    """Each input's ``<stem>.mp4`` (``.jsonl``) in the output folders; ``ConfigError`` when two inputs
    share a stem or an output would overwrite an input."""
    jobs, stems = [], {}
    sources = {Path(s).resolve() for s in inputs if not _is_uri(s)}
    for spec in inputs:
        stem = Path(spec.split("?")[0]).stem if _is_uri(spec) else Path(spec).stem
        stem = stem or "stream"
        if stem in stems:
            raise ConfigError(f"{stems[stem]} and {spec} would both write {stem}.mp4; rename one or run them apart")
        stems[stem] = spec
        job = Job(spec, Path(out_dir) / f"{stem}.mp4",
                   Path(predictions_dir) / f"{stem}.jsonl" if predictions_dir is not None else None,
                   Path(overlay_dir) / f"{stem}.mp4" if overlay_dir is not None else None)  # fmt: skip
        for out in (job.output, job.predictions, job.overlay):
            if out is not None and out.resolve() in sources:
                raise ConfigError(f"{out}: would overwrite an input; choose another output folder")
        jobs.append(job)
    if overlay_dir is not None and Path(overlay_dir).resolve() == Path(out_dir).resolve():
        raise ConfigError(f"{overlay_dir}: the overlay folder must differ from the output folder (both write <stem>.mp4)")
    return jobs


# ---------------------------------------------------------------- workers

_STATE: dict[str, Any] = {}


def init_worker(settings: SanitizeSettings, threads: int | None) -> None:
    """Pool initializer: torch threads, then the defense and the model, once per worker."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    try:
        _STATE["sanitizer"] = build_sanitizer(settings)
    except StreamGuardError as e:  # raised again by the worker's first video, so the parent sees it
        _STATE["error"] = e
    except Exception as e:  # noqa: BLE001 - e.g. a device torch cannot use
        _STATE["error"] = ConfigError(f"cannot build the defense and model: {type(e).__name__}: {_one_line(str(e), '')}")
    _STATE["settings"] = settings


def run_one(job: Job) -> BatchResult:
    """One video through the worker's sanitizer. Per-video problems become a failed result;
    a sanitizer that could not be built is raised (it is not the video's fault)."""
    if "error" in _STATE:
        raise _STATE["error"]
    from .io import open_source
    from .pipeline import Pipeline

    defense, net, kwargs = _STATE["sanitizer"]
    settings: SanitizeSettings = _STATE["settings"]
    tic = time.perf_counter()
    try:
        if hasattr(defense, "reset"):
            defense.reset()
        with open_source(job.input, options=dict(settings.options)) as source:
            summary = Pipeline(source, defense, net, output=job.output, predictions=job.predictions,
                               overlay=job.overlay, **kwargs).run()  # fmt: skip
    except ConfigError:  # a setting that fits no video: not the video's fault
        raise
    except StreamGuardError as e:
        return BatchResult(job.input, job.output, False, _one_line(str(e), job.input), seconds=time.perf_counter() - tic)
    except Exception as e:  # noqa: BLE001 - an undecodable video must not stop the batch
        message = f"{job.input}: {type(e).__name__}: {e}"
        return BatchResult(job.input, job.output, False, _one_line(message, job.input), seconds=time.perf_counter() - tic)
    return BatchResult(job.input, job.output, True, None, job.predictions, job.overlay, summary.frames,
                       time.perf_counter() - tic, summary.as_dict())  # fmt: skip


def _one_line(message: str, name: str) -> str:
    """The first line of ``message``, prefixed with ``name`` unless it already names the input."""
    line = (message.strip().splitlines() or [""])[0]
    return line if not name or name in line or Path(name).name in line else f"{name}: {line}"


def worker_threads(workers: int, cores: int | None = None) -> int:
    """Torch threads per worker: the machine's cores shared out, at least one."""
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // workers)


def sanitize_many(
    inputs: str | Sequence[str],
    out_dir: str | os.PathLike[str],
    *,
    workers: int = 1,
    settings: SanitizeSettings | None = None,
    predictions_dir: str | os.PathLike[str] | None = None,
    overlay_dir: str | os.PathLike[str] | None = None,
    on_result: Callable[[BatchResult], None] | None = None,
) -> list[BatchResult]:
    """Sanitize every video ``inputs`` names (:func:`expand_inputs`) into ``out_dir/<stem>.mp4``.

    ``workers`` processes (each with its own defense and model, ``max(1, cores // workers)`` torch
    threads) take the videos in turn; ``on_result`` is called as each one finishes. Returns one
    :class:`BatchResult` per input, in input order. Failed videos are results, not exceptions; a
    sanitizer that cannot be built (``CheckpointError``, ``ConfigError``) is raised.
    """
    settings = settings or SanitizeSettings()
    if workers < 1:
        raise ConfigError(f"--workers: expected >= 1, got {workers}")
    if predictions_dir is not None and settings.model is None and settings.recipe is None:
        raise ConfigError("--predictions needs a downstream model (--model or a recipe)")
    videos = expand_inputs(inputs)
    jobs = plan_outputs(videos, out_dir, predictions_dir, overlay_dir)
    for folder in (out_dir, predictions_dir, overlay_dir):
        if folder is not None:
            Path(folder).mkdir(parents=True, exist_ok=True)
    results: dict[int, BatchResult] = {}

    def done(i: int, result: BatchResult) -> None:
        results[i] = result
        if on_result is not None:
            on_result(result)

    workers = min(workers, len(jobs))
    if workers == 1:
        _STATE.clear()
        try:
            init_worker(settings, None)
            for i, job in enumerate(jobs):
                done(i, run_one(job))
        finally:
            _STATE.clear()
        return [results[i] for i in range(len(jobs))]
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=init_worker,
                             initargs=(settings, worker_threads(workers))) as pool:  # fmt: skip
        futures = {pool.submit(run_one, job): i for i, job in enumerate(jobs)}
        try:
            for future in as_completed(futures):
                i = futures[future]
                try:
                    result = future.result()
                except StreamGuardError:
                    raise
                except Exception as e:  # noqa: BLE001 - a worker that died (BrokenProcessPool...)
                    job = jobs[i]
                    result = BatchResult(job.input, job.output, False, _one_line(f"worker failed: {type(e).__name__}: {e}", job.input))
                done(i, result)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    return [results[i] for i in range(len(jobs))]


__all__ = [
    "VIDEO_SUFFIXES",
    "BatchResult",
    "SanitizeSettings",
    "build_sanitizer",
    "expand_inputs",
    "is_batch_input",
    "plan_outputs",
    "read_list",
    "sanitize_many",
    "worker_threads",
]  # fmt: skip
