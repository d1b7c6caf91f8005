"""``streamguard`` command line: a thin typer + rich layer over the library.

Every command registered with ``@app.command()`` gets the same error handling: a
:class:`StreamGuardError` becomes one red ``error: ...`` line on stderr and exit code
``err.exit_code``; Ctrl-C exits with 130. Heavy imports (torch, models) happen inside commands
so ``streamguard --help`` stays fast. Progress bars go to stderr and are off when stderr is not a
terminal or ``STREAMGUARD_NO_PROGRESS=1``; summaries go to stdout.
"""

from __future__ import annotations

import functools
import math
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .errors import CheckpointError, ConfigError, StreamGuardError

if TYPE_CHECKING:
    from .pipeline import Status, Summary
    from .recipes import Recipe

out = Console(highlight=False)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def _fail(message: str, code: int) -> typer.Exit:
    err.print(f"[bold red]error:[/] {escape(message)}")
    return typer.Exit(code)


def _one_line_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except StreamGuardError as e:
            raise _fail(str(e), e.exit_code) from None
        except KeyboardInterrupt:
            err.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None

    return wrapper


class _App(typer.Typer):
    """``typer.Typer`` whose commands all report errors as one line (see module docstring)."""

    def command(self, *args: Any, **kwargs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        register = super().command(*args, **kwargs)

        def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
            register(_one_line_errors(fn))
            return fn

        return decorator


app = _App(
    name="streamguard",
    help="PatchZero for video: detect and repaint adversarial patches before a vision model sees them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except StreamGuardError as e:
        _fail(str(e), e.exit_code)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)


# ---------------------------------------------------------------- shared helpers


def _progress_enabled() -> bool:
    return os.environ.get("STREAMGUARD_NO_PROGRESS", "") not in {"1", "true", "yes"} and err.is_terminal


@contextmanager
def _progress(description: str, total: int | None = None) -> Iterator[Callable[[Status], None]]:
    """A rich progress bar (frames, frames/s) fed by ``Pipeline.run(on_progress=...)``."""
    if not _progress_enabled():
        yield lambda status: None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[fps]:6.1f} frames/s"), TimeElapsedColumn())
    with Progress(*columns, console=err) as bar:
        task = bar.add_task(description, total=total, fps=0.0)

        def update(status: Status) -> None:
            bar.update(task, completed=status.written, total=status.total or total, fps=status.fps)

        yield update


_FPS_WINDOW = 5.0  # seconds the status line's fps covers (clip pipelines write in bursts of clip_len frames)


def _status_text(s: Status, fps: float) -> str:
    return (f"{s.elapsed:6.1f} s  {s.written} frames  {fps:5.1f} fps  latency p50 {s.latency_p50:.2f} s "
            f"p95 {s.latency_p95:.2f} s  dropped {s.dropped}  clips {s.clips}  detections {s.detections}")


@contextmanager
def _status_line(description: str, every: float = 1.0) -> Iterator[Callable[[Status], None]]:
    """A live status (fps over the last 5 s, latency p50/p95, dropped, clips, detections) for streams.

    On a terminal it is one rich line updated in place; otherwise (a log file, a pipe) a plain
    line on stderr every ``every`` seconds. Off with ``STREAMGUARD_NO_PROGRESS=1``.
    """
    if os.environ.get("STREAMGUARD_NO_PROGRESS", "") in {"1", "true", "yes"}:
        yield lambda status: None
        return
    from collections import deque

    samples: deque[tuple[float, int]] = deque()  # (elapsed, written) of the last FPS_WINDOW seconds
    printed = [float("-inf")]

    def text(s: Status) -> str:
        samples.append((s.elapsed, s.written))
        while samples[0][0] < s.elapsed - _FPS_WINDOW:
            samples.popleft()
        dt = s.elapsed - samples[0][0]
        fps = (s.written - samples[0][1]) / dt if dt > 0 else s.fps
        return _status_text(s, fps)

    if not err.is_terminal:

        def plain(s: Status) -> None:
            if s.elapsed - printed[0] >= every:
                printed[0] = s.elapsed
                print(f"{description}  {text(s)}", file=sys.stderr, flush=True)

        yield plain
        return
    with err.status(description) as line:

        def update(s: Status) -> None:
            if s.elapsed - printed[0] >= every:
                printed[0] = s.elapsed
                line.update(f"{escape(description)}  {text(s)}")

        yield update


def _summary_table(title: str, rows: dict[str, Any]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows.items():
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else escape(str(value)))
    return table


def _summary_rows(summary: Summary) -> dict[str, Any]:
    rows = {
        "source": summary.source,
        "size": f"{summary.width}x{summary.height}",
        "frames": summary.frames,
        "dropped": summary.dropped,
        "frames with patches": summary.frames_with_patches,
        "mean masked area": summary.mean_masked_area,
        "clips classified": summary.clips,
        "detections": summary.detections,
        "model stride": f"every {summary.vid_stride} ({summary.model_runs} model runs)" if summary.vid_stride > 1 else 1,
        "frames/s": summary.fps,
        "latency mean / p50 / p95 / max (s)": (
            f"{summary.latency_mean:.3f} / {summary.latency_p50:.3f} / {summary.latency_p95:.3f} / {summary.latency_max:.3f}"
        ),
        "wall time (s)": summary.wall_time,
    }
    return rows | summary.outputs


def _recipe(name_or_path: str | None) -> Recipe | None:
    if name_or_path is None:
        return None
    from .recipes import load_recipe

    return load_recipe(name_or_path)


def _load_model(ref: str | None, recipe: Recipe | None, device: str) -> Any:
    """``--model`` (name, shipped weights or checkpoint), else the recipe's model, else ``None``."""
    from . import models

    if ref is not None:
        model = models.load_model(ref)
    elif recipe is not None:
        m = recipe.model
        model = models.build_model(m.name, m.num_classes, m.weights)
    else:
        return None
    return model.to(_device(device)).eval()


def _pipeline_options(recipe: Recipe | None, clip_len: int | None = None, stride: int | None = None, batch: int = 4) -> dict[str, Any]:
    """``Pipeline`` settings: the command line's, else the recipe's ``[pipeline]``, else the defaults."""
    p = recipe.pipeline if recipe is not None else None
    if p is None:
        return {"clip_len": clip_len, "stride": stride, "batch": batch}
    return {"clip_len": clip_len or p.clip_len, "stride": stride or p.stride, "batch": p.batch, "queue": p.queue,
            "topk": p.topk, "min_score": p.min_score}  # fmt: skip


def _load_defense(ref: str | None, recipe: Recipe | None, model: Any, **overrides: Any) -> Any:
    """PatchZero from ``--detector`` (else the recipe's, else the shipped default), the recipe's
    ``[defense]`` settings and the command line's overrides, repainting with the model's mean."""
    from .patchzero import build_defense

    mean = model.spec.mean if model is not None else None
    return build_defense(recipe.defense if recipe is not None else None, weights=ref, mean=mean, **overrides)


def _device(name: str) -> Any:
    import torch

    try:
        device = torch.device(name)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        raise ConfigError(f"--device {name}: not available ({str(e).splitlines()[0]})") from None
    return device


# ---------------------------------------------------------------- commands

DetectorOpt = Annotated[str | None, typer.Option("--detector", help="PatchZero weights: shipped name or checkpoint path.")]
ModelOpt = Annotated[str | None, typer.Option("--model", help="Downstream model: registry name, shipped weights or checkpoint.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="torch device (cpu, cuda, cuda:1...).")]
VidStrideOpt = Annotated[int, typer.Option("--vid-stride", min=1,
    help="Run the model on every Nth clip window (clip models) or frame (frame detectors); PatchZero still sanitizes every frame.")]  # fmt: skip
SnapshotOpt = Annotated[Path | None, typer.Option("--snapshot",
    help="JPEG of input | mask | sanitized, rewritten atomically every --snapshot-every seconds.")]  # fmt: skip
SnapshotEveryOpt = Annotated[float, typer.Option("--snapshot-every", min=0.01, help="Seconds between snapshots.")]
DemuxerOpt = Annotated[list[str] | None, typer.Option("--demuxer-option", metavar="KEY=VALUE",
    help="FFmpeg demuxer option, repeatable (e.g. rtsp_transport=udp, fflags=+nobuffer; KEY= drops a default). "
         "Network streams default to flags=+low_delay, RTSP also to rtsp_transport=tcp.")]  # fmt: skip


def _demuxer_options(pairs: list[str] | None) -> dict[str, str]:
    """``--demuxer-option KEY=VALUE`` (repeatable) as a dict; ``ConfigError`` on a malformed one."""
    options: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--demuxer-option {pair!r}: expected KEY=VALUE")
        options[key.strip()] = value
    return options


@app.command()
def sanitize(
    input: Annotated[str, typer.Argument(help="Video file, lavfi:GRAPH or stream URL.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Sanitized MP4 (H.264, audio copied).")],
    detector: DetectorOpt = None,
    model: ModelOpt = None,
    recipe: Annotated[str | None, typer.Option("--recipe", help="Recipe name (pipelines/NAME.toml) or TOML path.")] = None,
    clip_len: Annotated[int | None, typer.Option("--clip-len", min=1, help="Frames fused per defense clip.")] = None,
    stride: Annotated[int | None, typer.Option("--stride", min=1, help="Frames between classifier windows.")] = None,
    threshold: Annotated[float | None, typer.Option("--threshold", help="Mask threshold on patch probability.")] = None,
    dilate: Annotated[int | None, typer.Option("--dilate", min=0, help="Mask dilation radius (pixels).")] = None,
    overlay: Annotated[Path | None, typer.Option("--overlay", help="Side-by-side input | mask | sanitized MP4.")] = None,
    predictions: Annotated[Path | None, typer.Option("--predictions", help="JSON-lines predictions of the model.")] = None,
    device: DeviceOpt = "cpu",
    vid_stride: VidStrideOpt = 1,
    snapshot: SnapshotOpt = None,
    snapshot_every: SnapshotEveryOpt = 1.0,
    demuxer_option: DemuxerOpt = None,
) -> None:
    """Repaint adversarial patches in a video; optionally run a downstream model on the result.

    Every frame is processed, as fast as the machine allows (no pacing, nothing dropped); to run a
    file as if it were a camera, use ``watch`` (paced at the file's frame rate).
    """
    from .io import open_source
    from .pipeline import Pipeline

    options = _demuxer_options(demuxer_option)
    rec = _recipe(recipe)
    net = _load_model(model, rec, device)
    if predictions is not None and net is None:
        raise ConfigError("--predictions needs a downstream model (--model or a recipe)")
    defense = _load_defense(detector, rec, net, threshold=threshold, dilate=dilate)
    with open_source(input, options=options) as source:
        pipeline = Pipeline(
            source, defense, net, output=output, predictions=predictions, overlay=overlay, device=_device(device),
            vid_stride=vid_stride, snapshot=snapshot, snapshot_every=snapshot_every, **_pipeline_options(rec, clip_len, stride),
        )
        with _progress(f"sanitize {Path(input).name}", source.frame_count) as on_progress:
            summary = pipeline.run(on_progress=on_progress)
    out.print(_summary_table("streamguard sanitize", _summary_rows(summary)))


@app.command()
def watch(
    source: Annotated[str, typer.Argument(help="Stream URL (rtsp://, tcp://, srt://, http(s)://...), /dev/videoN or lavfi:GRAPH.")],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Record the sanitized stream to this MP4.")] = None,
    duration: Annotated[float | None, typer.Option("--duration", min=0, help="Stop after this many seconds.")] = None,
    model: ModelOpt = None,
    detector: DetectorOpt = None,
    timeout: Annotated[float, typer.Option("--timeout", min=0.1, help="Give up on a stalled source after this many seconds.")] = 10.0,
    reconnect: Annotated[int, typer.Option("--reconnect", min=0, help="Reopen a stalled, dropped or ended source up to N times in a row (backoff 0.25 s, doubling).")] = 0,
    predictions: Annotated[Path | None, typer.Option("--predictions", help="JSON-lines predictions of the model.")] = None,
    recipe: Annotated[str | None, typer.Option("--recipe", help="Recipe name (e.g. camera) or TOML path.")] = None,
    device: DeviceOpt = "cpu",
    realtime: Annotated[bool | None, typer.Option("--realtime/--no-realtime",
        help="Read at the source's own frame rate (ffmpeg -re). Default: on for files and lavfi graphs, off for "
             "network streams and cameras (real time already); --no-realtime reads a file as fast as it decodes.")] = None,
    demuxer_option: DemuxerOpt = None,
    vid_stride: VidStrideOpt = 1,
    snapshot: SnapshotOpt = None,
    snapshot_every: SnapshotEveryOpt = 1.0,
) -> None:
    """Sanitize a live stream (newest frames win; Ctrl-C stops and keeps what was recorded).

    A file or lavfi graph is paced at its own frame rate, like a camera, so "dropped" counts the
    frames the defense and model could not keep up with. A status line (fps, latency p50/p95,
    drops) updates once a second on stderr.
    """
    from .io import ReconnectingSource, is_live_uri, open_source
    from .pipeline import Pipeline

    options = _demuxer_options(demuxer_option)
    paced = (not is_live_uri(source)) if realtime is None else realtime
    rec = _recipe(recipe)
    net = _load_model(model, rec, device)
    defense = _load_defense(detector, rec, net)
    if reconnect:
        src = ReconnectingSource(source, attempts=reconnect, timeout=timeout, options=options, realtime=paced)
    else:
        src = open_source(source, live=is_live_uri(source) or None, timeout=timeout, options=options, realtime=paced)
    with src:
        pipeline = Pipeline(src, defense, net, output=output, predictions=predictions, duration=duration, live=True,
                            device=_device(device), vid_stride=vid_stride, snapshot=snapshot,
                            snapshot_every=snapshot_every, **_pipeline_options(rec, batch=1))  # fmt: skip
        with _status_line(f"watch {source}") as on_progress:
            try:
                summary = pipeline.run(on_progress=on_progress)
            except KeyboardInterrupt:
                summary = pipeline.summary()
            finally:
                for event in getattr(src, "events", []):
                    err.print(f"[yellow]warning:[/] {escape(event)}")
    rows = _summary_rows(summary) | {"paced (realtime)": "yes" if paced else "no"}
    rows |= {"reconnects": src.reconnects} if reconnect else {}
    out.print(_summary_table("streamguard watch", rows))


@app.command("models")
def models_command() -> None:
    """List the downstream models: task, input (C,T,H,W), normalization in [0,1] units, parameters."""
    from .models import describe_model, list_models

    table = Table(title="streamguard models", title_justify="left")
    for column in ("name", "task", "input (C,T,H,W)", "mean", "std"):
        table.add_column(column)
    table.add_column("params", justify="right")
    for name in list_models():
        spec, params = describe_model(name)
        table.add_row(
            name, spec.task, "x".join(map(str, (3, spec.clip_len, *spec.input_size))),
            ", ".join(f"{v:.4g}" for v in spec.mean), ", ".join(f"{v:.4g}" for v in spec.std), f"{params / 1e6:.2f} M",
        )
    out.print(table)


# ---------------------------------------------------------------- data

data_app = _App(name="data", help="Data sets: generate SynthMotion in UCF101's layout.", no_args_is_help=True)
app.add_typer(data_app)


@contextmanager
def _count_progress(description: str, total: int) -> Iterator[Callable[[int, int], None]]:
    """A rich progress bar fed with ``(done, total)``."""
    if not _progress_enabled():
        yield lambda done, total: None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err) as bar:
        task = bar.add_task(description, total=total)
        yield lambda done, total: bar.update(task, completed=done, total=total)


@data_app.command("synth")
def data_synth(
    output: Annotated[Path, typer.Argument(help="Output folder (class folders, ucfTrainTestlist/, synthmotion.json).")],
    videos_per_class: Annotated[int, typer.Option("--videos-per-class", min=2, help="Videos per motion class.")] = 12,
    seed: Annotated[int, typer.Option("--seed", help="Everything is a function of this seed.")] = 0,
    size: Annotated[int, typer.Option("--size", min=16, help="Frame side in pixels (even).")] = 112,
    frames: Annotated[int, typer.Option("--frames", min=1, help="Frames per video.")] = 32,
    workers: Annotated[int, typer.Option("--workers", min=1, help="Processes rendering videos.")] = 1,
) -> None:
    """Generate SynthMotion: textured objects moving in 12 distinct ways over photo backgrounds."""
    import json

    from .data import SYNTH_CLASSES, make_synthmotion

    total = len(SYNTH_CLASSES) * videos_per_class
    with _count_progress("synthmotion", total) as on_progress:
        root = make_synthmotion(output, videos_per_class, seed, size=size, frames=frames, workers=workers, progress=on_progress)
    meta = json.loads((root / "synthmotion.json").read_text())
    test = len((root / "ucfTrainTestlist" / "testlist01.txt").read_text().splitlines())
    megabytes = sum(p.stat().st_size for p in root.rglob("*.avi")) / 2**20
    out.print(_summary_table("streamguard data synth", {
        "output": root,
        "classes": len(meta["classes"]),
        "videos (train / test, fold 1)": f"{total - test} / {test}",
        "clip": f"{frames} frames x {size}x{size} @ {meta['fps']} fps",
        "seed": seed,
        "codec": meta["codec"],
        "size on disk (MiB)": megabytes,
        "wall time (s)": meta["seconds"],
    }))  # fmt: skip


@data_app.command("footage")
def data_footage(
    output: Annotated[Path, typer.Option("--output", "-o", help="Output folder (train/, test/, footage.json).")],
    folders: Annotated[list[Path] | None, typer.Argument(help="Folders (or files) of videos and photos; default: the "
        "Debian opencv-doc, gnome-backgrounds and mate-backgrounds folders and scikit-image's photos that exist.")] = None,
    size: Annotated[int, typer.Option("--size", min=16, help="Clip side in pixels (even): the detector's working scale.")] = 64,
    clip_len: Annotated[int, typer.Option("--clip-len", min=1, help="Frames per clip.")] = 16,
    clips_per_video: Annotated[int, typer.Option("--clips-per-video", min=1, help="Clips cut from each video.")] = 24,
    clips_per_photo: Annotated[int, typer.Option("--clips-per-photo", min=1, help="Clips (synthetic camera motion) per photo.")] = 4,
    test_fraction: Annotated[float, typer.Option("--test-fraction", min=0.0, max=0.99, help="Share of source groups held out (vtest.avi always is).")] = 0.2,
    seed: Annotated[int, typer.Option("--seed", help="Everything is a function of this seed (the split is not: it follows file names).")] = 0,
    workers: Annotated[int, typer.Option("--workers", min=1, help="Processes rendering sources.")] = 1,
) -> None:
    """Real footage and photos as benign training backgrounds for the patch detector: short clips, offline."""
    import json
    import warnings

    from .data.footage import FootageWarning, build_footage, default_folders

    chosen = list(folders or default_folders())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", FootageWarning)
        with _count_progress("footage", 0) as on_progress:
            root = build_footage(chosen, output, size=size, clip_len=clip_len, clips_per_video=clips_per_video,
                                 clips_per_photo=clips_per_photo, test_fraction=test_fraction, seed=seed, workers=workers,
                                 on_progress=on_progress)  # fmt: skip
    for w in caught:
        err.print(f"warning: {escape(str(w.message))}")
    meta = json.loads((root / "footage.json").read_text())
    kinds = {k: sum(s["kind"] == k for s in meta["sources"]) for k in ("video", "photo")}
    held = {k: sum(s["kind"] == k and s["split"] == "test" for s in meta["sources"]) for k in ("video", "photo")}
    megabytes = sum(p.stat().st_size for p in root.glob("*/*.npy")) / 2**20
    out.print(_summary_table("streamguard data footage", {
        "output": root,
        "folders": ", ".join(meta["folders"]) or "-",
        "videos (of them test)": f"{kinds['video']} ({held['video']})",
        "photos (of them test)": f"{kinds['photo']} ({held['photo']})",
        "skipped files": len(meta["skipped"]),
        "clips (train / test)": f"{meta['counts']['train']} / {meta['counts']['test']}",
        "clip": f"{clip_len} frames x {size}x{size}",
        "seed": seed,
        "size on disk (MiB)": megabytes,
        "wall time (s)": meta["seconds"],
    }))  # fmt: skip


# ---------------------------------------------------------------- evaluate


@app.command("evaluate")
def evaluate_command(
    recipe: Annotated[str, typer.Argument(help="Recipe name (pipelines/NAME.toml) or TOML path.")],
    max_videos: Annotated[int | None, typer.Option("--max-videos", min=1, help="Only the first N videos of the seeded order.")] = None,
    output: Annotated[Path | None, typer.Option("--output", help="Results folder (default: the recipe's evaluate.output).")] = None,
    no_resume: Annotated[bool, typer.Option("--no-resume", help="Start over instead of skipping the samples already in the output.")] = False,
    markdown: Annotated[Path | None, typer.Option("--markdown", help="Also write the tables as markdown (for the README).")] = None,
    detector: Annotated[str | None, typer.Option("--detector", help="PatchZero checkpoint to evaluate (overrides defense.weights).")] = None,
    defenses: Annotated[str | None, typer.Option("--defenses", help="Comma-separated defenses to run instead of evaluate.defenses (e.g. patchzero).")] = None,
    model: Annotated[str | None, typer.Option("--model", help="Downstream model checkpoint (overrides model.weights).")] = None,
    device: DeviceOpt = "cpu",
) -> None:
    """Every defense under every attack of a recipe: accuracy (Table 4) or, for a per-frame detector, box AP
    (Table 3), and PatchZero's pixel metrics (Table 5a)."""
    from dataclasses import replace

    from .evaluation import (
        evaluate,
        is_frame_report,
        save_markdown,
        table3,
        table4,
        table5a,
        table5a_rows,
    )
    from .recipes import load_recipe

    rec = load_recipe(recipe)
    settings = replace(rec.evaluate, max_videos=max_videos or rec.evaluate.max_videos, output=str(output or rec.evaluate.output))
    if defenses is not None:
        settings.defenses = [d.strip() for d in defenses.split(",") if d.strip()]
    rec = replace(rec, evaluate=settings)
    if detector is not None:
        rec.defense.weights = detector
    if model is not None:
        rec.model.weights = model
    with _count_progress(f"evaluate {rec.name}", 0) as on_progress:
        report = evaluate(rec, on_progress=on_progress, resume=not no_resume, device=_device(device))
    out.print(table3(report) if is_frame_report(report) else table4(report))
    if table5a_rows(report)[1]:
        out.print(table5a(report))
    if markdown is not None:
        out.print(f"markdown: {save_markdown(report, markdown)}")
    out.print(f"results: {report.path} ({len(report.samples)} samples)")


# ---------------------------------------------------------------- train

train_app = _App(name="train", help="Train the benchmark classifier or frame detector, and the PatchZero detector (resumable).", no_args_is_help=True)
app.add_typer(train_app, name="train")

TrainRecipeArg = Annotated[str, typer.Argument(help="Recipe name (pipelines/NAME.toml) or TOML path.")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue exactly from the run's last checkpoint.")]
StepsOpt = Annotated[int | None, typer.Option("--steps", min=0, help="Override train.steps.")]
TrainOutputOpt = Annotated[Path | None, typer.Option("--output", "-o", help="Override train.output (the run directory).")]
TrainDeviceOpt = Annotated[str | None, typer.Option("--device", help="torch device (default: cuda if available, else cpu).")]
_METRIC_LABELS = {"loss": "loss", "acc": "acc", "top1": "top-1", "f1": "pixel F1", "robust_acc": "robust acc", "fooled": "fooled",
                  "ap": "AP", "ap50": "AP50"}


def _train_recipe(name: str, steps: int | None, output: Path | None) -> Recipe:
    from .recipes import load_recipe

    rec = load_recipe(name)
    if steps is not None:
        rec.train.steps = steps
    if output is not None:
        rec.train.output = str(output)
    return rec


@contextmanager
def _train_progress(description: str) -> Iterator[Callable[[int, int, dict[str, float]], None]]:
    """A rich progress bar fed by the training loops' ``on_progress(step, total, metrics)``."""
    if not _progress_enabled():
        yield lambda step, total, metrics: None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[metrics]}"),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err) as bar:
        task = bar.add_task(description, total=None, metrics="")

        def update(step: int, total: int, metrics: dict[str, float]) -> None:
            shown = "  ".join(f"{label} {metrics[k]:.3f}" for k, label in _METRIC_LABELS.items() if k in metrics)
            bar.update(task, completed=step, total=total, metrics=shown)

        yield update


def _print_result(title: str, result: Any) -> None:
    rows = {"checkpoint": result.path, "sha256": result.sha256, "steps": result.steps}
    if getattr(result, "stopped_early", False):
        rows["stopped"] = "early: robust accuracy converged"
    out.print(_summary_table(title, rows | {_METRIC_LABELS.get(k, k): v for k, v in result.metrics.items()}))


def _command_line() -> str:
    return " ".join(["streamguard", *sys.argv[1:]])


@train_app.command("classifier")
def train_classifier_command(
    recipe: TrainRecipeArg, resume: ResumeOpt = False, steps: StepsOpt = None, output: TrainOutputOpt = None,
    synth_train_videos: Annotated[int | None, typer.Option("--synth-train-videos", min=2,
        help="Train on a separate SynthMotion tree with this many videos per class.")] = None,
    device: TrainDeviceOpt = None,
) -> None:  # fmt: skip
    """Train the recipe's downstream classifier (benchmark only; PatchZero never retrains it)."""
    from .training import train_classifier

    rec = _train_recipe(recipe, None, output)
    if steps is not None:
        rec.train.classifier.steps = steps
    with _train_progress(f"train classifier {rec.model.name}") as on_progress:
        result = train_classifier(rec, on_progress=on_progress, resume=resume, synth_train_videos=synth_train_videos,
                                  command=_command_line(), device=device)  # fmt: skip
    _print_result("streamguard train classifier", result)


@train_app.command("frame-detector")
def train_frame_detector_command(
    recipe: TrainRecipeArg, resume: ResumeOpt = False, steps: StepsOpt = None, output: TrainOutputOpt = None,
    device: TrainDeviceOpt = None,
) -> None:  # fmt: skip
    """Train the recipe's per-frame object detector (Faster R-CNN) on the benchmark's boxes."""
    from .training import train_frame_detector

    rec = _train_recipe(recipe, None, output)
    if steps is not None:
        rec.train.frame_detector.steps = steps
    with _train_progress(f"train frame detector {rec.model.name}") as on_progress:
        result = train_frame_detector(rec, on_progress=on_progress, resume=resume, command=_command_line(), device=device)
    _print_result("streamguard train frame-detector", result)


@train_app.command("cache")
def train_cache_command(recipe: TrainRecipeArg, device: TrainDeviceOpt = None) -> None:
    """Build (or complete) the stage-1 cache of DO-attacked training clips."""
    from .training import build_attack_cache

    rec = _train_recipe(recipe, None, None)
    with _train_progress("attack cache") as on_progress:
        cache = build_attack_cache(rec, on_progress=on_progress, device=device)
    out.print(f"attack cache: {cache}")


@train_app.command("detector")
def train_detector_command(
    recipe: TrainRecipeArg,
    stage: Annotated[int, typer.Option("--stage", min=1, max=2, help="1: cached DO attacks; 2: online BPDA attacks.")] = 1,
    init: Annotated[str | None, typer.Option("--init",
        help="Stage 2's start: a checkpoint or shipped name (default: the run's detector-stage1.pt).")] = None,
    model: Annotated[str | None, typer.Option("--model", help="Downstream model to attack (overrides model.weights).")] = None,
    resume: ResumeOpt = False,
    steps: StepsOpt = None,
    output: TrainOutputOpt = None,
    device: TrainDeviceOpt = None,
) -> None:
    """Train the PatchZero detector; stage 1 first completes the attack cache."""
    from .checkpoints import get_weights
    from .training import (
        build_attack_cache,
        train_detector_stage1,
        train_detector_stage2,
    )

    rec = _train_recipe(recipe, steps, output)
    if model is not None:
        rec.model.weights = model
    if stage == 1:
        with _train_progress("attack cache") as on_progress:
            build_attack_cache(rec, on_progress=on_progress, device=device)
        with _train_progress("train detector, stage 1") as on_progress:
            result = train_detector_stage1(rec, on_progress=on_progress, resume=resume, command=_command_line(), device=device)
    else:
        init = init or str(Path(rec.train.output) / "detector-stage1.pt")
        try:
            get_weights(init)
        except CheckpointError:
            raise ConfigError(f"--init: {init} not found (train stage 1 first, or pass a checkpoint or shipped name)") from None
        with _train_progress("train detector, stage 2") as on_progress:
            result = train_detector_stage2(rec, init, on_progress=on_progress, resume=resume, command=_command_line(),
                                           device=device)  # fmt: skip
    _print_result(f"streamguard train detector --stage {stage}", result)


# ---------------------------------------------------------------- attack


def _write_frames(path: Path, frames: Any, fps: float) -> None:
    """(F, H, W, 3) float frames in [0, 1]: ``.npy`` exactly (float32), any other suffix as lossless-ish H.264."""
    import numpy as np

    from .io import VideoSink

    if path.suffix.lower() == ".npy":
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.partial.npy")
        with open(tmp, "wb") as f:
            np.save(f, np.asarray(frames, dtype=np.float32))
        os.replace(tmp, path)
        return
    height, width = frames.shape[1:3]
    with VideoSink(path, width, height, fps, crf=0) as sink:
        for frame in frames:
            sink.write(np.rint(np.asarray(frame) * 255).astype(np.uint8))


@app.command("attack")
def attack_command(
    input: Annotated[str, typer.Argument(help="Video file or lavfi:GRAPH to attack.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Attacked video at the model's input size: .npy "
                                         "(float32 (F,H,W,3) in [0,1], exact) or .mp4 (H.264 crf 0, yuv420p).")],
    model: ModelOpt = None,
    detector: DetectorOpt = None,
    method: Annotated[str, typer.Option("--method", help="pgd, apgd or cw.")] = "pgd",
    mode: Annotated[str, typer.Option("--mode", help="do: gradients of the model only; bpda: through PatchZero.")] = "do",
    area: Annotated[float, typer.Option("--area", help="Patch area as a fraction of the frame.")] = 0.05,
    eps: Annotated[float | None, typer.Option("--eps", help="L-inf budget inside the patch (1 = anything).")] = None,
    step: Annotated[float | None, typer.Option("--step", help="Step size (CW: learning rate).")] = None,
    iters: Annotated[int | None, typer.Option("--iters", help="Iterations.")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Patch location and random starts.")] = None,
    moving: Annotated[bool, typer.Option("--moving", help="The patch drifts over the video instead of staying put.")] = False,
    mask_out: Annotated[Path | None, typer.Option("--mask-out", help="True patch mask: .npy (float32 (F,H,W)) or video.")] = None,
    recipe: Annotated[str | None, typer.Option("--recipe", help="Recipe name or TOML path ([model], [defense], [attack]).")] = None,
    device: DeviceOpt = "cpu",
) -> None:
    """Put an adversarial patch on a video and show what it does to the model.

    Frames are resized to the model's input size and attacked clip by clip (clip_len frames, label = the model's clean prediction); the attacked frames are written at that size. One patch location is drawn for the whole video. With --detector (or --mode bpda) the table also shows the prediction after PatchZero.
    """
    from .attacks import MaskedAttack, attack_video
    from .checkpoints import DEFAULT_CLASSIFIER
    from .io import open_source
    from .models import load_model
    from .recipes import AttackSection

    rec = _recipe(recipe)
    net = _load_model(model, rec, device) or load_model(DEFAULT_CLASSIFIER).to(_device(device)).eval()
    section = rec.attack if rec is not None else AttackSection()
    if section.targeted:
        raise ConfigError("attack.targeted: the attack command attacks the model's own predictions; set targeted = false")
    defense = None
    if mode == "bpda" or detector is not None:
        defense = _load_defense(detector, rec, net).to(_device(device))
    overrides = {k: v for k, v in {"eps": eps, "step": step, "iters": iters, "seed": seed}.items() if v is not None}
    attack = MaskedAttack.from_section(net, section, method, mode, defense=defense, device=device, **overrides)  # type: ignore[arg-type]
    with open_source(input) as source, _count_progress(f"attack {Path(input).name}", 0) as on_progress:
        fps = source.fps
        result = attack_video((f.image for f in source), attack, area, attack.seed, moving=moving or section.moving,
                              defense=defense, on_progress=on_progress)  # fmt: skip
    _write_frames(output, result.frames, fps)
    if mask_out is not None:
        _write_frames(mask_out, result.mask if mask_out.suffix.lower() == ".npy" else result.mask[..., None].repeat(3, -1), fps)

    names = net.spec.class_names
    label = lambda k: names[k] if k < len(names) else str(k)  # noqa: E731
    table = Table(title=f"streamguard attack: {method} {mode}, area {area:g}", title_justify="left")
    for column in ("clip", "frames", "clean", "attacked") + (("attacked + PatchZero",) if defense is not None else ()):
        table.add_column(column)
    t, n = net.spec.clip_len, len(result.frames)
    for i, (clean, adv) in enumerate(zip(result.clean, result.attacked)):
        row = [str(i), f"{i * t}-{min(n, (i + 1) * t) - 1}", label(clean), label(adv)]
        table.add_row(*map(escape, row + ([label(result.defended[i])] if result.defended is not None else [])))
    out.print(table)
    fooled = sum(c != a for c, a in zip(result.clean, result.attacked))
    summary = {"attacked video": output, "size": f"{result.frames.shape[2]}x{result.frames.shape[1]} (model input)",
               "frames": n, "fooled clips": f"{fooled} / {len(result.clean)}", "patch area": float(result.mask.mean())}
    if result.defended is not None:
        summary["fooled after PatchZero"] = f"{sum(c != d for c, d in zip(result.clean, result.defended))} / {len(result.clean)}"
    if mask_out is not None:
        summary["mask"] = mask_out
    out.print(_summary_table("streamguard attack", summary))


@app.command("demo")
def demo_command(
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Folder for the demo's videos, PNG strips and results.")] = Path("demo"),
    seed: Annotated[int, typer.Option(help="Seed of the video, the patch location and the attack.")] = 0,
    video_class: Annotated[int, typer.Option("--class", help="SynthMotion class of the first clip (0-11); the next clip shows the next class.")] = 1,
    area: Annotated[float, typer.Option(help="Patch area as a fraction of the frame.")] = 0.10,
    iters: Annotated[int, typer.Option(help="Masked PGD iterations (paper: 20).")] = 20,
    mode: Annotated[list[str], typer.Option("--mode", help="do (attack the classifier alone) and/or bpda (adaptive, through PatchZero).")] = ["do", "bpda"],  # noqa: B006
    device: Annotated[str, typer.Option(help="torch device (cpu, cuda...).")] = "cpu",
) -> None:
    """Patch a benchmark video with Masked PGD (downstream-only and adaptive BPDA), remove it with PatchZero."""
    from .demo import run_demo

    if bad := [m for m in mode if m not in ("do", "bpda")]:
        raise ConfigError(f"--mode: expected do or bpda, got {bad[0]!r}")
    results = []
    for m in mode:
        with _count_progress(f"demo: Masked PGD ({m}) on each clip", 0) as on_progress:
            results.append(run_demo(out_dir, seed=seed, video_class=video_class, area=area, iters=iters, mode=m,
                                    device=str(_device(device)), on_progress=on_progress))  # fmt: skip
    first = results[0]
    table = Table(title=f"streamguard demo: {first.video_class}, {area:.0%} patch, Masked PGD eps 1.0 step 0.2 x{iters}, seed {seed}",
                  title_justify="left")  # fmt: skip
    table.add_column("clip")
    table.add_column("true class")
    table.add_column("clean")
    for r in results:
        table.add_column(f"{r.mode.upper()} attacked")
        table.add_column(f"{r.mode.upper()} + PatchZero")
    for i, (truth, clean) in enumerate(zip(first.truth, first.clean)):
        table.add_row(str(i), escape(truth), escape(clean), *(escape(x) for r in results for x in (r.attacked[i], r.defended[i])))
    out.print(table)
    rows: dict[str, Any] = {}
    for r in results:
        rows[f"{r.mode.upper()}: clips restored"] = f"{r.restored()} / {len(r.clean)}"
        scores = (r.pixel_precision, r.pixel_recall, r.pixel_f1)
        rows[f"{r.mode.upper()}: pixel precision / recall / F1"] = " / ".join("–" if math.isnan(v) else f"{v:.3f}" for v in scores)
        rows[f"{r.mode.upper()}: overlay, strip"] = f"{r.files['overlay']}, {r.files['strip']}"
    out.print(_summary_table(f"PatchZero on the attacked video (files in {out_dir})", rows))
