"""Score any detector weights on a recipe's held-out race, the problem stage 2 selects its checkpoints on.

    python experiments/race_score.py WEIGHTS [WEIGHTS...] [--recipe synth-detect] [--clips N] [--iters N]
        [--method pgd|apgd] [--uncompleted] [--json OUT]

For each weights (a shipped name or a checkpoint): a fresh ``train.race.eval_iters``-iteration masked
BPDA attack (``train.race.eval_method``; ``--iters``, ``--method`` and ``--uncompleted`` override the recipe) on ``--clips`` (default ``train.eval_videos``) validation clips of the training split, with
the masks and start content of ``train.seed`` (``held_out_race``; before commit 4f157d6 these were
test clips), through PatchZero at the recipe's working scale; then
the clean and robust score (top-1, or box AP50 for a frame detector), the patch pixels' recall and
precision under the attack (made through ``train.race.uncompleted_view`` with ``train.race.eval_uncompleted``:
without shape completion, or with the spread soft mask; scored through the real defense), the masked fraction of the clean validation clips (``clean_fpr``) and of
32 held-out benign clips. So a stage-2 run's
history can be set beside the detector it started from (issue #16).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from streamguard.patchzero import build_defense
from streamguard.recipes import load_recipe
from streamguard.training.attack_cache import load_downstream
from streamguard.training.stages import (
    benign_fpr,
    held_out_benign,
    held_out_race,
    race_score,
    race_view,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("weights", nargs="+")
    parser.add_argument("--recipe", default="synth-detect")
    parser.add_argument("--clips", type=int, default=None)
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--method", choices=["pgd", "apgd"], default=None)
    parser.add_argument("--uncompleted", action="store_true", help="attack through train.race.uncompleted_view (default: without shape completion)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rec = load_recipe(args.recipe)
    r = rec.train.race
    r.eval_iters, r.eval_method = args.iters or r.eval_iters, args.method or r.eval_method
    r.eval_uncompleted = r.eval_uncompleted or args.uncompleted
    dev = torch.device("cpu")
    model = load_downstream(rec, dev).eval()
    x, y, mask, z0 = held_out_race(rec, model, args.clips or rec.train.eval_videos, dev)
    benign = held_out_benign(rec, 32)
    results = {}

    def defense_for(weights: str, **overrides: str) -> torch.nn.Module:
        return build_defense(rec.defense, weights=weights, mean=model.spec.mean, bpda=True, input_size=rec.data.size, **overrides).eval()

    for weights in args.weights:
        start = time.perf_counter()
        defense = defense_for(weights)
        through = race_view(defense_for(weights), r.uncompleted_view) if r.eval_uncompleted else None
        scores = race_score(model, defense, x, y, mask, z0, r.eval_iters, rec.attack.step, r.eval_method, through=through)
        scores["benign_fpr"] = benign_fpr(defense, benign)
        results[weights] = {**scores, "seconds": round(time.perf_counter() - start, 1)}
        print(weights, {k: round(v, 4) for k, v in results[weights].items()}, flush=True)
    if args.json:
        settings = {"recipe": rec.name, "clips": len(x), "iters": r.eval_iters, "method": r.eval_method,
                    "uncompleted": r.eval_uncompleted, "view": r.uncompleted_view, "seed": rec.train.seed}
        args.json.write_text(json.dumps({"settings": settings, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
