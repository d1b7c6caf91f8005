"""What the patch detector has never seen: recall per patch family, at the model's scale and at native size.

    python benchmarks/generalization.py [--detector synth-patchzero] [--recipe synth-clip] [--clips 8] [--seed 0]
    python benchmarks/generalization.py --quick      # 2 clips, 4 frames, 2 iterations: a smoke test

Backgrounds are held-out real footage: clips of ``--video`` (default opencv-doc's ``vtest.avi``, the
surveillance video the footage builder always keeps out of training), 16 frames each. Per patch
family (the procedural textures of :mod:`streamguard.patches` and masked PGD / AutoPGD / CW patches
made downstream-only against the recipe's classifier) and area (5%, 10% squares, fixed over the
clip), a patch is drawn at the model's scale (the clip resized to the model's input) and, for the
native sizes, enlarged pixel by pixel to the frame and pasted there. The defense is the recipe's
PatchZero, exactly as ``sanitize`` builds it; its mask is scored against the true one (pixel
precision / recall / F1). A patch reaches a deployed model through a codec, so each is also scored
at 320x240 after an H.264 round trip (:data:`CODEC`): whether it still fools the model (against the
model's prediction on the same clean clip through the same codec, so that the codec's own effect is not
counted) and what the detector finds of it. The mean change a patch makes to the pixels it covers, in
grey levels, says how visible it is. Families the recipe's ``[train.patches] held_out`` names are marked.
Benign false-positive rate: the masked fraction of clean clips of the video and of lavfi test
patterns at native sizes. Writes a table and ``benchmarks/results/generalization.{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch import Tensor

from streamguard.attacks import MaskedAttack
from streamguard.checkpoints import atomic_write_text
from streamguard.io import open_source
from streamguard.metrics import PixelCounts
from streamguard.models import build_model
from streamguard.patches import TEXTURES, compressed, patch_geometry, place_patch, texture
from streamguard.patchzero import build_defense
from streamguard.recipes import load_recipe
from streamguard.resize import resize_frames

RESULTS = Path(__file__).resolve().parent / "results"
VTEST = "/usr/share/doc/opencv-doc/examples/data/vtest.avi"
ATTACKS = ("pgd", "apgd", "cw")
NATIVE = {"320x240": (240, 320), "640x480": (480, 640)}
PATTERNS = ("testsrc2", "smptebars", "mandelbrot")
PATTERN_SIZES = ((240, 320), (480, 640), (720, 1280))
CODEC = ("h264", 23)  # libx264's default CRF (veryfast), at 320x240


def video_clips(path: str, n: int, t: int) -> list[np.ndarray]:
    """``n`` clips of ``t`` consecutive frames spread over the video: uint8 (t, H, W, 3) each."""
    with open_source(path) as src:
        frames = [f.image for f in src]
    starts = np.linspace(0, len(frames) - t, n).astype(int)
    return [np.stack(frames[s : s + t]) for s in starts]


def pattern_clip(name: str, size: tuple[int, int], t: int) -> np.ndarray:
    h, w = size
    with open_source(f"lavfi:{name}=size={w}x{h}:rate=25") as src:
        frames = []
        for f in src:
            frames.append(f.image)
            if len(frames) == t:
                break
    return np.stack(frames)


def as_clip(frames: np.ndarray) -> Tensor:
    """uint8 (T, H, W, 3) -> float (1, 3, T, H, W) in [0, 1]."""
    return torch.from_numpy(frames).permute(3, 0, 1, 2)[None].float() / 255


def resize_clip(x: Tensor, size: tuple[int, int], mode: str = "area") -> Tensor:
    n, c, t, h, w = x.shape
    frames = x.transpose(1, 2).reshape(n * t, c, h, w)
    out = resize_frames(frames, size) if mode == "area" else F.interpolate(frames, size, mode=mode)
    return out.reshape(n, t, c, *size).transpose(1, 2)


def procedural(x: Tensor, family: str, area: float, rng: np.random.Generator) -> tuple[Tensor, Tensor]:
    """A ``family`` square covering ``area`` of each frame of ``x`` (1, 3, T, h, w): (x', mask (1, 1, T, h, w))."""
    _, _, t, h, w = x.shape
    stamp, corners = patch_geometry((t, h, w), area, rng, "square", False)
    mask = torch.from_numpy(place_patch(stamp[None], corners, (t, h, w)))[None]
    content = torch.from_numpy(place_patch(texture(family, *stamp.shape, rng), corners, (t, h, w)))[None]
    return x * (1 - mask) + content * mask, mask


def attacked(model: Any, x: Tensor, method: str, area: float, rng: np.random.Generator, iters: int, seed: int) -> tuple[Tensor, Tensor]:
    """A DO masked ``method`` patch against ``model``'s own prediction on ``x`` (N, 3, T, h, w)."""
    n, _, t, h, w = x.shape
    masks = []
    for _ in range(n):
        stamp, corners = patch_geometry((t, h, w), area, rng, "square", False)
        masks.append(place_patch(stamp[None], corners, (t, h, w)))
    mask = torch.from_numpy(np.stack(masks))
    with torch.no_grad():
        y = model(x).argmax(1).numpy()
    attack = MaskedAttack(model, method, "do", eps=1.0, step=0.2, iters=iters, seed=seed)
    return torch.from_numpy(attack.generate(x.numpy(), y, mask.numpy())), mask


def score(defense: Any, x: Tensor, mask: Tensor) -> PixelCounts:
    defense.reset()
    return PixelCounts.from_masks(defense.mask(x) > 0.5, mask > 0.5)


def through_codec(model: Any, defense: Any, adv: Tensor, mask: Tensor, natives: list[Tensor], coded_pred: Tensor) -> tuple[PixelCounts, float]:
    """The patches of ``adv`` (N, 3, T, h, w) pasted at 320x240 and sent through :data:`CODEC`: the detector's
    pixel counts, and the fraction of clips whose prediction differs from ``coded_pred`` (the clean clips' through it)."""
    hw, size = NATIVE["320x240"], tuple(adv.shape[-2:])
    total, small = PixelCounts(), []
    for i, x in enumerate(natives):
        big_adv, big_mask = resize_clip(adv[i : i + 1], hw, "nearest-exact"), resize_clip(mask[i : i + 1], hw, "nearest-exact")
        coded = compressed((resize_clip(x, hw) * (1 - big_mask) + big_adv * big_mask)[0], *CODEC)[None]
        total = total + score(defense, coded, big_mask)
        small.append(resize_clip(coded, size))
    with torch.no_grad():
        fooled = (model(torch.cat(small)).argmax(1) != coded_pred).float().mean().item()
    return total, fooled


def run(args: argparse.Namespace) -> dict[str, Any]:
    recipe = load_recipe(args.recipe)
    model = build_model(recipe.model.name, recipe.model.num_classes, recipe.model.weights).eval()
    defense = build_defense(recipe.defense, weights=args.detector, mean=model.spec.mean).eval()
    t = model.spec.clip_len if not args.quick else 4
    size = tuple(model.spec.input_size)
    natives = [as_clip(c) for c in video_clips(args.video, args.clips, t)]
    small = torch.cat([resize_clip(x, size) for x in natives])  # the model's view of each clip
    coded = [compressed(resize_clip(x, NATIVE["320x240"])[0], *CODEC)[None] for x in natives]
    with torch.no_grad():
        coded_pred = model(torch.cat([resize_clip(c, size) for c in coded])).argmax(1)  # the clean clips through the codec
    held_out = set(recipe.train.patches.held_out)
    seen = set(recipe.train.patches.textures) | {"pgd", "apgd"}
    rows = []
    for k, family in enumerate((*TEXTURES, *ATTACKS)):
        for area in (0.05, 0.10):
            rng = np.random.default_rng([args.seed, k, int(area * 100)])
            if family in ATTACKS:
                adv, mask = attacked(model, small, family, area, rng, args.iters, args.seed)
            else:
                pairs = [procedural(x[None], family, area, rng) for x in small]
                adv, mask = torch.cat([a for a, _ in pairs]), torch.cat([m for _, m in pairs])
            with torch.no_grad():
                fooled = (model(adv).argmax(1) != model(small).argmax(1)).float().mean().item()
            counts = {"model": score(defense, adv, mask)}
            for name, hw in NATIVE.items():
                total = PixelCounts()
                for i, x in enumerate(natives):
                    bg = resize_clip(x, hw)
                    big_adv, big_mask = resize_clip(adv[i : i + 1], hw, "nearest-exact"), resize_clip(mask[i : i + 1], hw, "nearest-exact")
                    total = total + score(defense, bg * (1 - big_mask) + big_adv * big_mask, big_mask)
                counts[name] = total
            counts["h264"], codec_fooled = through_codec(model, defense, adv, mask, natives, coded_pred)
            change = 255 * ((adv - small).abs().sum() / (mask.sum() * adv.shape[1])).item()
            status = "held out" if family in held_out else ("seen" if family in seen else "unseen")
            rows.append({"family": family, "area": area, "status": status, "fooled": fooled, "change": change, "h264_fooled": codec_fooled,
                         **{k: {"precision": c.precision, "recall": c.recall, "f1": c.f1} for k, c in counts.items()}})  # fmt: skip
            print(f"{family:8s} {area:.2f} " + " ".join(f"{k} R {c.recall:.3f}" for k, c in counts.items()), flush=True)
    benign = {}
    for name, hw in NATIVE.items():
        benign[f"{Path(args.video).stem} {name}"] = float(np.mean([defense.mask(resize_clip(x, hw)).mean().item() for x in natives]))
    for pattern in PATTERNS:
        for hw in PATTERN_SIZES:
            defense.reset()
            benign[f"{pattern} {hw[1]}x{hw[0]}"] = defense.mask(as_clip(pattern_clip(pattern, hw, t))).mean().item()
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": platform.processor() or platform.machine(),
        "settings": {"recipe": recipe.name, "detector": args.detector or recipe.defense.weights, "video": args.video,
                     "clips": args.clips, "frames": t, "iters": args.iters, "seed": args.seed,
                     "working_size": list(defense.input_size or size), "dilate": defense.dilate},  # fmt: skip
        "families": rows,
        "benign_fpr": benign,
    }


def markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    lines = [
        f"Detector `{s['detector']}` (recipe `{s['recipe']}`, working size {s['working_size']}, dilate {s['dilate']}); "
        f"{s['clips']} clips x {s['frames']} frames of `{Path(s['video']).name}`, seed {s['seed']}, attacks {s['iters']} iterations.",
        "",
        f"Change: the mean absolute change of the patch's pixels, in grey levels (0-255). H.264: at 320x240 through libx264 "
        f"CRF {CODEC[1]}; it fools the model if the prediction differs from the clean clip's through the same codec.",
        "",
        "| Family | Area | In training | Change | Fools the model | Model scale P / R / F1 | 320x240 P / R / F1 | 640x480 P / R / F1 "
        "| H.264: fools | H.264 P / R / F1 |",
        "| --- | ---: | --- | ---: | ---: | --- | --- | --- | ---: | --- |",
    ]
    for r in result["families"]:
        cells = [" / ".join("–" if v != v else f"{100 * v:.1f}" for v in r[k].values()) for k in ("model", *NATIVE, "h264")]
        lines.append(f"| {r['family']} | {100 * r['area']:.0f}% | {r['status']} | {r['change']:.1f} | {100 * r['fooled']:.0f}% | "
                     + " | ".join(cells[:-1]) + f" | {100 * r['h264_fooled']:.0f}% | {cells[-1]} |")
    lines += ["", "| Clean source (native size) | Masked fraction |", "| --- | ---: |"]
    lines += [f"| {k} | {v:.2e} |" for k, v in result["benign_fpr"].items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="synth-clip")
    parser.add_argument("--detector", default=None, help="weights (default: the recipe's defense.weights)")
    parser.add_argument("--video", default=VTEST)
    parser.add_argument("--clips", type=int, default=8)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--output", type=Path, default=RESULTS / "generalization")
    args = parser.parse_args()
    if args.quick:
        args.clips, args.iters = 2, 2
    torch.set_num_threads(2)
    tic = time.perf_counter()
    result = run(args)
    result["wall_s"] = round(time.perf_counter() - tic, 1)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.output.with_suffix(".json"), json.dumps(result, indent=2))
    atomic_write_text(args.output.with_suffix(".md"), markdown(result))
    table = Table(title="patch detector generalization (recall %)")
    for col in ("family", "area", "training", "model", *NATIVE, "h264"):
        table.add_column(col)
    for r in result["families"]:
        table.add_row(r["family"], f"{100 * r['area']:.0f}%", r["status"], *(f"{100 * r[k]['recall']:.1f}" for k in ("model", *NATIVE, "h264")))
    Console().print(table)
    Console().print({k: f"{v:.2e}" for k, v in result["benign_fpr"].items()})


if __name__ == "__main__":
    main()
