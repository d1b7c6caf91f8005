"""How much clean video a detector masks, and what a higher threshold would cost.

    python experiments/benign_probe.py WEIGHTS [--recipe synth-clip]

Prints the race's held-out benign masked fraction (``held_out_benign`` + ``benign_fpr``: 16 clips of
the footage's test split and 16 unseen graphics clips, through the full defense at 0.5, with the
recipe's shape completion) and which of those clips are masked at all, then, per
threshold, the fraction of pixels above it (temporal mean fusion, no dilation) on 24 footage train,
24 footage test and 24 training-graphics clips, and the DO pixel recall on 24 cached attacks. Seed 0.
Needs ``data/footage`` and the recipe's attack cache.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from streamguard.data.footage import FootageClips
from streamguard.data.graphics import GraphicsClips
from streamguard.patchzero import load_defense
from streamguard.recipes import load_recipe
from streamguard.training.attack_cache import AttackCache
from streamguard.training.stages import GRAPHICS_TRAIN, benign_fpr, held_out_benign


def fused_probabilities(detector: torch.nn.Module, clips: list[torch.Tensor]) -> torch.Tensor:
    """``(N, 1, H, W)``: sigmoid of the detector's logits averaged over each clip's frames."""
    x = torch.stack(clips)
    n, c, t, h, w = x.shape
    with torch.no_grad():
        logits = detector(x.transpose(1, 2).reshape(n * t, c, h, w)).reshape(n, t, 1, h, w).mean(1)
    return torch.sigmoid(logits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("weights")
    parser.add_argument("--recipe", default="synth-clip")
    args = parser.parse_args()
    rec = load_recipe(args.recipe)
    defense = load_defense(args.weights)
    defense.complete = rec.defense.complete or defense.complete  # the race judges through the recipe's defense
    held = held_out_benign(rec, 32)
    print(f"held-out benign masked fraction: footage {benign_fpr(defense, held[:16]):.2e}, graphics {benign_fpr(defense, held[16:]):.2e}")
    masked = {i: f"{f:.2e}" for i in range(len(held)) if (f := benign_fpr(defense, held[i : i + 1]))}
    print(f"held-out clips masked (0-15 footage, 16-31 graphics): {masked}")
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
