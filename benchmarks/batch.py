"""Batch ``sanitize`` throughput (issue #17): many small videos with 1 and with N worker processes.

Generates ``--videos`` MP4s (``lavfi:testsrc2``, ``--size``, ``--frames`` each), then runs
:func:`streamguard.batch.sanitize_many` over the folder with ``--workers 1`` and with each of
``--compare`` worker counts, and reports total frames per second (wall clock, pool start-up and
each worker's model load included) and the speed-up over one worker. The defense is a small
untrained PatchZero (MobileNetV3 x0.25, the pipeline's full cost without a download) unless
``--detector`` names shipped weights or a checkpoint. JSON and a markdown table:

    python benchmarks/batch.py --json benchmarks/results/batch.json   # also writes batch.md

The speed-up is bounded by the cores: each worker gets ``max(1, cores // workers)`` torch threads,
and the decode / encode threads of every worker share the same cores.
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
import torch

from streamguard.batch import SanitizeSettings, sanitize_many, worker_threads
from streamguard.checkpoints import atomic_write_text
from streamguard.detector import PSPNet
from streamguard.patchzero import PatchZero, save_defense


def make_videos(folder: Path, count: int, size: tuple[int, int], frames: int, fps: int = 24) -> list[Path]:
    """``count`` H.264 MP4s of ``frames`` frames (``testsrc2``, each starting at a different time)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    w, h = size
    for i in range(count):
        path = folder / f"clip{i:02d}.mp4"
        graph = f"testsrc2=size={w}x{h}:rate={fps}:duration={frames / fps}"
        with av.open(graph, format="lavfi") as src, av.open(str(path), "w") as out:
            stream = out.add_stream("libx264", rate=fps, options={"crf": "23", "preset": "veryfast"})
            stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
            for n, frame in enumerate(src.decode(video=0)):
                if n >= frames:
                    break
                frame = frame.reformat(format="yuv420p")
                frame.pts = None
                out.mux(stream.encode(frame))
            out.mux(stream.encode())
        paths.append(path)
    return paths


def tiny_detector(path: Path) -> Path:
    torch.manual_seed(0)
    save_defense(PatchZero(PSPNet("mobilenet_v3", aux=False, width=0.25), mean=(0.5, 0.5, 0.5)), path)
    return path


def run(videos: int, size: tuple[int, int], frames: int, compare: list[int], detector: str | None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_videos(root / "in", videos, size, frames)
        settings = SanitizeSettings(detector=detector or str(tiny_detector(root / "det.pt")))
        rows = []
        for workers in [1, *compare]:
            out = root / f"out{workers}"
            tic = time.perf_counter()
            results = sanitize_many(str(root / "in"), out, workers=workers, settings=settings)
            wall = time.perf_counter() - tic
            done = sum(r.frames for r in results if r.ok)
            rows.append({"workers": workers, "torch_threads": worker_threads(workers) if workers > 1 else torch.get_num_threads(),
                         "videos_ok": sum(r.ok for r in results), "frames": done, "wall_s": round(wall, 3),
                         "frames_per_s": round(done / wall, 2), "videos_per_s": round(len(results) / wall, 3)})  # fmt: skip
        base = rows[0]["frames_per_s"]
        for row in rows:
            row["speedup_vs_1"] = round(row["frames_per_s"] / base, 3)
    return {
        "benchmark": "batch sanitize (sanitize_many over a folder)",
        "videos": videos,
        "size": f"{size[0]}x{size[1]}",
        "frames_per_video": frames,
        "detector": detector or "untrained PSPNet mobilenet_v3 x0.25 (PatchZero, input as is)",
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "load_average_before": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "machine": f"{platform.machine()} {platform.processor() or platform.system()}, torch {torch.__version__}",
        "runs": rows,
    }


def markdown(result: dict) -> str:
    head = (f"Batch `sanitize`: {result['videos']} videos of {result['size']}, {result['frames_per_video']} frames each, "
            f"{result['cores']} cores (load average before: {result['load_average_before']}); detector: {result['detector']}.\n\n")  # fmt: skip
    lines = ["| workers | torch threads each | videos ok | frames | wall (s) | frames/s | speed-up vs 1 |",
             "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for r in result["runs"]:
        lines.append(f"| {r['workers']} | {r['torch_threads']} | {r['videos_ok']} | {r['frames']} | {r['wall_s']:.2f} | "
                     f"{r['frames_per_s']:.1f} | {r['speedup_vs_1']:.2f} |")  # fmt: skip
    return head + "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=8)
    parser.add_argument("--size", default="320x240", help="WxH of the generated videos")
    parser.add_argument("--frames", type=int, default=48)
    parser.add_argument("--compare", default="2", help="comma-separated worker counts to compare with 1")
    parser.add_argument("--detector", default=None, help="PatchZero weights (default: a small untrained one)")
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "batch.json",
                        help="JSON result; the markdown table goes next to it (.md)")  # fmt: skip
    args = parser.parse_args()
    w, h = (int(v) for v in args.size.lower().split("x"))
    result = run(args.videos, (w, h), args.frames, [int(v) for v in args.compare.split(",") if v.strip()], args.detector)
    atomic_write_text(args.json, json.dumps(result, indent=1) + "\n")
    atomic_write_text(args.json.with_suffix(".md"), markdown(result))
    print(markdown(result))
    print(f"wrote {args.json} and {args.json.with_suffix('.md')}")


if __name__ == "__main__":
    main()
