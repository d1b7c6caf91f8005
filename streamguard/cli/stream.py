"""``sanitize`` and ``watch``: video files and live streams through the defense."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from ..errors import ConfigError
from .common import (
    DetectorOpt,
    DeviceOpt,
    ImgszOpt,
    ModelOpt,
    app,
    count_progress,
    defense_option,
    device_option,
    err,
    fleet_status_line,
    model_option,
    out,
    pipeline_options,
    progress,
    recipe_option,
    status_line,
    summary_rows,
    summary_table,
)

# ---------------------------------------------------------------- commands

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
    input: Annotated[str | None, typer.Argument(help="Video file, lavfi:GRAPH or stream URL; or many videos: a folder, "
        "a quoted glob (\"clips/*.mp4\") or @LIST.txt (one path a line).", show_default=False)] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Sanitized MP4 (H.264, audio copied); for many videos "
        "a folder of <stem>.mp4.")] = ...,  # type: ignore[assignment]
    detector: DetectorOpt = None,
    imgsz: ImgszOpt = None,
    model: ModelOpt = None,
    recipe: Annotated[str | None, typer.Option("--recipe", help="Recipe name (pipelines/NAME.toml) or TOML path.")] = None,
    clip_len: Annotated[int | None, typer.Option("--clip-len", min=1, help="Frames fused per defense clip.")] = None,
    stride: Annotated[int | None, typer.Option("--stride", min=1, help="Frames between classifier windows.")] = None,
    threshold: Annotated[float | None, typer.Option("--threshold", help="Mask threshold on patch probability.")] = None,
    dilate: Annotated[int | None, typer.Option("--dilate", min=0, help="Mask dilation radius (pixels).")] = None,
    complete: Annotated[str | None, typer.Option("--complete", help="Shape completion of each masked region: "
        "none, hull (its convex hull), box (its bounding box), square (grown to the largest patch of the "
        "threat model) or cover (grown to every place such a patch could extend to). Default: the detector's.")] = None,
    min_core: Annotated[int | None, typer.Option("--min-core", min=0, help="Drop masked regions with fewer pixels "
        "over the threshold than this, as specks (0 keeps every region). Default: the detector's.")] = None,
    overlay: Annotated[Path | None, typer.Option("--overlay", help="Side-by-side input | mask | sanitized MP4 "
        "(many videos: a folder of <stem>.mp4, not the output folder).")] = None,
    predictions: Annotated[Path | None, typer.Option("--predictions", help="JSON-lines predictions of the model "
        "(many videos: a folder of <stem>.jsonl).")] = None,
    device: DeviceOpt = "cpu",
    vid_stride: VidStrideOpt = 1,
    snapshot: SnapshotOpt = None,
    snapshot_every: SnapshotEveryOpt = 1.0,
    demuxer_option: DemuxerOpt = None,
    inputs: Annotated[Path | None, typer.Option("--inputs", help="List file of videos, one path a line (like @LIST.txt).")] = None,
    workers: Annotated[int, typer.Option("--workers", min=1, help="Videos sanitized at once, one process each "
        "(each loads the defense and model once and gets cores/N torch threads).")] = 1,
    ray: Annotated[str | None, typer.Option("--ray", metavar="ADDRESS", help="Sanitize many videos on Ray "
        "(the ray extra): 'local', 'auto' or ray://HOST:PORT; --workers actors, each loading the model once.")] = None,
) -> None:
    """Repaint adversarial patches in a video; optionally run a downstream model on the result.

    Every frame is processed, as fast as the machine allows (no pacing, nothing dropped); to run a
    file as if it were a camera, use ``watch`` (paced at the file's frame rate).

    Many videos (a folder, a glob, @LIST.txt or --inputs LIST.txt): -o is a folder that gets
    <stem>.mp4 for each (--predictions and --overlay folders likewise), a failed video is reported
    in one line and the others go on; exit code 3 when any failed. --ray runs the batch on a Ray cluster.
    """
    from ..batch import is_batch_input

    options = _demuxer_options(demuxer_option)
    if inputs is not None or (input is not None and is_batch_input(input)):
        return _sanitize_many(input, inputs, output, workers, options, ray, detector=detector, model=model, recipe=recipe,
                              threshold=threshold, dilate=dilate, complete=complete, min_core=min_core, input_size=imgsz,
                              clip_len=clip_len, stride=stride, vid_stride=vid_stride, device=device,
                              predictions=predictions, overlay=overlay,
                              snapshot=snapshot)  # fmt: skip
    if input is None:
        raise ConfigError("give a video (file, URL, folder, glob or @LIST.txt) or --inputs LIST.txt")
    from ..io import open_source
    from ..pipeline import Pipeline

    rec = recipe_option(recipe)
    net = model_option(model, rec, device)
    if predictions is not None and net is None:
        raise ConfigError("--predictions needs a downstream model (--model or a recipe)")
    defense = defense_option(detector, rec, net, threshold=threshold, dilate=dilate, complete=complete, min_core=min_core,
                             input_size=imgsz)
    with open_source(input, options=options) as source:
        pipeline = Pipeline(
            source, defense, net, output=output, predictions=predictions, overlay=overlay, device=device_option(device),
            vid_stride=vid_stride, snapshot=snapshot, snapshot_every=snapshot_every, **pipeline_options(rec, clip_len, stride),
        )
        with progress(f"sanitize {Path(input).name}", source.frame_count) as on_progress:
            summary = pipeline.run(on_progress=on_progress)
    out.print(summary_table("streamguard sanitize", summary_rows(summary)))


def _sanitize_many(input: str | None, inputs: Path | None, output: Path, workers: int, options: dict[str, str],
                   ray: str | None, *,
                   device: str, predictions: Path | None, overlay: Path | None, snapshot: Path | None,
                   **settings: Any) -> None:  # fmt: skip
    """``sanitize`` over many videos (:func:`streamguard.batch.sanitize_many`): a line per failure, a table."""
    from rich.table import Table

    from ..batch import SanitizeSettings, expand_inputs, sanitize_many
    from ..errors import InputError

    if snapshot is not None:
        raise ConfigError("--snapshot takes one video, not a batch")
    if output.suffix.lower() in {".mp4", ".m4v", ".mov", ".mkv"}:
        raise ConfigError(f"-o {output}: with many videos -o is an output folder (each gets <stem>.mp4)")
    device_option(device)  # fail early on a device torch cannot use
    videos = expand_inputs([*([input] if input is not None else []), *([f"@{inputs}"] if inputs is not None else [])])
    config = SanitizeSettings(device=device, options=options, **settings)
    finished: list[Any] = []
    with count_progress(f"sanitize {len(videos)} videos", len(videos)) as on_count:

        def on_result(result: Any) -> None:  # one line per failure as it happens, then the bar
            finished.append(result)
            if not result.ok:
                err.print(f"[bold red]failed:[/] {escape(result.error or result.input)}")
            on_count(len(finished), len(videos))

        if ray is None:
            results = sanitize_many(videos, output, workers=workers, settings=config, predictions_dir=predictions,
                                    overlay_dir=overlay, on_result=on_result)  # fmt: skip
        else:
            from ..ray_batch import sanitize_ray

            results = sanitize_ray(videos, output, actors=workers, settings=config, predictions_dir=predictions,
                                   overlay_dir=overlay, address=None if ray == "local" else ray)  # fmt: skip
            for result in results:
                on_result(result)
    table = Table(title="streamguard sanitize", title_justify="left")
    for column in ("input", "status", "frames", "frames/s", "output / error"):
        table.add_column(column, justify="right" if column in ("frames", "frames/s") else "left")
    for r in results:
        name = r.input if "://" in r.input or r.input.startswith("lavfi:") else Path(r.input).name
        fps = f"{r.frames / r.seconds:.1f}" if r.ok and r.seconds > 0 else ""
        error = (r.error or "").removeprefix(f"{r.input}: ")  # the failed: line above has it in full
        table.add_row(escape(name), "done" if r.ok else "[red]failed[/]", str(r.frames) if r.ok else "", fps,
                      escape(r.output.name if r.ok else error))  # fmt: skip
    ok = sum(r.ok for r in results)
    table.caption = f"{ok} done, {len(results) - ok} failed, {workers} worker{'s' if workers > 1 else ''}, into {escape(str(output))}"
    out.print(table)
    failed = [Path(r.input).name for r in results if not r.ok]
    if failed:
        raise InputError(f"{len(failed)} of {len(results)} videos failed: {', '.join(failed)}")


@app.command()
def watch(
    sources: Annotated[list[str], typer.Argument(metavar="SOURCE...", help="Stream URLs (rtsp://, tcp://, srt://, "
        "http(s)://...), /dev/videoN, lavfi:GRAPH or files; a .streams file holds one a line. Several are served by one model.")],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Record the sanitized stream to this MP4 "
        "(several sources: a folder, one NAME.mp4 each).")] = None,
    duration: Annotated[float | None, typer.Option("--duration", min=0, help="Stop after this many seconds.")] = None,
    model: ModelOpt = None,
    detector: DetectorOpt = None,
    imgsz: ImgszOpt = None,
    timeout: Annotated[float, typer.Option("--timeout", min=0.1, help="Give up on a stalled source after this many seconds.")] = 10.0,
    reconnect: Annotated[int, typer.Option("--reconnect", min=0, help="Reopen a stalled, dropped or ended source up to N times in a row (backoff 0.25 s, doubling).")] = 0,
    predictions: Annotated[Path | None, typer.Option("--predictions", help="JSON-lines predictions of the model "
        "(several sources: a folder, one NAME.jsonl each).")] = None,
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
    """Sanitize live streams (newest frames win; Ctrl-C stops and keeps what was recorded).

    A file or lavfi graph is paced at its own frame rate, like a camera, so "dropped" counts the
    frames the defense and model could not keep up with. A status line (fps, latency p50/p95,
    drops) updates once a second on stderr. Several sources share one loaded model, each with its
    own reader, drops, latency and recordings; one that fails is reported and the rest go on.
    """
    from ..fleet import expand_sources
    from ..pipeline import Pipeline

    options = _demuxer_options(demuxer_option)
    rec = recipe_option(recipe)
    net = model_option(model, rec, device)
    defense = defense_option(detector, rec, net, input_size=imgsz)
    uris = expand_sources(sources)
    kw = {"duration": duration, "live": True, "device": device_option(device), "vid_stride": vid_stride,
          "snapshot_every": snapshot_every, **pipeline_options(rec, batch=1)}  # fmt: skip
    opened = {"timeout": timeout, "options": options, "realtime": realtime, "reconnect": reconnect}
    if len(uris) > 1:
        _watch_many(uris, defense, net, opened, output, predictions, snapshot, kw)
        return
    source = uris[0]
    src, paced = _open_live(source, **opened)
    with src:
        pipeline = Pipeline(src, defense, net, output=output, predictions=predictions, snapshot=snapshot, **kw)
        with status_line(f"watch {source}") as on_progress:
            try:
                summary = pipeline.run(on_progress=on_progress)
            except KeyboardInterrupt:
                summary = pipeline.summary()
            finally:
                for event in getattr(src, "events", []):
                    err.print(f"[yellow]warning:[/] {escape(event)}")
    rows = summary_rows(summary) | {"paced (realtime)": "yes" if paced else "no"}
    rows |= {"reconnects": src.reconnects} if reconnect else {}
    out.print(summary_table("streamguard watch", rows))


def _open_live(source: str, timeout: float, options: dict[str, str], realtime: bool | None, reconnect: int) -> tuple[Any, bool]:
    """``watch``'s source: paced unless live (or as ``--realtime`` says), reconnecting when asked."""
    from ..io import ReconnectingSource, is_live_uri, open_source

    paced = (not is_live_uri(source)) if realtime is None else realtime
    if reconnect:
        return ReconnectingSource(source, attempts=reconnect, timeout=timeout, options=options, realtime=paced), paced
    return open_source(source, live=is_live_uri(source) or None, timeout=timeout, options=options, realtime=paced), paced


def _watch_many(uris: list[str], defense: Any, net: Any, opened: dict[str, Any], output: Path | None,
                predictions: Path | None, snapshot: Path | None, kw: dict[str, Any]) -> None:  # fmt: skip
    """Several sources, one model (:class:`~streamguard.fleet.Fleet`); outputs are folders."""
    from contextlib import ExitStack

    from ..errors import InputError, StreamError, StreamGuardError
    from ..fleet import Fleet, fleet_summary, stream_names
    from ..pipeline import Pipeline

    names = stream_names(uris)
    for folder in (output, predictions, snapshot):
        if folder is not None:
            if folder.suffix:
                raise ConfigError(f"{folder}: with several sources, outputs are folders (one NAME.mp4/.jsonl/.jpg each)")
            folder.mkdir(parents=True, exist_ok=True)
    pipelines, failed = [], {}
    with ExitStack() as stack:
        for name, uri in zip(names, uris):
            try:
                src = stack.enter_context(_open_live(uri, **opened)[0])
            except StreamGuardError as e:  # reported with the others; the rest are served
                failed[name] = str(e)
                continue
            files = {"output": output and output / f"{name}.mp4", "predictions": predictions and predictions / f"{name}.jsonl",
                     "snapshot": snapshot and snapshot / f"{name}.jpg"}  # fmt: skip
            fork = defense.fork() if hasattr(defense, "fork") else defense
            pipelines.append((name, Pipeline(src, fork, net, **files, **kw)))
        if not pipelines:
            raise InputError(f"none of the {len(uris)} sources could be opened: " + "; ".join(failed.values()))
        fleet = Fleet([n for n, _ in pipelines], [p for _, p in pipelines])
        with fleet_status_line(fleet.names) as on_progress:
            try:
                results = fleet.run(on_progress)
            except KeyboardInterrupt:
                results = fleet.results
    table = Table(title="streamguard watch", show_lines=False)
    for column in ("stream", "frames", "frames/s", "dropped", "latency p50 / p95 (s)", "patched frames", "result"):
        table.add_column(column, justify="left" if column in ("stream", "result") else "right")
    for r in results:
        s = r.summary
        if s is None:
            table.add_row(escape(r.name), "", "", "", "", "", f"[red]failed[/] {escape(r.error or '')}")
        else:
            table.add_row(escape(r.name), str(s.frames), f"{s.fps:.1f}", str(s.dropped), f"{s.latency_p50:.3f} / {s.latency_p95:.3f}",
                          str(s.frames_with_patches), escape(", ".join(Path(v).name for v in s.outputs.values()) or "done"))  # fmt: skip
    for name, error in failed.items():
        table.add_row(escape(name), "", "", "", "", "", f"[red]failed[/] {escape(error)}")
    totals = fleet_summary(results)
    table.caption = (f"{totals['streams'] + len(failed)} streams, one model: {totals['frames']} frames, {totals['dropped']} dropped, "
                     f"worst p95 {totals['worst latency p95 (s)']:.3f} s")  # fmt: skip
    out.print(table)
    bad = [r.name for r in results if r.error] + list(failed)
    if bad:
        raise StreamError(f"{len(bad)} of {len(uris)} streams failed: {', '.join(bad)}")


