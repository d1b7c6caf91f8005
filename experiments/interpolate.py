"""Mix two detector checkpoints in weight space: (1 - alpha) * A + alpha * B (issue #16).

    python experiments/interpolate.py A B --alpha 0.5 [0.25 ...] --out-dir DIR [--benign N --recipe R]

A race that gains robustness also gains benign false positives (race-blind-warm: 70.8% of the validation
clips against the shipped 62.5%, benign FPR 1.03e-3 against 4.9e-4). As in WiSE-FT (Wortsman et al.),
a point on the line between the detector a race started from and where it ended may keep most of the
gain at less cost. A and B must share an architecture and should share an ancestor. Each mix is written
to ``DIR/mix-ALPHA.pt`` with B's meta, its own ``command`` and ``mix`` (A, B, their sha256, alpha).
``--benign N`` also prints each mix's masked fraction of N held-out benign clips (the race's benign
guard), a 1-minute screen before the 19-minute ``race_score.py``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from streamguard.checkpoints import get_weights, save_checkpoint, sha256_file


def mix(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """Floating tensors interpolated; integer ones (BatchNorm's batch counts) taken from ``b``."""
    if a.keys() != b.keys():
        raise SystemExit("the two checkpoints have different parameters: not the same architecture")
    return {k: torch.lerp(a[k], b[k], alpha) if b[k].is_floating_point() else b[k] for k in b}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", help="weights at alpha 0 (a shipped name or a checkpoint)")
    parser.add_argument("b", help="weights at alpha 1")
    parser.add_argument("--alpha", type=float, nargs="+", required=True)
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--benign", type=int, default=0, help="screen each mix on this many held-out benign clips")
    parser.add_argument("--recipe", default="experiments/synth-race-blind-warm.toml")
    args = parser.parse_args()
    wa, wb = get_weights(args.a), get_weights(args.b)
    (sa, _), (sb, meta) = wa.load(), wb.load()
    sources = {"a": args.a, "a_sha256": sha256_file(wa.path), "b": args.b, "b_sha256": sha256_file(wb.path)}
    for alpha in args.alpha:
        path = args.out_dir / f"mix-{alpha:g}.pt"
        command = f"python experiments/interpolate.py {args.a} {args.b} --alpha {alpha:g}"
        made = {"command": command, "mix": {**sources, "alpha": alpha}}
        digest = save_checkpoint(path, mix(sa, sb, alpha), {**meta, **made})
        line = f"alpha {alpha:g}: {path} sha256 {digest}"
        if args.benign:
            line += f"  benign FPR {_benign_fpr(args.recipe, str(path), args.benign):.3g}"
        print(line, flush=True)


def _benign_fpr(recipe_name: str, weights: str, clips: int) -> float:
    from streamguard.patchzero import build_defense
    from streamguard.recipes import load_recipe
    from streamguard.training.stages import benign_fpr, held_out_benign

    rec = load_recipe(recipe_name)
    defense = build_defense(rec.defense, weights=weights, input_size=rec.data.size).eval()
    return benign_fpr(defense, held_out_benign(rec, clips))


if __name__ == "__main__":
    main()
