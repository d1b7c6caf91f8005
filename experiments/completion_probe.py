"""Shape completion and dilation, chosen on the race's validation clips (issue #16).

    python experiments/completion_probe.py [WEIGHTS] [--recipe synth-clip] [--clips 48] [--iters N]
        [--method pgd|apgd] [--area A] [--settings none:3 hull:3 box:3 ...] [--judge square:3 ...]
        [--temporal mean|median] [--place mass|middle] [--save CLIPS.pt | --load CLIPS.pt] [--json OUT]

For each setting ``COMPLETE:DILATE[:LOW]`` (``complete`` none, hull, box, square or cover, or ``coverK``, a cover sized
by each region, squares of at most K times its longer side (``defense.cover_scale``); ``dilate`` in working-scale
pixels; ``LOW``, a trial not in the product: hysteresis, the mask grown from the pixels above the
threshold into the connected pixels above ``LOW`` before the dilation, :class:`Hysteresis`): a fresh
masked BPDA attack (``--method``, ``--iters``, default ``train.race.eval_iters``) through PatchZero with
that setting, on the held-out race (``held_out_race``: validation clips of the training split,
never the tables' test videos; masks and start content seeded by ``train.seed``); then clean and
robust top-1, the patch pixels' recall and precision, and the masked fraction of 32 held-out benign
clips; and, to tell leaks from over-masking, the top-1 with the defense's mask united with the
patch (``leaks_closed``) and cut to the patch dilated by ``--near`` pixels (``scene_unmasked``); and a
downstream-only attack of the same method and iterations, made once against the model alone, judged
through the setting (``do_*``: what over-masking costs when the detector finds the patch). Then, for
every completed setting, the attacks made against ``none`` judged through it (a transfer: the attacker
who ignores completion). ``--judge`` settings (``COMPLETE:DILATE[:PATCH_AREA[,SMALLER,...]]``, the last for "square" and "cover"; the
smaller areas ``defense.patch_areas``, "cover" only)
are not attacked themselves, only judged on every attack made (one patient attack, many masks); ``--save``
keeps the attacked clips, and ``--load`` judges them again (the same recipe, ``--clips`` and
``--area``). ``--area`` draws every patch at that area instead of ``train.area_range`` (Table 4's
columns are 5% and 10%). ``--temporal`` fuses the clip's logits another way in every setting
(``defense.temporal``). ``--place middle`` puts every square of a "square" completion in the middle of the places
that contain its region instead of where the detection's probabilities sum highest (a trial, not a defense setting).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

import streamguard.patchzero
from streamguard.metrics import PixelCounts
from streamguard.patchzero import GROWN, PatchZero, build_defense, complete_mask, dilate_mask
from streamguard.recipes import load_recipe
from streamguard.training.attack_cache import load_downstream
from streamguard.training.race import patch_attack
from streamguard.training.stages import (
    benign_fpr,
    held_out_benign,
    held_out_race,
    task_for,
)


class Hysteresis(PatchZero):
    """PatchZero whose mask is grown, before the dilation, from the pixels above ``threshold`` into the
    8-connected pixels above ``low`` (a detector unsure at a patch's holes and border is trusted where it
    touches a sure detection), so a smaller fixed dilation may do. BPDA's soft mask is centred at ``low``."""

    low: float = 0.5

    def _hard_mask(self, logits: torch.Tensor) -> torch.Tensor:
        p = torch.sigmoid(logits)
        grown, allowed = (p > self.threshold).to(logits.dtype), (p > self.low).to(logits.dtype)
        for _ in range(max(logits.shape[-2:])):
            step = torch.maximum(grown, dilate_mask(grown, 1) * allowed)
            if torch.equal(step, grown):
                break
            grown = step
        return complete_mask(dilate_mask(grown, self.dilate), self.complete)

    def _soft_mask(self, logits: torch.Tensor) -> torch.Tensor:
        center = math.log(self.low / (1 - self.low))
        return dilate_mask(torch.sigmoid((logits - center) / self.temperature), self.dilate)


def _square_in_the_middle(integral: np.ndarray, x: int, y: int, w: int, h: int, side: int) -> tuple[int, int, int, int]:
    """``_square_around`` with every place's mass equal, so the square sits in the middle of its places."""
    return _square_by_mass(np.zeros_like(integral), x, y, w, h, side)


_square_by_mass = streamguard.patchzero._square_around


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("weights", nargs="?", default=None)
    parser.add_argument("--recipe", default="synth-clip")
    parser.add_argument("--clips", type=int, default=None)
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--method", choices=["pgd", "apgd"], default="pgd")
    parser.add_argument("--area", type=float, default=None)
    parser.add_argument("--settings", nargs="+", default=["none:3", "hull:3", "box:3"])
    parser.add_argument("--judge", nargs="*", default=[])
    parser.add_argument("--near", type=int, default=1)
    parser.add_argument("--temporal", default=None, help="defense.temporal for every setting (default: the recipe's)")
    parser.add_argument("--place", choices=["mass", "middle"], default="mass", help="where a square completion sits among its places")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--save", type=Path, default=None, help="write the attacked clips here (torch.save)")
    parser.add_argument("--load", type=Path, default=None, help="judge the clips --save wrote (same problem) instead")
    args = parser.parse_args()
    rec = load_recipe(args.recipe)
    if args.place == "middle":
        streamguard.patchzero._square_around = _square_in_the_middle
    weights, iters = args.weights or rec.defense.weights, args.iters or rec.train.race.eval_iters
    dev = torch.device("cpu")
    model = load_downstream(rec, dev).eval()
    task = task_for(model)
    if args.area is not None:
        rec.train.area_range = [args.area, args.area]
    x, y, mask, z0 = held_out_race(rec, model, args.clips or rec.train.eval_videos, dev)
    benign = held_out_benign(rec, 32)

    def build(setting: str) -> torch.nn.Module:
        complete, dilate, *low = setting.split(":")
        scale = float(complete[len("cover"):] or 0) if complete.startswith("cover") else 0.0
        complete = "cover" if scale else complete
        areas = sorted(map(float, low.pop().split(","))) if complete in GROWN and low else []
        area = {"patch_area": areas[-1], "patch_areas": areas[:-1]} if areas else {}
        defense = build_defense(rec.defense, weights=weights, mean=model.spec.mean, bpda=True, input_size=rec.data.size,
                                complete=complete, dilate=int(dilate), cover_scale=scale, **area,
                                **({"temporal": args.temporal} if args.temporal else {})).eval()  # fmt: skip
        if low:
            defense.__class__, defense.low = Hysteresis, float(low[0])
        return defense

    paint = torch.tensor(model.spec.mean).view(1, 3, 1, 1, 1)
    near = dilate_mask(mask, args.near)

    def judge(defense: torch.nn.Module, adv: torch.Tensor) -> dict[str, float]:
        with torch.no_grad():
            clean_adv, found = defense.sanitize(adv)
            closed, cut = torch.maximum(found, mask), found * near
            counts = PixelCounts.from_masks(found > 0.5, mask > 0.5)
            return {f"robust_{task.metric}": task.score(clean_adv, y), "recall": counts.recall, "precision": counts.precision,
                    "leaks_closed": task.score(adv * (1 - closed) + paint * closed, y),
                    "scene_unmasked": task.score(adv * (1 - cut) + paint * cut, y)}  # fmt: skip

    results, attacked = {}, {}
    if args.load:  # judge the clips --save wrote instead of attacking again
        saved = torch.load(args.load, weights_only=True)
        do_adv, attacked, args.settings = saved["do"], saved["attacked"], list(saved["attacked"])
    else:
        z_do, _, _ = patch_attack(model, None, x, y, mask, z0, iters, rec.attack.step, args.method)
        do_adv = x * (1 - mask) + mask * z_do
    for setting in [] if args.load else args.settings:
        start, defense = time.perf_counter(), build(setting)
        z, _, _ = patch_attack(model, defense, x, y, mask, z0, iters, rec.attack.step, args.method)
        attacked[setting] = x * (1 - mask) + mask * z
        with torch.no_grad():
            clean = task.score(defense(x), y)
        do = {f"do_{k}": v for k, v in judge(defense, do_adv).items()}
        results[setting] = {f"clean_{task.metric}": clean, **judge(defense, attacked[setting]), **do,
                            "benign_fpr": benign_fpr(defense, benign), "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip
        print(setting, {k: round(v, 4) for k, v in results[setting].items()}, flush=True)
    if args.save:
        torch.save({"attacked": attacked, "do": do_adv}, args.save)
    for setting in args.settings + args.judge:
        defense = build(setting)
        if setting in args.judge:
            with torch.no_grad():
                clean = task.score(defense(x), y)
            do = {f"do_{k}": v for k, v in judge(defense, do_adv).items()}
            results[setting] = {f"clean_{task.metric}": clean, **do, "benign_fpr": benign_fpr(defense, benign)}
            print(setting, {k: round(v, 4) for k, v in results[setting].items()}, flush=True)
        for made in args.settings if setting in args.judge else [s for s in attacked if s.startswith("none")]:
            if made != setting and not (setting.startswith("none") and setting not in args.judge):
                results[f"{made} -> {setting}"] = judge(defense, attacked[made])
                print(f"{made} -> {setting}", {k: round(v, 4) for k, v in results[f"{made} -> {setting}"].items()}, flush=True)
    if args.json:
        settings = {"recipe": rec.name, "weights": weights, "clips": len(x), "method": args.method, "iters": iters,
                    "area": args.area, "near": args.near, "temporal": args.temporal or rec.defense.temporal,
                    "place": args.place, "seed": rec.train.seed}  # fmt: skip
        args.json.write_text(json.dumps({"settings": settings, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
