"""Where PatchZero loses a Table 4 cell: holes in the detection, or a mask grown over the scene?

    python experiments/failure_split.py runs/evaluate/synth-clip [--markdown OUT]

Reads an evaluation's ``samples.jsonl`` (``streamguard evaluate``; only the videos of its ``report.json``, the
last run's, when there is one) and, per PatchZero attack cell, splits
the fooled videos by the patch pixels the mask found: all of them (recall >= ``--full``: the patch is
repainted, so the clip was lost to the grey over the scene, over-masking) or not (holes: patch pixels
reach the model). Then, per column, the videos that survive every attack of it among those with all its cells (a
worst case per video that a run stopped part-way can still give). Descriptive only: nothing is chosen on it,
since these are the tables' test videos.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path


def split(samples: list[dict], full: float) -> dict[str, dict[str, float]]:
    """Per attack cell of the ``patchzero`` rows: videos, fooled, fooled with the patch found in full,
    fooled through holes, the holes' median recall and the fooled clips' mean masked pixels outside the patch."""
    cells: dict[str, list[dict]] = defaultdict(list)
    for s in samples:
        if s.get("defense") == "patchzero" and s.get("mode") and s.get("pixels"):
            cells[s["attack"]].append(s)
    out = {}
    for attack, rows in sorted(cells.items()):
        fooled = [r for r in rows if not r["correct"]]
        recall = [r["pixels"][0] / max(1, r["pixels"][0] + r["pixels"][2]) for r in fooled]
        holes = [x for x in recall if x < full]
        out[attack] = {"videos": len(rows), "fooled": len(fooled), "found_in_full": len(recall) - len(holes),
                       "holes": len(holes), "holes_median_recall": round(statistics.median(holes), 3) if holes else None,
                       "fooled_fp_pixels": round(statistics.mean(r["pixels"][1] for r in fooled)) if fooled else None}  # fmt: skip
    return out


def kept(samples: list[dict]) -> dict[str, tuple[int, int]]:
    """Per Table 4 column (``method-area``) of the ``patchzero`` rows: (videos that survive every attack of the
    column, videos with every one of its cells). For a run stopped part-way, whose report is not written."""
    cells: dict[str, dict[int, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for s in samples:
        if s.get("defense") == "patchzero" and s.get("mode") in ("do", "bpda"):
            cells["-".join(s["attack"].split("-")[:2])][s["video"]].append(s["correct"])
    attacks = max((len(v) for videos in cells.values() for v in videos.values()), default=0)  # every column: the same attacks
    out = {}
    for column, videos in sorted(cells.items()):
        whole = [v for v in videos.values() if len(v) == attacks]
        out[column] = (sum(all(v) for v in whole), len(whole))
    return out


def markdown(cells: dict[str, dict[str, float]], full: float) -> str:
    lines = [f"| PatchZero cell | videos | fooled | patch found in full (recall >= {full}) | through holes | holes' median recall | "
             "masked pixels outside the patch (fooled, mean per video) |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for attack, c in cells.items():
        med = "–" if c["holes_median_recall"] is None else f"{c['holes_median_recall']:.2f}"
        fp = "–" if c["fooled_fp_pixels"] is None else str(c["fooled_fp_pixels"])
        lines.append(f"| {attack} | {c['videos']} | {c['fooled']} | {c['found_in_full']} | {c['holes']} | {med} | {fp} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path, help="an evaluation's output folder (with samples.jsonl)")
    parser.add_argument("--full", type=float, default=0.99)
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args()
    lines = (args.output / "samples.jsonl").read_text().splitlines()
    samples = [s for s in map(json.loads, lines) if "header" not in s]
    report = args.output / "report.json"  # the log may hold more videos than the last run's (--max-videos)
    if report.exists():
        videos = set(json.loads(report.read_text())["videos"])
        samples = [s for s in samples if s["video"] in videos]
    table = markdown(split(samples, args.full), args.full)
    table += "\n" + "\n".join(f"{c}: {k} of {n} videos survive every attack of the column" for c, (k, n) in kept(samples).items()) + "\n"
    print(table, end="")
    if args.markdown:
        args.markdown.write_text(table)


if __name__ == "__main__":
    main()
