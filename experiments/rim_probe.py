"""What the mask's rim costs the classifier, and how close the detector's own mask is to the patch (issue #16).

    python experiments/rim_probe.py [WEIGHTS] [--recipe synth-clip] [--videos 48] [--areas 0.05 0.1]
        [--dilate 0 1 2 3] [--json OUT]

On the recipe's evaluation videos (Table 4's, in its order and with its seeded patch places), for each
area and dilation ``k``: top-1 with the true patch square grown by ``k`` pixels repainted (a detector
exact to the pixel; ``k = 0`` is GT Mask); and behind PatchZero at dilation ``k`` (the recipe's other
settings), after a downstream-only masked PGD (``attack.iters`` iterations of the race's batched PGD
against the model alone): top-1, the patch pixels' recall and precision, and at ``k = 0`` how far each
side of the detected box lies from the patch's (a pixel beyond it counts +1). Descriptive only, like
``failure_split.py``: nothing is chosen on the test videos.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from streamguard.evaluation.grid import _load_batch, evaluation_videos, load_dataset, video_masks
from streamguard.metrics import PixelCounts
from streamguard.patchzero import build_defense, dilate_mask
from streamguard.recipes import load_recipe
from streamguard.training.attack_cache import load_downstream
from streamguard.training.race import patch_attack


def side_offsets(pred: torch.Tensor, true: torch.Tensor) -> list[int] | None:
    """(top, bottom, left, right): pixels the (H, W) mask's bounding box reaches beyond the patch's."""
    if not pred.any():
        return None
    (py, px), (ty, tx) = torch.nonzero(pred, as_tuple=True), torch.nonzero(true, as_tuple=True)
    return [int(ty.min() - py.min()), int(py.max() - ty.max()), int(tx.min() - px.min()), int(px.max() - tx.max())]


@torch.no_grad()
def top1(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    return int((model(x).argmax(1) == y).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("weights", nargs="?", default=None, help="detector (default: the recipe's)")
    parser.add_argument("--recipe", default="synth-clip")
    parser.add_argument("--videos", type=int, default=48)
    parser.add_argument("--areas", type=float, nargs="+", default=[0.05, 0.1])
    parser.add_argument("--dilate", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    rec = load_recipe(args.recipe)
    rec.evaluate.max_videos = args.videos
    dataset = load_dataset(rec)
    videos = [v for v, _ in evaluation_videos(rec, dataset)]
    batch = _load_batch(dataset, videos)
    x, y = batch.x, batch.y
    model = load_downstream(rec, torch.device("cpu")).eval()
    mean = torch.tensor(model.spec.mean).view(1, 3, 1, 1, 1)
    at = rec.attack
    results: dict[str, dict] = {}
    for area in args.areas:
        m = video_masks(videos, tuple(x.shape[2:]), area, at.seed, at.moving)
        z0 = torch.rand(x.shape, generator=torch.Generator().manual_seed(at.seed))
        z, _, _ = patch_attack(model, None, x, y, m, z0, at.iters, at.step, "pgd")
        x_adv = x * (1 - m) + m * z
        for k in args.dilate:
            grown = dilate_mask(m, k) if k else m
            defense = build_defense(rec.defense, weights=args.weights, mean=model.spec.mean, dilate=k).eval()
            defense.reset()
            x_clean, pred = defense.sanitize(x_adv)
            pred, true = pred[:, 0] > 0.5, m[:, 0] > 0.5
            counts = PixelCounts.from_masks(pred, true)
            row = {
                "true_grown_top1": top1(model, x * (1 - grown) + mean * grown, y),
                "true_grown_fraction": round(float(grown.mean()), 4),
                "do_top1": top1(model, x_clean, y),
                "do_recall": round(counts.tp / max(counts.tp + counts.fn, 1), 4),
                "do_precision": round(counts.tp / max(counts.tp + counts.fp, 1), 4),
            }
            if k == 0:
                row["side_offsets"] = [side_offsets(p[0], t[0]) for p, t in zip(pred, true)]
            results[f"{area}:{k}"] = row
            print(f"area {area:g} dilate {k}: true patch grown {row['true_grown_top1']}/{len(videos)}, "
                  f"DO {row['do_top1']}/{len(videos)} (recall {row['do_recall']:.3f}, precision {row['do_precision']:.3f})")  # fmt: skip
    if args.json:
        settings = {"recipe": args.recipe, "weights": args.weights or rec.defense.weights, "videos": len(videos),
                    "iters": at.iters, "seed": at.seed}  # fmt: skip
        args.json.write_text(json.dumps({"settings": settings, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
