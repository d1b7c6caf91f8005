"""Is a warm-started pool patch as strong as a fresh attack with as many iterations? (issue #16)

    python experiments/pool_strength.py runs/train/race-v3/detector-stage2-state.pt [--recipe synth-clip] [--method apgd]

Takes the race's saved state (the detector at that step and its ``PatchPool``), picks the ``--clips``
pool entries with the most accumulated BPDA iterations (at least ``--min-iters``), and on those clips
and masks, against that same detector, compares the stored pool content with a fresh masked attack
(``--method``: PGD, or AutoPGD for a race whose pool is AutoPGD's) from random content (seed 0) of
``--iters`` iterations (default: the pool entries' median accumulated count)
and 20 iterations; with ``--continue K...`` also the pool content attacked K more iterations against this
detector (does a warm start plus K iterations reach a fresh attack of many more?). Prints fooled fraction and
mean cross-entropy of each; ``--json`` writes them.
With ``--uncompleted`` only the slots a race attacks through another view of the defense (``train.race.uncompleted``,
``uncompleted_view``: without shape completion by default) are ranked, and the fresh attacks go through that view
too; every row is scored through the real defense.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from streamguard.checkpoints import load_checkpoint
from streamguard.detector import build_detector
from streamguard.patchzero import build_defense
from streamguard.recipes import load_recipe
from streamguard.training.attack_cache import load_downstream
from streamguard.training.core import recipe_dataset
from streamguard.training.race import PatchPool, patch_attack
from streamguard.training.stages import race_view


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("state")
    parser.add_argument("--recipe", default="synth-clip")
    parser.add_argument("--clips", type=int, default=16)
    parser.add_argument("--min-iters", type=int, default=40)
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--method", choices=("pgd", "apgd"), default="pgd")
    parser.add_argument("--uncompleted", action="store_true", help="the race's slots attacked through train.race.uncompleted_view, fresh attacks through it too")
    parser.add_argument("--continue", dest="more", type=int, nargs="*", default=[], metavar="K",
                        help="also the pool patches attacked K more iterations (several K: one row each)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    rec = load_recipe(args.recipe)
    state, meta = load_checkpoint(args.state)
    model = load_downstream(rec, torch.device("cpu")).eval()
    d = rec.defense
    detector = build_detector(d.backbone, width=d.width, refine=d.refine, aux=True)
    detector.load_state_dict(state["model"])
    bpda = build_defense(d, detector=detector.eval(), mean=model.spec.mean, bpda=True, input_size=rec.data.size).eval()
    through = build_defense(d, detector=detector, mean=model.spec.mean, bpda=True, input_size=rec.data.size)
    through = race_view(through, rec.train.race.uncompleted_view).eval()
    pool = PatchPool([], None, 0)  # type: ignore[arg-type]
    pool.load_state_dict(state["buffers"]["pool"])
    slots = pool.entries[: rec.train.race.uncompleted] if args.uncompleted else pool.entries
    ranked = sorted((e for e in slots if e.iters >= args.min_iters), key=lambda e: -e.iters)[: args.clips]
    if not ranked:
        raise SystemExit(f"no pool entry has {args.min_iters}+ iterations yet")
    train = recipe_dataset(rec, "train")
    items = [train[e.video] for e in ranked]
    x = torch.stack([c for c, _ in items])
    y = torch.tensor([int(label) for _, label in items])
    m = torch.stack([e.mask for e in ranked])
    accumulated = [e.iters for e in ranked]
    iters = args.iters or int(np.median(accumulated))

    def score(z: torch.Tensor) -> dict[str, float]:
        with torch.no_grad():
            logits = model(bpda(x * (1 - m) + m * z))
        return {"fooled": float((logits.argmax(1) != y).float().mean()), "loss": float(F.cross_entropy(logits, y))}

    z0 = torch.from_numpy(np.random.default_rng(0).random(x.shape, dtype=np.float32))
    pooled = torch.stack([e.content for e in ranked])
    rows = {"pool": score(pooled)}
    runs = [(f"fresh {n}", z0, n) for n in sorted({20, iters})] + [(f"pool +{k}", pooled, k) for k in args.more]
    for name, start, n in runs:
        tic = time.perf_counter()
        z, _, _ = patch_attack(model, through if args.uncompleted else bpda, x, y, m, start, n, rec.attack.step, args.method)
        rows[name] = {**score(z), "seconds": round(time.perf_counter() - tic, 1)}
    result = {"state": args.state, "step": meta.get("step"), "method": args.method, "uncompleted": args.uncompleted,
              "clips": len(ranked), "pool_iters": accumulated,
              "median_pool_iters": int(np.median(accumulated)), "rows": rows}  # fmt: skip
    print(f"race step {meta.get('step')}: {len(ranked)} pool entries, accumulated iterations "
          f"{min(accumulated)}-{max(accumulated)} (median {result['median_pool_iters']})")
    for name, r in rows.items():
        print(f"  {name:>10}: fooled {r['fooled']:.3f}, cross-entropy {r['loss']:.3f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
