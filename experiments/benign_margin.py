"""How far below the threshold is the detector on clean video? (issue #14's benign criterion)

    python experiments/benign_margin.py [VIDEO] [--weights synth-patchzero] [--clips 8] [--sizes 320x240 640x480]

For ``--clips`` 16-frame clips spread over ``VIDEO`` (default opencv-doc's held-out ``vtest.avi``), shrunk
(area) to each native size and run through the defense as ``sanitize`` runs it: the largest per-frame
and clip-fused probability, and the masked fraction at that size after dilation. A diagnosis, not a tuning tool: the threshold is not
chosen on this video.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from generalization import VTEST, as_clip, resize_clip, video_clips  # noqa: E402

from streamguard.patchzero import build_defense  # noqa: E402
from streamguard.recipes import load_recipe  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("video", nargs="?", default=VTEST)
    parser.add_argument("--recipe", default="synth-clip")
    parser.add_argument("--weights", default=None)
    parser.add_argument("--clips", type=int, default=8)
    parser.add_argument("--sizes", nargs="+", default=["320x240", "640x480"])
    args = parser.parse_args()
    rec = load_recipe(args.recipe)
    defense = build_defense(rec.defense, weights=args.weights, mean=(0.5, 0.5, 0.5)).eval()
    frame_wise = build_defense(rec.defense, weights=args.weights, mean=(0.5, 0.5, 0.5), temporal="none").eval()
    clips = [as_clip(c) for c in video_clips(args.video, args.clips, 16)]
    print(f"working size {defense.input_size}, threshold {defense.threshold}, dilate {defense.dilate}")
    for size in args.sizes:
        w, h = (int(v) for v in size.split("x"))
        for i, x in enumerate(clips):
            with torch.no_grad():
                frames = resize_clip(x, (h, w))
                per_frame, fused = frame_wise.probabilities(frames).max().item(), defense.probabilities(frames).max().item()
                masked = defense.mask(frames).mean().item()
            print(f"{size} clip {i}: max p per frame {per_frame:.3f}, fused {fused:.3f}, masked {masked:.2e}")


if __name__ == "__main__":
    main()
