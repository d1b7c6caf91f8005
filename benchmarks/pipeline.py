"""Throughput of the sanitize pipeline against its stages, on one generated clip.

Measures, for a ``WxH`` lavfi clip encoded to MP4: decode-only, detector-only (PatchZero with
an untrained PSPNet, same chunking as the pipeline), encode-only and full ``Pipeline`` frames/s,
and the ratio of the pipeline to its slowest stage (target >= 0.85: the threads hide everything
but the bottleneck).

    python benchmarks/pipeline.py --frames 96 --size 640x480 --json benchmarks/results/pipeline.json

``--live`` measures the live path instead (issue #14), with the shipped defense
(``synth-patchzero``) and the ``camera`` recipe's settings (model, temporal EMA, clip length,
batch, queue): for each ``--live-sizes`` entry a paced source (``lavfi:testsrc2=size=WxH:rate=25``,
``realtime=True``, live mode: newest frames win) for ``--seconds`` s, reporting frames processed
per second, decode-to-write latency p50/p95 and drops; then the file ``sanitize`` throughput of
``--file-size`` footage against decode+encode alone (the same ``Pipeline`` with ``defense=None``:
the I/O limit), ``--repeats`` (default 5) back-to-back pairs, as the median of the pairs' ratios
(the best of each is kept too). JSON and a markdown table:

    python benchmarks/pipeline.py --live --seconds 10 --json benchmarks/results/pipeline_live.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import av
import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from streamguard.detector import build_detector
from streamguard.io import open_source
from streamguard.patchzero import PatchZero
from streamguard.pipeline import Pipeline, Summary
from streamguard.sinks import VideoSink

ROOT = Path(__file__).resolve().parent


def make_clip(path: Path, frames: int, width: int, height: int, fps: int) -> Path:
    with open_source(f"lavfi:testsrc2=size={width}x{height}:rate={fps}:duration={frames / fps}") as src:
        with VideoSink(path, width, height, fps, crf=23) as sink:
            for frame in src:
                sink.write(frame.image)
    return path


def timed(fn) -> tuple[float, object]:
    tic = time.perf_counter()
    out = fn()
    return time.perf_counter() - tic, out


def decode_only(path: Path) -> tuple[float, list[np.ndarray]]:
    with open_source(path) as src:
        return timed(lambda: [f.image for f in src])


@torch.inference_mode()
def detector_only(defense: PatchZero, images: list[np.ndarray], clip_len: int, batch: int) -> float:
    x = torch.from_numpy(np.stack(images)).permute(3, 0, 1, 2).float().div(255)  # (3, N, H, W)
    step = clip_len * batch
    chunks = [x[:, i : i + step] for i in range(0, x.shape[1], step)]
    defense.sanitize(chunks[0][:, :clip_len][None])  # warm-up
    tic = time.perf_counter()
    for chunk in chunks:
        t = chunk.shape[1]
        n = t // clip_len
        clips = chunk[:, : n * clip_len].unflatten(1, (n, clip_len)).permute(1, 0, 2, 3, 4) if n else chunk[None]
        defense.sanitize(clips)
        if n and t > n * clip_len:
            defense.sanitize(chunk[:, n * clip_len :][None])
    return time.perf_counter() - tic


def encode_only(images: list[np.ndarray], fps: int, out: Path) -> float:
    height, width = images[0].shape[:2]

    def run() -> None:
        with VideoSink(out, width, height, fps) as sink:
            for image in images:
                sink.write(image)

    return timed(run)[0]


# ---------------------------------------------------------------- the live path (--live)


def _load_defense(ref: str, **overrides):
    try:
        from streamguard.patchzero import load_defense
    except ImportError:  # before the PatchZero module split
        from streamguard.detector import load_defense
    return load_defense(ref, **overrides)


def camera_setup(recipe_name: str, with_model: bool, detector: str | None = None) -> tuple[object, object, dict]:
    """The recipe's defense (shipped weights, or ``detector``: a checkpoint or an exported ``.onnx``;
    the recipe's temporal/threshold/dilate), model and pipeline settings."""
    from streamguard.models import build_model
    from streamguard.recipes import load_recipe

    rec = load_recipe(recipe_name)
    model = build_model(rec.model.name, rec.model.num_classes, rec.model.weights).eval() if with_model else None
    d = rec.defense
    overrides = {"threshold": d.threshold, "dilate": d.dilate, "temporal": d.temporal, "ema": d.ema}
    if model is not None:
        overrides["mean"] = tuple(model.spec.mean)
    if detector is not None and detector.endswith(".onnx"):
        from streamguard.patchzero import build_defense

        defense = build_defense(weights=detector, **overrides).eval()
    else:
        defense = _load_defense(detector or d.weights, **overrides).eval()
    p = rec.pipeline
    options = {"clip_len": p.clip_len, "stride": p.stride, "batch": p.batch, "queue": p.queue}
    return defense, model, options


def _row(summary: Summary, offered: int | None = None) -> dict:
    offered = summary.frames + summary.dropped if offered is None else offered
    return {
        "frames": summary.frames, "dropped": summary.dropped, "offered": offered,
        "kept_fraction": round(summary.frames / offered, 4) if offered else None,
        "fps": round(summary.fps, 3), "latency_p50_s": round(summary.latency_p50, 4),
        "latency_p95_s": round(summary.latency_p95, 4), "latency_max_s": round(summary.latency_max, 4),
        "wall_s": round(summary.wall_time, 3), "stage_busy_s": summary.stage_busy,
        "frames_with_patches": summary.frames_with_patches, "mean_masked_area": round(summary.mean_masked_area, 6),
    }


def live_run(size: tuple[int, int], seconds: float, defense, model, options: dict, rate: int = 25) -> dict:
    """A paced ``testsrc2`` at ``rate`` fps for ``seconds`` s through the live pipeline."""
    width, height = size
    with open_source(f"lavfi:testsrc2=size={width}x{height}:rate={rate}", realtime=True) as src:
        summary = Pipeline(src, defense, model, duration=seconds, live=True, **options).run()
    return {"size": f"{width}x{height}", "source_fps": rate, "seconds": seconds, **_row(summary)}


def file_run(clip: Path, out: Path, defense, model, options: dict) -> dict:
    with open_source(clip) as src:
        summary = Pipeline(src, defense, model, output=out, live=False, **options).run()
    return _row(summary)


def warm_up(defense, model, options: dict, size: tuple[int, int]) -> None:
    """One clip through defense and model, so the first measured frames do not pay for lazy init."""
    clip_len = options.get("clip_len") or 8
    with open_source(f"lavfi:testsrc2=size={size[0]}x{size[1]}:rate=25:duration={clip_len / 25}") as src:
        Pipeline(src, defense, model, **options).run()


def _size(text: str) -> tuple[int, int]:
    w, h = (int(v) for v in text.lower().split("x"))
    return w, h


def live_markdown(result: dict) -> str:
    s = result["settings"]
    lines = [
        f"# Live pipeline ({s['recipe']} recipe, {s['defense']}, model {s['model'] or 'none'})",
        "",
        f"{s['cpu_count']} CPU cores, torch {s['torch']} ({s['torch_threads']} threads), PyAV {s['av']}; "
        f"detector working size: {s['detector_working_size'] or 'native (frame size)'}.",
        "",
        f"Paced source `lavfi:testsrc2=size=WxH:rate=25` (realtime, live mode, newest frames win), "
        f"{s['seconds']:g} s each:",
        "",
        "| size | frames/s processed | kept | dropped | latency p50 (s) | latency p95 (s) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in result["live"]:
        lines.append(f"| {r['size']} | {r['fps']:.2f} | {r['frames']} / {r['offered']} | {r['dropped']} | "
                     f"{r['latency_p50_s']:.3f} | {r['latency_p95_s']:.3f} |")
    f = result["file"]
    lines += [
        "",
        f"File `sanitize`, {f['size']}, {f['frames']} frames (file mode, nothing dropped):",
        "",
        "| run | frames/s |",
        "| --- | ---: |",
        f"| sanitize (defense{' + model' if s['model'] else ''}), best of {len(f['all_sanitize_fps'])} | {f['sanitize']['fps']:.2f} |",
        f"| decode + encode alone (defense=None), best of {len(f['all_io_fps'])} | {f['io_only']['fps']:.2f} |",
        f"| ratio sanitize / I/O (median of {len(f['paired_ratios'])} back-to-back pairs) | {f['ratio']:.3f} |",
        "",
    ]
    return "\n".join(lines)


def live_main(args: argparse.Namespace) -> None:
    from streamguard.checkpoints import atomic_write_text

    defense, model, options = camera_setup(args.recipe, not args.no_model, args.detector)
    sizes = [_size(v) for v in args.live_sizes.split(",") if v]
    file_size = _size(args.file_size)
    warm_up(defense, model, options, sizes[0] if sizes else file_size)
    console = Console()
    live = []
    for size in sizes:
        live.append(live_run(size, args.seconds, defense, model, options))
        console.print(f"live {live[-1]['size']}: {live[-1]['fps']:.2f} frames/s, dropped {live[-1]['dropped']}")
    with tempfile.TemporaryDirectory() as tmp:
        clip = make_clip(Path(tmp) / "clip.mp4", args.file_frames, *file_size, 25)
        io_runs, runs = [], []
        for _ in range(args.repeats):  # back-to-back pairs: the machine may be shared, and the median pair ratio is robust to it
            io_runs.append(file_run(clip, Path(tmp) / "io.mp4", None, None, options))
            runs.append(file_run(clip, Path(tmp) / "sanitized.mp4", defense, model, options))
    best_io, best = max(io_runs, key=lambda r: r["fps"]), max(runs, key=lambda r: r["fps"])
    paired = sorted(r["fps"] / i["fps"] for r, i in zip(runs, io_runs) if i["fps"])
    working = getattr(defense, "input_size", None)
    result = {
        "live": live,
        "file": {"size": f"{file_size[0]}x{file_size[1]}", "frames": best["frames"], "sanitize": best,
                 "io_only": best_io, "ratio": round(float(np.median(paired)), 4) if paired else None,
                 "paired_ratios": [round(v, 4) for v in paired],
                 "best_over_best": round(best["fps"] / best_io["fps"], 4) if best_io["fps"] else None,
                 "all_sanitize_fps": [r["fps"] for r in runs], "all_io_fps": [r["fps"] for r in io_runs]},
        "settings": {
            "recipe": args.recipe, "defense": args.detector or "synth-patchzero", "model": getattr(getattr(model, "spec", None), "name", None),
            "pipeline": options, "temporal": defense.temporal, "detector_working_size": list(working) if working else None,
            "seconds": args.seconds, "file_frames": args.file_frames, "repeats": args.repeats,
            "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "device": "cpu",
            "encoder": "libx264 crf 18 veryfast", "torch": torch.__version__, "av": av.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
        },
    }
    table = Table(title=f"live pipeline, {args.recipe} recipe, {args.seconds:g} s per size (paced at 25 fps)")
    for column in ("size", "frames/s", "kept / offered", "dropped", "latency p50 (s)", "latency p95 (s)"):
        table.add_column(column, justify="left" if column == "size" else "right")
    for r in live:
        table.add_row(r["size"], f"{r['fps']:.2f}", f"{r['frames']} / {r['offered']}", str(r["dropped"]),
                      f"{r['latency_p50_s']:.3f}", f"{r['latency_p95_s']:.3f}")
    console.print(table)
    f = result["file"]
    console.print(f"file sanitize {f['size']}: {f['sanitize']['fps']:.2f} frames/s; decode+encode alone "
                  f"{f['io_only']['fps']:.2f} frames/s; ratio {f['ratio']:.3f}")
    json_path = args.json or ROOT / "results" / "pipeline_live.json"
    atomic_write_text(json_path, json.dumps(result, indent=2) + "\n")
    atomic_write_text(json_path.with_suffix(".md"), live_markdown(result))
    console.print(f"wrote {json_path} and {json_path.with_suffix('.md')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=96)
    parser.add_argument("--size", default="640x480", help="WxH")
    parser.add_argument("--fps", type=int, default=25)
    parser.add_argument("--backbone", default="mobilenet_v3", choices=("mobilenet_v3", "resnet18", "resnet50"))
    parser.add_argument("--clip-len", type=int, default=8)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repetitions; the best is kept")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", type=Path, default=None,
                        help="default: benchmarks/results/pipeline.json (--live: pipeline_live.json, plus .md)")
    live = parser.add_argument_group("--live: the live path (issue #14)")
    live.add_argument("--live", action="store_true", help="measure the live path instead of the stages")
    live.add_argument("--live-sizes", default="640x480,1280x720,1920x1080", help="comma-separated WxH of the paced sources")
    live.add_argument("--seconds", type=float, default=10.0, help="seconds of paced source per size")
    live.add_argument("--file-size", default="1280x720", help="WxH of the file sanitize vs I/O comparison")
    live.add_argument("--file-frames", type=int, default=250)
    live.add_argument("--recipe", default="camera")
    live.add_argument("--no-model", action="store_true", help="defense only (no downstream model)")
    live.add_argument("--detector", default=None, help="detector weights or an exported .onnx (ONNX Runtime; "
                      "`streamguard export`); default: the recipe's")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.live:
        if "--repeats" not in __import__("sys").argv:
            args.repeats = 5
        live_main(args)
        return
    args.json = args.json or ROOT / "results" / "pipeline.json"
    width, height = (int(v) for v in args.size.lower().split("x"))
    defense = PatchZero(build_detector(args.backbone, aux=False), mean=(0.5, 0.5, 0.5)).eval()

    with tempfile.TemporaryDirectory() as tmp:
        clip = make_clip(Path(tmp) / "clip.mp4", args.frames, width, height, args.fps)
        t_decode, t_detect, t_encode, summaries = [], [], [], []
        for _ in range(args.repeats):  # interleaved, best of: the machine may be shared
            t, images = decode_only(clip)
            t_decode.append(t)
            t_detect.append(detector_only(defense, images, args.clip_len, args.batch))
            t_encode.append(encode_only(images, args.fps, Path(tmp) / "encoded.mp4"))
            with open_source(clip) as src:
                summaries.append(Pipeline(src, defense, output=Path(tmp) / "sanitized.mp4",
                                          clip_len=args.clip_len, batch=args.batch).run())
        n = len(images)
        summary = max(summaries, key=lambda s: s.fps)
        t_decode, t_detect, t_encode = min(t_decode), min(t_detect), min(t_encode)

    fps = {"decode": n / t_decode, "detector": n / t_detect, "encode": n / t_encode, "pipeline": summary.fps}
    slowest = min(("decode", "detector", "encode"), key=fps.get)
    ratio = fps["pipeline"] / fps[slowest]
    result = {
        "frames_per_second": {k: round(v, 3) for k, v in fps.items()},
        "slowest_stage": slowest,
        "pipeline_over_slowest": round(ratio, 4),
        "target": 0.85,
        "pipeline_stage_busy_s": summary.stage_busy,
        "all_pipeline_fps": [round(s.fps, 3) for s in summaries],
        "frames": n,
        "settings": {
            "size": [width, height], "fps": args.fps, "backbone": args.backbone, "width_mult": 1.0,
            "clip_len": args.clip_len, "batch": args.batch, "repeats": args.repeats, "torch_threads": args.threads,
            "cpu_count": os.cpu_count(), "device": "cpu", "encoder": "libx264 crf 18 veryfast",
            "torch": torch.__version__, "av": av.__version__, "python": platform.python_version(),
            "platform": platform.platform(),
        },
    }
    table = Table(title=f"pipeline throughput, {width}x{height}, {n} frames, PSPNet {args.backbone}")
    table.add_column("stage")
    table.add_column("frames/s", justify="right")
    for name, value in fps.items():
        table.add_row(name + (" (slowest)" if name == slowest else ""), f"{value:.2f}")
    table.add_row("pipeline / slowest", f"{ratio:.3f} (target >= 0.85)")
    Console().print(table)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    Console().print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
