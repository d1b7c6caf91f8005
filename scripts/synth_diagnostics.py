"""Per-class diagnostics of SynthMotion and a classifier on it: which classes are hard, and why.

    python scripts/synth_diagnostics.py [--recipe synth-clip] [--model synth-tiny3d]

For each class: the classifier's recall on the recipe's test split, and how much the class's test
videos move when rendered over a flat background (the same random draws as the benchmark): the mean
absolute change between consecutive frames, in grey levels, and the share of videos where it is
below 0.3 (nearly static to a 64 px network).

Then whether the test clips carry the rotation sense at all: for each rotate-class clip, the
rotation about the object's box centre that best aligns each frame with the frame two later (grey
levels, -30..30 degrees in 3 degree steps, summed over the clip) and how often its sign names the
class. A classifier that is at chance on these classes fails to learn a signal that is there. And
how often an untrained :class:`streamguard.models.VortexPool` at 5 px (the shipped classifier's
largest scale) names the sense by its larger peak.
"""

from __future__ import annotations

import argparse

import cv2
import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader

from streamguard.data import SYNTH_CLASSES, load_boxes, recipe_clips, render_video
from streamguard.models import VortexPool, load_model
from streamguard.recipes import DataSection, load_recipe

STATIC = 0.3


@torch.no_grad()
def recalls(model: torch.nn.Module, ds: object) -> np.ndarray:
    """Per-class recall of ``model`` on every clip of ``ds``."""
    hits, counts = np.zeros(len(SYNTH_CLASSES)), np.zeros(len(SYNTH_CLASSES))
    for x, y in DataLoader(ds, batch_size=32):
        pred = model(x).argmax(1)
        np.add.at(counts, y.numpy(), 1)
        np.add.at(hits, y.numpy(), (pred == y).numpy())
    return hits / np.maximum(counts, 1)


def frame_change(class_index: int, groups: list[int], d: DataSection) -> np.ndarray:
    """Mean absolute change between consecutive frames of each video, on a flat grey background."""
    out = []
    for group in groups:
        seq = np.random.SeedSequence([d.seed, class_index, group])
        video, _, _ = render_video(class_index, seq, d.size, d.frames, plain=128, rotation=tuple(d.rotation))
        out.append(np.abs(np.diff(video.astype(np.float32), axis=0)).mean())
    return np.array(out)


def rotation_sense(clip: torch.Tensor, box: np.ndarray) -> float:
    """Summed best-aligning rotation (degrees, counter-clockwise positive) between frames t and t+2
    of a ``(3, T, H, W)`` clip, about the centre of the object's first-frame ``box`` (xyxy)."""
    grey = clip.mean(0).numpy() * 255
    x0, y0, x1, y1 = (int(v) for v in box)
    centre = ((x0 + x1) / 2 - 0.5, (y0 + y1) / 2 - 0.5)
    total = 0.0
    for t in range(0, len(grey) - 2, 2):
        errors = {}
        for angle in range(-30, 31, 3):
            turned = cv2.warpAffine(grey[t], cv2.getRotationMatrix2D(centre, angle, 1.0), grey[t].shape[::-1])
            errors[angle] = np.abs(turned[y0:y1, x0:x1] - grey[t + 2][y0:y1, x0:x1]).mean()
        total += min(errors, key=errors.__getitem__)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="synth-clip")
    parser.add_argument("--model", default=None, help="classifier (default: the recipe's model.weights)")
    args = parser.parse_args()
    recipe = load_recipe(args.recipe)
    d = recipe.data
    ds = recipe_clips(d, "test")
    model = load_model(args.model or recipe.model.weights).eval()
    recall = recalls(model, ds)
    table = Table(title=f"SynthMotion test split ({len(ds)} clips, seed {d.seed}), classifier {args.model or recipe.model.weights}")
    for column in ("class", "recall %", "frame change (grey levels)", f"videos < {STATIC} %"):
        table.add_column(column, justify="left" if column == "class" else "right")
    for c, name in enumerate(SYNTH_CLASSES):
        groups = sorted(int(p.stem.split("_g")[1].split("_")[0]) for p, label in ds.videos if label == c)
        change = frame_change(c, groups, d)
        table.add_row(name, f"{100 * recall[c]:.1f}", f"{change.mean():.2f}", f"{100 * (change < STATIC).mean():.0f}")
    console = Console()
    console.print(table)
    cw, ccw = SYNTH_CLASSES.index("RotateClockwise"), SYNTH_CLASSES.index("RotateCounterClockwise")
    hits = [
        (rotation_sense(ds[i][0], load_boxes(path)[0][0][0]) < 0) == (label == cw)
        for i, (path, label) in enumerate(ds.videos)
        if label in (cw, ccw)
    ]
    console.print(f"rotation sense by frame alignment (no learning): {100 * np.mean(hits):.1f}% of {len(hits)} rotate clips")
    vortex = VortexPool((5.0,)).eval()
    with torch.no_grad():
        peaks = [vortex(((ds[i][0] - 0.5) / 0.25)[None])[0] for i, (_, label) in enumerate(ds.videos) if label in (cw, ccw)]
    labels = [label for _, label in ds.videos if label in (cw, ccw)]
    hits = [(p[0] > p[1]).item() == (label == ccw) for p, label in zip(peaks, labels)]
    console.print(f"rotation sense by an untrained VortexPool at 5 px (no learning): {100 * np.mean(hits):.1f}% of {len(hits)} rotate clips")


if __name__ == "__main__":
    main()
