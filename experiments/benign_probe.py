"""How much clean video a detector masks, and what a higher threshold would cost.

    python experiments/benign_probe.py WEIGHTS [--recipe synth-clip] [--picture masked.png] [--test-videos 48] [--min-core 4]

Prints the race's held-out benign masked fraction (``held_out_benign`` + ``benign_fpr``: 16 clips of
the footage's test split and 16 unseen graphics clips, through the full defense at 0.5, with the
recipe's shape completion) and which of those clips are masked at all, the same for the race's 48
clean validation clips of the task (``held_out_race``; the race's ``clean_fpr``; ``--picture``: one row
per masked clip, its first frame | the fused patch probability | the mask, 3x; ``--test-videos N``: the
highest fused probability and the masked fraction of the first N clean videos of ``evaluate``'s order, the
test videos, to read a table's clean column and never to choose by; ``--min-core``: the defense's ``min_core``,
default the recipe's), then, per
threshold, the fraction of pixels above it (temporal mean fusion, no dilation) on 24 footage train,
24 footage test and 24 training-graphics clips, and the DO pixel recall on 24 cached attacks. Seed 0.
Needs ``data/footage`` and the recipe's attack cache.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from streamguard.data.footage import FootageClips
from streamguard.data.graphics import GraphicsClips
from streamguard.evaluation.grid import evaluation_videos, load_dataset
from streamguard.patchzero import load_defense
from streamguard.recipes import load_recipe
from streamguard.training.attack_cache import AttackCache, load_downstream
from streamguard.training.stages import (
    GRAPHICS_TRAIN,
    benign_fpr,
    held_out_benign,
    held_out_race,
)


def fused_probabilities(detector: torch.nn.Module, clips: list[torch.Tensor]) -> torch.Tensor:
    """``(N, 1, H, W)``: sigmoid of the detector's logits averaged over each clip's frames."""
    x = torch.stack(clips)
    n, c, t, h, w = x.shape
    with torch.no_grad():
        logits = detector(x.transpose(1, 2).reshape(n * t, c, h, w)).reshape(n, t, 1, h, w).mean(1)
    return torch.sigmoid(logits)


def write_picture(path: Path, defense: torch.nn.Module, clips: torch.Tensor) -> None:
    """One row per clip ``(N, 3, T, H, W)``: first frame | fused probability (jet) | the defense's mask."""
    p = fused_probabilities(defense.detector, list(clips))[:, 0].numpy()
    with torch.no_grad():
        mask = defense.sanitize(clips)[1][:, 0, 0].numpy()
    u8 = lambda a: (a * 255).astype(np.uint8)  # [0, 1] -> uint8
    rows = [np.concatenate([u8(c[:, 0].permute(1, 2, 0).numpy()), cv2.applyColorMap(u8(q), cv2.COLORMAP_JET)[..., ::-1],
                            np.repeat(u8(m)[..., None], 3, 2)], 1) for c, q, m in zip(clips, p, mask)]  # fmt: skip
    img = np.concatenate(rows, 0)
    cv2.imwrite(str(path), cv2.resize(img[..., ::-1], None, fx=3, fy=3, interpolation=cv2.INTER_NEAREST))


def print_test_videos(defense: torch.nn.Module, rec: Any, n: int) -> None:
    """The clean test videos the defense comes nearest to masking: highest fused probability, masked fraction."""
    ds = load_dataset(rec)
    rows = []
    for v, name in evaluation_videos(replace(rec, evaluate=replace(rec.evaluate, max_videos=n)), ds):
        x = torch.as_tensor(ds[v][0], dtype=torch.float32)
        rows.append((float(fused_probabilities(defense.detector, [x]).max()), benign_fpr(defense, x[None]), name))
    print(f"clean test videos: masked fraction {np.mean([f for _, f, _ in rows]):.2e} (the videos are of one size); nearest to masked first:",
          [f"{v}: {p:.3f}, {f:.2e}" for p, f, v in sorted(rows, reverse=True)[:5]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("weights")
    parser.add_argument("--recipe", default="synth-clip")
    parser.add_argument("--picture", type=Path, default=None)
    parser.add_argument("--test-videos", type=int, default=0)
    parser.add_argument("--min-core", type=int, default=None)
    args = parser.parse_args()
    rec = load_recipe(args.recipe)
    defense = load_defense(args.weights)
    defense.complete = rec.defense.complete or defense.complete  # the race judges through the recipe's defense
    defense.min_core = next(v for v in (args.min_core, rec.defense.min_core, defense.min_core) if v is not None)
    held = held_out_benign(rec, 32)
    print(f"held-out benign masked fraction: footage {benign_fpr(defense, held[:16]):.2e}, graphics {benign_fpr(defense, held[16:]):.2e}")
    masked = {i: f"{f:.2e}" for i in range(len(held)) if (f := benign_fpr(defense, held[i : i + 1]))}
    print(f"held-out clips masked (0-15 footage, 16-31 graphics): {masked}")
    model = load_downstream(rec, torch.device("cpu"))
    val = held_out_race(rec, model, 48, torch.device("cpu"))[0]
    masked = {i: f"{f:.2e}" for i in range(len(val)) if (f := benign_fpr(defense, val[i : i + 1]))}
    print(f"clean validation clips: masked fraction {benign_fpr(defense, val):.2e}, clips masked {masked}")
    if args.picture and masked:
        write_picture(args.picture, defense, val[list(masked)])
    if args.test_videos:
        print_test_videos(defense, rec, args.test_videos)
    rng = np.random.default_rng(0)
    footage = rec.train.patches.footage
    train, test = FootageClips(footage, "train"), FootageClips(footage, "test")
    graphics = GraphicsClips(GRAPHICS_TRAIN, rec.data.size, rec.data.clip_len, rec.train.seed)
    pick = lambda ds, n: [ds[int(i)][0] for i in rng.choice(n, 24, replace=False)]  # noqa: E731
    detector = defense.detector
    p_train, p_test = fused_probabilities(detector, pick(train, len(train))), fused_probabilities(detector, pick(test, len(test)))
    p_graphics = fused_probabilities(detector, pick(graphics, GRAPHICS_TRAIN))
    cache = AttackCache(rec.train.cache)
    items = [cache[int(i)] for i in rng.choice(len(cache), 24, replace=False)]
    p_do = fused_probabilities(detector, [x for x, _ in items])
    patch = torch.stack([m for _, m in items]).amax(2) > 0.5
    for thr in (0.5, 0.7, 0.9, 0.97):
        print(f"threshold {thr}: above it on footage train {(p_train > thr).float().mean():.2e}, footage test "
              f"{(p_test > thr).float().mean():.2e}, graphics {(p_graphics > thr).float().mean():.2e}; "
              f"DO pixel recall {(p_do > thr)[patch].float().mean():.3f}")


if __name__ == "__main__":
    main()
