"""The attacker-defender race as a picture: held-out robust top-1 and pixel recall against stage-2 step.

    python scripts/plot_race.py runs/train/synth-clip/detector-stage2.pt results/race.png

Reads the history the stage-2 race stores in its checkpoint's meta (every ``train.eval_every`` steps:
a fresh BPDA attack on the held-out race clips) and draws it with OpenCV (no plotting library needed).
Writes the history beside the picture (``results/race.json``), keeping any other keys that file has.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import cv2
import numpy as np

from streamguard.checkpoints import atomic_write_text, load_checkpoint

SERIES = (("robust_acc", "robust top-1", (200, 60, 30)), ("race_recall", "pixel recall", (40, 120, 220)),
          ("clean_acc", "clean top-1", (60, 160, 60)))  # fmt: skip
W, H, M = 720, 420, 60


def draw(history: list[dict[str, float]], best: int | None, title: str) -> np.ndarray:
    img = np.full((H, W, 3), 255, np.uint8)
    steps = [h["step"] for h in history]
    x0, x1 = 0, max(steps) if steps else 1

    def pt(step: float, value: float) -> tuple[int, int]:
        return int(M + (step - x0) / max(1, x1 - x0) * (W - 2 * M)), int(H - M - value * (H - 2 * M))

    cv2.rectangle(img, pt(x0, 0), pt(x1, 1), (0, 0, 0), 1)
    for v in (0.25, 0.5, 0.75):
        cv2.line(img, pt(x0, v), pt(x1, v), (225, 225, 225), 1)
        cv2.putText(img, f"{v:.2f}", (8, pt(x0, v)[1] + 4), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (90, 90, 90), 1, cv2.LINE_AA)
    for s in np.linspace(x0, x1, 5):
        cv2.putText(img, f"{int(s)}", (pt(s, 0)[0] - 10, H - M + 18), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (90, 90, 90), 1, cv2.LINE_AA)
    if best is not None:
        cv2.line(img, pt(best, 0), pt(best, 1), (150, 150, 150), 1, cv2.LINE_AA)
        cv2.putText(img, "kept", (pt(best, 1)[0] + 3, M + 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (120, 120, 120), 1, cv2.LINE_AA)
    for i, (key, label, colour) in enumerate(SERIES):
        points = [pt(h["step"], h[key]) for h in history if key in h and h[key] == h[key]]
        if len(points) > 1:
            cv2.polylines(img, [np.array(points, np.int32)], False, colour, 2, cv2.LINE_AA)
        for p in points:
            cv2.circle(img, p, 3, colour, -1, cv2.LINE_AA)
        cv2.putText(img, label, (W - M - 150, H - M - 60 + 18 * i), cv2.FONT_HERSHEY_SIMPLEX, 0.5, colour, 1, cv2.LINE_AA)
    cv2.putText(img, title, (M, M - 20), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(img, "stage-2 step", (W // 2 - 40, H - 15), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    return img


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="detector-stage2.pt (or its state file) of a race")
    parser.add_argument("output", type=Path, help="PNG to write; a JSON of the history goes beside it")
    args = parser.parse_args()
    _, meta = load_checkpoint(args.checkpoint)
    extra = meta.get("extra", meta)
    history = extra.get("history") or meta.get("history") or []
    if not history:
        raise SystemExit(f"{args.checkpoint}: no race history in its metadata")
    best = extra.get("best_step", meta.get("best_step"))
    train = meta.get("recipe", {}).get("train", {})
    race = train.get("race", {})
    attack = {"pgd": "PGD", "apgd": "AutoPGD"}[race.get("eval_method", "pgd")]
    title = f"held-out race: fresh {race.get('eval_iters', 20)}-iteration BPDA {attack} on {train.get('eval_videos', '?')} clips"
    args.output.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(args.output), draw(history, best, title)[..., ::-1])
    record = args.output.with_suffix(".json")  # a results JSON of the same name keeps its other keys (command, sha256)
    kept = json.loads(record.read_text()) if record.is_file() else {}
    atomic_write_text(record, json.dumps({**kept, "best_step": best, "history": history}, indent=1) + "\n")
    print(f"wrote {args.output} ({len(history)} evaluations, best at step {best})")


if __name__ == "__main__":
    main()
