"""What every command shares: the typer app, one-line errors, progress bars, and loading recipes,
models and defenses from the options."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..errors import ConfigError, StreamGuardError

if TYPE_CHECKING:
    from ..pipeline import Status, Summary
    from ..recipes import Recipe


out = Console(highlight=False)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def fail(message: str, code: int) -> typer.Exit:
    err.print(f"[bold red]error:[/] {escape(message)}")
    return typer.Exit(code)


def one_line_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except StreamGuardError as e:
            raise fail(str(e), e.exit_code) from None
        except KeyboardInterrupt:
            err.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None

    return wrapper


class App(typer.Typer):
    """``typer.Typer`` whose commands all report errors as one line (see module docstring)."""

    def command(self, *args: Any, **kwargs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        register = super().command(*args, **kwargs)

        def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
            register(one_line_errors(fn))
            return fn

        return decorator


app = App(
    name="streamguard",
    help="PatchZero for video: detect and repaint adversarial patches before a vision model sees them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


# ---------------------------------------------------------------- shared helpers


def progress_off() -> bool:
    """``STREAMGUARD_NO_PROGRESS=1`` (also ``true``, ``yes``) turns progress and status lines off."""
    return os.environ.get("STREAMGUARD_NO_PROGRESS", "") in {"1", "true", "yes"}


PLAIN_EVERY = 30.0  # seconds between plain progress lines when stderr is not a terminal (a log file)


class Throttle:
    """Called with a clock reading: true at most once every ``every`` seconds of that clock."""

    def __init__(self, every: float) -> None:
        self.every, self.last = every, float("-inf")

    def __call__(self, now: float) -> bool:
        if now - self.last < self.every:
            return False
        self.last = now
        return True


@contextmanager
def progress_bar(description: str, total: int | None, field: str | None = None,
                 remaining: bool = False) -> Iterator[Callable[..., None] | None]:  # fmt: skip
    """A rich progress bar on stderr: description, bar, done/total, an optional text ``field``, elapsed
    (and remaining) time; yields its ``update(**kw)`` (rich's ``completed``, ``total`` and the field).

    When stderr is not a terminal (``nohup ... > log``) it prints the same as a plain line every
    :data:`PLAIN_EVERY` seconds and once at the end; it yields ``None`` when progress is off.
    """
    if progress_off():
        yield None
        return
    if not err.is_terminal:
        with _plain_progress(description, total, field) as update:
            yield update
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn()]
    columns += [TextColumn(f"{{task.fields[{field}]}}")] if field else []
    columns += [TimeElapsedColumn()] + ([TimeRemainingColumn()] if remaining else [])
    with Progress(*columns, console=err) as bar:
        task = bar.add_task(description, total=total, **({field: ""} if field else {}))
        yield lambda **kw: bar.update(task, **kw)


@contextmanager
def _plain_progress(description: str, total: int | None, field: str | None) -> Iterator[Callable[..., None]]:
    import time

    start, due = time.monotonic(), Throttle(PLAIN_EVERY)
    state: dict[str, Any] = {"completed": 0, "total": total, **({field: ""} if field else {})}
    first: list[tuple[float, int]] = []  # (clock, count) of the first update: a resumed run's work done before

    def line() -> str:
        done, of = state["completed"], state["total"]
        elapsed = time.monotonic() - start
        text = f"{description}  {done}" + (f"/{of}" if of else "") + f"  {elapsed:.0f} s"
        since, before = first[0] if first else (start, 0)
        if of and done > before:  # the rate of this run's own work, not of the work it resumed from
            text += f"  ~{(time.monotonic() - since) * (of - done) / (done - before):.0f} s left"
        return text + (f"  {state[field]}" if field and state[field] else "")

    def update(**kw: Any) -> None:
        if not first and "completed" in kw:
            first.append((time.monotonic(), kw["completed"]))
        state.update(kw)
        if due(time.monotonic()):
            print(line(), file=sys.stderr, flush=True)

    yield update
    print(line(), file=sys.stderr, flush=True)


@contextmanager
def progress(description: str, total: int | None = None) -> Iterator[Callable[[Status], None]]:
    """A progress bar (frames, frames/s) fed by ``Pipeline.run(on_progress=...)``."""
    with progress_bar(description, total, "fps") as update:
        if update is None:
            yield lambda status: None
        else:
            yield lambda s: update(completed=s.written, total=s.total or total, fps=f"{s.fps:6.1f} frames/s")


FPS_WINDOW = 5.0  # seconds the status line's fps covers (clip pipelines write in bursts of clip_len frames)


def status_text(s: Status, fps: float) -> str:
    return (f"{s.elapsed:6.1f} s  {s.written} frames  {fps:5.1f} fps  latency p50 {s.latency_p50:.2f} s "
            f"p95 {s.latency_p95:.2f} s  dropped {s.dropped}  clips {s.clips}  detections {s.detections}")


@contextmanager
def status_line(description: str, every: float = 1.0) -> Iterator[Callable[[Status], None]]:
    """A live status (fps over the last 5 s, latency p50/p95, dropped, clips, detections) for streams.

    On a terminal it is one rich line updated in place; otherwise (a log file, a pipe) a plain
    line on stderr every ``every`` seconds. Off with ``STREAMGUARD_NO_PROGRESS=1``.
    """
    if progress_off():
        yield lambda status: None
        return
    from collections import deque

    samples: deque[tuple[float, int]] = deque()  # (elapsed, written) of the last FPS_WINDOW seconds
    due = Throttle(every)

    def text(s: Status) -> str:
        samples.append((s.elapsed, s.written))
        while samples[0][0] < s.elapsed - FPS_WINDOW:
            samples.popleft()
        dt = s.elapsed - samples[0][0]
        fps = (s.written - samples[0][1]) / dt if dt > 0 else s.fps
        return status_text(s, fps)

    if not err.is_terminal:

        def plain(s: Status) -> None:
            if due(s.elapsed):
                print(f"{description}  {text(s)}", file=sys.stderr, flush=True)

        yield plain
        return
    with err.status(description) as line:

        def update(s: Status) -> None:
            if due(s.elapsed):
                line.update(f"{escape(description)}  {text(s)}")

        yield update


@contextmanager
def fleet_status_line(names: list[str], every: float = 1.0) -> Iterator[Callable[[list[Status | None]], None]]:
    """For ``watch`` on several streams: one stderr line a second with each stream's fps, p95
    latency and drops (``None``: that stream ended). Off with ``STREAMGUARD_NO_PROGRESS=1``."""
    if progress_off():
        yield lambda statuses: None
        return
    import time

    due = Throttle(every)

    def show(statuses: list[Status | None]) -> None:
        if due(time.monotonic()):
            parts = [f"{n} ended" if s is None else f"{n} {s.fps:.1f} fps p95 {s.latency_p95:.2f} s dropped {s.dropped}"
                     for n, s in zip(names, statuses)]  # fmt: skip
            print("watch  " + " | ".join(parts), file=sys.stderr, flush=True)

    yield show


def summary_table(title: str, rows: dict[str, Any]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows.items():
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else escape(str(value)))
    return table


def summary_rows(summary: Summary) -> dict[str, Any]:
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


def recipe_option(name_or_path: str | None) -> Recipe | None:
    if name_or_path is None:
        return None
    from ..recipes import load_recipe

    return load_recipe(name_or_path)


def model_option(ref: str | None, recipe: Recipe | None, device: str) -> Any:
    """``--model`` (name, shipped weights or checkpoint), else the recipe's model, else ``None``."""
    from .. import models

    if ref is not None:
        model = models.load_model(ref)
    elif recipe is not None:
        m = recipe.model
        model = models.build_model(m.name, m.num_classes, m.weights)
    else:
        return None
    return model.to(device_option(device)).eval()


def pipeline_options(recipe: Recipe | None, clip_len: int | None = None, stride: int | None = None, batch: int = 4) -> dict[str, Any]:
    """``Pipeline`` settings: the command line's, else the recipe's ``[pipeline]``, else the defaults."""
    p = recipe.pipeline if recipe is not None else None
    if p is None:
        return {"clip_len": clip_len, "stride": stride, "batch": batch}
    return {"clip_len": clip_len or p.clip_len, "stride": stride or p.stride, "batch": p.batch, "queue": p.queue,
            "topk": p.topk, "min_score": p.min_score}  # fmt: skip


def defense_option(ref: str | None, recipe: Recipe | None, model: Any, **overrides: Any) -> Any:
    """PatchZero from ``--detector`` (else the recipe's, else the shipped default), the recipe's
    ``[defense]`` settings and the command line's overrides, repainting with the model's mean."""
    from ..patchzero import build_defense

    mean = model.spec.mean if model is not None else None
    return build_defense(recipe.defense if recipe is not None else None, weights=ref, mean=mean, **overrides)


def device_option(name: str) -> Any:
    import torch

    try:
        device = torch.device(name)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        raise ConfigError(f"--device {name}: not available ({str(e).splitlines()[0]})") from None
    return device


@contextmanager
def count_progress(description: str, total: int) -> Iterator[Callable[[int, int], None]]:
    """A progress bar fed with ``(done, total)``."""
    with progress_bar(description, total) as update:
        yield (lambda done, total: None) if update is None else (lambda done, total: update(completed=done, total=total))


DetectorOpt = Annotated[str | None, typer.Option("--detector", help="PatchZero weights: shipped name, checkpoint path, "
    "or a .onnx graph from `streamguard export` (run by ONNX Runtime).")]  # fmt: skip
ModelOpt = Annotated[str | None, typer.Option("--model", help="Downstream model: registry name, shipped weights or checkpoint.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="torch device (cpu, cuda, cuda:1...).")]
ImgszOpt = Annotated[int | None, typer.Option("--imgsz", min=8, help="Detector working size in pixels (square), like "
    "Ultralytics' imgsz; default: the detector's own, the scale it was trained at.")]  # fmt: skip
