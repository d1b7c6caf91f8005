"""Why a patient BPDA attacker wins: leaked patch pixels, or a mask grown over the scene?

    python experiments/leak_probe.py [WEIGHTS] [--recipe synth-clip] [--clips 24] [--iters 100] [--json OUT]

A fresh ``--iters``-iteration masked BPDA PGD (the race's attack, step ``attack.step``) on ``--clips``
clips of the *training* split (never the test videos the tables use), masks and start content seeded
by ``train.seed``, through PatchZero at the recipe's working scale. Then the downstream top-1 of the
attacked clip repainted with four masks:

* ``detector``: PatchZero's own mask (what users get),
* ``detector | patch``: the same plus every patch pixel (leaks closed, over-masking kept),
* ``detector & near``: the detector's mask cut to the patch dilated by ``--near`` pixels (leaks kept,
  masking far from the patch removed),
* ``patch``: the true patch only (GT Mask),

and per clip the leaked patch pixels (per frame) and the masked pixels far from the patch.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from streamguard.patchzero import build_defense
from streamguard.recipes import load_recipe
from streamguard.training.attack_cache import draw_masks, load_downstream
from streamguard.training.core import recipe_dataset
from streamguard.training.race import patch_attack

PROBE = 7  # this probe's stream of masks and start content, apart from training's


def _grow(mask: torch.Tensor, px: int) -> torch.Tensor:
    """(N, 1, T, H, W) 0/1 -> dilated by ``px`` pixels per frame (square structuring element)."""
    n, _, t, h, w = mask.shape
    frames = mask.transpose(1, 2).reshape(n * t, 1, h, w)
    grown = F.max_pool2d(frames, 2 * px + 1, stride=1, padding=px)
    return grown.reshape(n, t, 1, h, w).transpose(1, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("weights", nargs="?", default=None)
    parser.add_argument("--recipe", default="synth-clip")
    parser.add_argument("--clips", type=int, default=24)
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--near", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rec = load_recipe(args.recipe)
    weights = args.weights or rec.defense.weights
    torch.manual_seed(rec.train.seed)
    model = load_downstream(rec, torch.device("cpu")).eval()
    ds = recipe_dataset(rec, "train", subset=args.clips)
    items = [ds[i] for i in range(len(ds))]
    x, y = torch.stack([c for c, _ in items]), torch.tensor([int(label) for _, label in items])
    mask = torch.from_numpy(draw_masks(rec, tuple(x.shape[2:]), [np.random.default_rng([rec.train.seed, PROBE, i]) for i in range(len(x))])[0])
    z0 = torch.from_numpy(np.random.default_rng([rec.train.seed, PROBE, len(x)]).random(x.shape, dtype=np.float32))
    defense = build_defense(rec.defense, weights=weights, mean=model.spec.mean, bpda=True, input_size=rec.data.size).eval()
    start = time.perf_counter()
    z, _, _ = patch_attack(model, defense, x, y, mask, z0, args.iters, rec.attack.step)
    seconds = time.perf_counter() - start
    adv = x * (1 - mask) + mask * z
    mean = torch.tensor(model.spec.mean).view(1, 3, 1, 1, 1)
    with torch.no_grad():
        _, found = defense.sanitize(adv)
        found = (found > 0.5).float()
        near = _grow(mask, args.near)
        masks = {"detector": found, "detector | patch": torch.maximum(found, mask), "detector & near": found * near, "patch": mask}
        top1 = {k: (model(adv * (1 - m) + mean * m).argmax(1) == y).float().mean().item() for k, m in masks.items()}
        top1["clean, detector"] = (model(defense(x)).argmax(1) == y).float().mean().item()
    frames = x.shape[2]
    leaked = ((mask - found).clamp(min=0).sum((1, 2, 3, 4)) / frames).tolist()
    far = ((found * (1 - near)).sum((1, 2, 3, 4)) / frames).tolist()
    patch_px = (mask.sum((1, 2, 3, 4)) / frames).tolist()
    fooled = (model(defense(adv)).argmax(1) != y).tolist()
    result = {
        "settings": {"recipe": rec.name, "weights": weights, "clips": len(x), "iters": args.iters, "near": args.near, "seed": rec.train.seed},
        "top1": top1,
        "attack_seconds": round(seconds, 1),
        "per_clip": [{"patch_px": p, "leaked_px": lk, "far_px": f, "fooled": bool(fo)} for p, lk, f, fo in zip(patch_px, leaked, far, fooled)],
    }
    print(json.dumps(result["top1"], indent=1))
    for c in result["per_clip"]:
        print({k: round(v, 1) if isinstance(v, float) else v for k, v in c.items()})
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
