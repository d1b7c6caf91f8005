"""The shipped detector under PyTorch vs ONNX Runtime at its working size (issue #14).

    python benchmarks/detector_runtime.py [--weights synth-patchzero] [--repeats 7] [--json PATH]

Exports ``--weights`` with ``streamguard.export.export_onnx`` to a temporary graph, then times
``detector(frames)`` on ``(B, 3, h, w)`` random frames at the working size for each ``--batches``
entry, PyTorch (``inference_mode``) and ONNX Runtime interleaved after one warm-up call each, both
with ``--threads`` threads; the median of ``--repeats`` per cell, the ratio of medians, and the
largest logit difference between the two (seed 0). Writes JSON and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from streamguard.checkpoints import atomic_write_text
from streamguard.export import export_onnx
from streamguard.patchzero import load_defense, load_onnx_defense

ROOT = Path(__file__).resolve().parent


def seconds(fn) -> float:
    tic = time.perf_counter()
    fn()
    return time.perf_counter() - tic


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = [
        f"# Detector runtime: `{s['weights']}` at {s['size'][0]}x{s['size'][1]}",
        "",
        f"{s['cpu_count']} CPU cores, {s['threads']} threads each, torch {s['torch']}, onnxruntime {s['onnxruntime']}; "
        f"median of {s['repeats']} interleaved calls, seed 0.",
        "",
        "| frames per call | PyTorch ms/frame | ONNX Runtime ms/frame | speed-up | max logit diff |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['batch']} | {r['torch_ms_per_frame']:.3f} | {r['onnx_ms_per_frame']:.3f} | "
                     f"{r['speedup']:.2f}x | {r['max_logit_diff']:.1e} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default="synth-patchzero")
    parser.add_argument("--batches", default="4,32,128", help="comma-separated frames per call")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", type=Path, default=ROOT / "results" / "detector_runtime.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    defense = load_defense(args.weights).eval()
    size = tuple(defense.input_size or (64, 64))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(defense, Path(tmp) / "det.onnx", source=args.weights)
        onnx = load_onnx_defense(path, threads=args.threads).detector
        for batch in (int(v) for v in args.batches.split(",")):
            x = torch.rand(batch, 3, *size)
            with torch.inference_mode():
                reference, exported = defense.detector(x), onnx(x)  # the warm-up calls
                reference = reference[0] if isinstance(reference, tuple) else reference
                times: dict[str, list[float]] = {"torch": [], "onnx": []}
                for _ in range(args.repeats):
                    times["torch"].append(seconds(lambda: defense.detector(x)))
                    times["onnx"].append(seconds(lambda: onnx(x)))
            t, o = statistics.median(times["torch"]), statistics.median(times["onnx"])
            rows.append({"batch": batch, "torch_ms_per_frame": round(1000 * t / batch, 4), "onnx_ms_per_frame": round(1000 * o / batch, 4),
                         "speedup": round(t / o, 3), "max_logit_diff": float((exported - reference).abs().max())})  # fmt: skip
            print(f"{batch:4d} frames: PyTorch {rows[-1]['torch_ms_per_frame']:.3f} ms/frame, ONNX Runtime "
                  f"{rows[-1]['onnx_ms_per_frame']:.3f} ms/frame ({rows[-1]['speedup']:.2f}x), max logit diff {rows[-1]['max_logit_diff']:.1e}")
    import onnxruntime

    result = {"rows": rows, "settings": {
        "weights": args.weights, "size": list(size), "repeats": args.repeats, "threads": args.threads,
        "cpu_count": os.cpu_count(), "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
        "python": platform.python_version(), "platform": platform.platform()}}  # fmt: skip
    atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
    atomic_write_text(args.json.with_suffix(".md"), markdown(result))
    print(f"wrote {args.json} and {args.json.with_suffix('.md')}")


if __name__ == "__main__":
    main()
