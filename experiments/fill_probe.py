"""Does the mask's rim cost the scene under it, or the grey? (issue #16) Mean repaint vs a smooth fill.

    python experiments/fill_probe.py [WEIGHTS] [--recipe synth-clip] [--clips 48] [--area 0.1]

On the race's validation clips (``held_out_race``, every patch at ``--area``), top-1 with the true patch dilated by
0-3 pixels repainted by the dataset mean (PatchZero's repaint) and by a pull-push fill (:func:`pull_push`: each
masked pixel takes the colour of the nearest unmasked surroundings, coarse to fine), on the clean clips and after a
20-iteration downstream-only masked PGD; then the same with the detector's own mask. If the fill kept what the grey
loses, a smarter repaint would shrink the rim's cost; if not, the scene under the rim is what is lost.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from streamguard.patchzero import build_defense, dilate_mask
from streamguard.recipes import load_recipe
from streamguard.training.attack_cache import load_downstream
from streamguard.training.race import patch_attack
from streamguard.training.stages import held_out_race, task_for


def pull_push(x: torch.Tensor, m: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """Fill the pixels of clips ``x`` (N, C, T, H, W) where ``m`` (N, 1, T, H, W) is 1 from the others: average
    the known pixels down a 2x pyramid, then upsample the coarse colours (bilinear) into the holes, level by level;
    the dataset ``mean`` (C,) where a frame has no known pixel at all. Known pixels are returned as they are."""
    n, c, t, h, w = x.shape
    frames = x.transpose(1, 2).reshape(n * t, c, h, w)
    known = (1 - m).transpose(1, 2).reshape(n * t, 1, h, w)
    levels = [(frames * known, known)]
    while min(levels[-1][0].shape[-2:]) > 1:
        total, weight = levels[-1]
        levels.append((F.avg_pool2d(total, 2, ceil_mode=True), F.avg_pool2d(weight, 2, ceil_mode=True)))
    total, weight = levels[-1]
    out = torch.where(weight > 0, total / weight.clamp_min(1e-8), mean.view(1, -1, 1, 1).to(total))
    for total, weight in reversed(levels[:-1]):
        up = F.interpolate(out, total.shape[-2:], mode="bilinear", align_corners=False)
        out = torch.where(weight > 0, total / weight.clamp_min(1e-8), up)
    return out.reshape(n, t, c, h, w).transpose(1, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("weights", nargs="?", default=None)
    parser.add_argument("--recipe", default="synth-clip")
    parser.add_argument("--clips", type=int, default=48)
    parser.add_argument("--area", type=float, default=0.1)
    args = parser.parse_args()
    rec = load_recipe(args.recipe)
    rec.train.area_range = [args.area, args.area]
    model = load_downstream(rec, torch.device("cpu")).eval()
    task, mean = task_for(model), torch.tensor(model.spec.mean)
    x, y, mask, z0 = held_out_race(rec, model, args.clips, torch.device("cpu"))
    z, _, _ = patch_attack(model, None, x, y, mask, z0, rec.attack.iters, rec.attack.step, "pgd")
    clips = {"clean": x, "do": x * (1 - mask) + mask * z}

    def top1(v: torch.Tensor, m: torch.Tensor, fill: bool) -> float:
        paint = pull_push(v, m, mean) if fill else mean.view(1, 3, 1, 1, 1)
        with torch.no_grad():
            return round(100 * task.score(v * (1 - m) + paint * m, y), 1)

    defense = build_defense(rec.defense, weights=args.weights or rec.defense.weights, mean=model.spec.mean,
                            input_size=rec.data.size).eval()  # fmt: skip
    with torch.no_grad():
        found = {k: defense.sanitize(v)[1] for k, v in clips.items()}
    print(f"{len(x)} validation clips, {args.area:.0%} patches; top-1 %, mean repaint | pull-push fill")
    rows = [(f"true patch, dilate {d}", {k: dilate_mask(mask, d) for k in clips}) for d in range(4)]
    for name, masks in rows + [("the detector's mask", found)]:
        cells = [f"{k} {top1(v, masks[k], False)} | {top1(v, masks[k], True)}" for k, v in clips.items()]
        print(f"  {name:>22}: " + "; ".join(cells))


if __name__ == "__main__":
    main()
