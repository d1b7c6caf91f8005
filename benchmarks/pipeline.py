"""Throughput of the sanitize pipeline against its stages, on one generated clip.

Measures, for a ``WxH`` lavfi clip encoded to MP4: decode-only, detector-only (PatchZero with
an untrained PSPNet, same chunking as the pipeline), encode-only and full ``Pipeline`` frames/s,
and the ratio of the pipeline to its slowest stage (target >= 0.85: the threads hide everything
but the bottleneck).

    python benchmarks/pipeline.py --frames 96 --size 640x480 --json benchmarks/results/pipeline.json
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

from streamguard.detector import PatchZero, build_detector
from streamguard.io import VideoSink, open_source
from streamguard.pipeline import Pipeline

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
    parser.add_argument("--json", type=Path, default=ROOT / "results" / "pipeline.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
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
