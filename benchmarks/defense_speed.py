"""Cost of the defense: defended vs undefended time per clip, and PatchZero vs PatchCleanser on frames.

    python benchmarks/defense_speed.py --repeats 3 [--skip-mars] [--paper] [--json PATH]
    python benchmarks/defense_speed.py --quick      # tiny inputs and networks: a smoke test

1. Per clip, for ``tiny3d`` and MARS (ResNeXt-101, 16x112x112): ``model(x)`` vs
   ``model(defense(x))`` with ``defense = PatchZero(PSPNet(backbone, width=width), mean=spec.mean)``
   (the paper: 1.5x for ResNet-50 on ImageNet). ``--paper`` adds the paper's detector, ResNet-50 at width 1.
2. Per frame, with the same 2D classifier (torchvision ResNet-18, random init): PatchZero
   (detector + repaint + classifier) vs PatchCleanser's double masking (Xiang et al., USENIX
   Security 2022) in its best case (first round unanimous: ``k*k`` inferences) and worst case (every
   first-round disagreer goes to a second round that fails: ``k*k * (1 + disagreers)``
   inferences; with K classes at most ``k*k - ceil(k*k/K)`` masks disagree with the majority, 32 of
   36 for K=10). The cases are forced by :class:`Steered`, which runs the classifier on every
   masked image for its cost and then dictates its decision (the paper: PatchZero 60x faster).

Timings are interleaved (A, B, A, B, ... after one warm-up call each, none for the worst case,
whose batches the best case has already warmed), in ``inference_mode``,
batch 1; the median of ``--repeats`` is reported and ratios are ratios of medians.
Writes a rich table and ``benchmarks/results/defense_speed.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from rich.console import Console
from rich.table import Table
from torch import Tensor, nn

from streamguard.checkpoints import atomic_write_text
from streamguard.detector import IMAGENET_MEAN, IMAGENET_STD, PSPNet
from streamguard.patchzero import PatchZero
from streamguard.models import Normalize, build_model

RESULTS = Path(__file__).resolve().parent / "results" / "defense_speed.json"
QUICK_MARS = {"layers": (1, 1, 1, 1), "stem": 8, "cardinality": 2, "width": 1}  # a MARS-shaped toy

Case = Literal["agreed", "disagreer", "majority"]


# ----------------------------------------------------------------------------- PatchCleanser


def mask_geometry(image: int, patch: int, k: int) -> tuple[int, int]:
    """PatchCleanser's ``(mask size, stride)`` along one side: ``k`` masks cover every patch position."""
    stride = math.ceil((image - patch + 1) / k)
    return min(patch + stride - 1, image), stride


def mask_set(image_size: Sequence[int], mask_size: Sequence[int], stride: Sequence[int]) -> Tensor:
    """PatchCleanser's mask set, ``(M, 1, H, W)`` bool, True = occluded; row-major over mask positions."""
    starts = []
    for n, m, s in zip(image_size, mask_size, stride):
        pos = list(range(0, n - m + 1, s))
        if (n - m) % s:
            pos.append(n - m)
        starts.append(pos)
    masks = torch.zeros(len(starts[0]) * len(starts[1]), 1, *image_size, dtype=torch.bool)
    for i, (y, x) in enumerate((y, x) for y in starts[0] for x in starts[1]):
        masks[i, :, y : y + mask_size[0], x : x + mask_size[1]] = True
    return masks


@dataclass(frozen=True)
class DoubleMaskingResult:
    label: int
    case: Case  # agreed: first round unanimous; disagreer: a second round confirmed it; majority: none did
    inferences: int


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


@torch.inference_mode()
def double_masking_predict(
    model: nn.Module,
    x: Tensor,
    mask_size: int | Sequence[int],
    stride: int | Sequence[int],
    fill: Sequence[float] = IMAGENET_MEAN,
) -> DoubleMaskingResult:
    """PatchCleanser's double-masking inference (Algorithm 1) on one frame ``x`` (3,H,W) or (1,3,H,W).

    Round one classifies the frame under each of the M masks (one batch of M). If all agree, that
    label is returned. Otherwise, for each mask whose label disagrees with the majority, round two
    classifies the frame under that mask combined with every mask (a batch of M); the first
    disagreer all of whose two-mask labels equal its own is returned, else the majority label.
    Occluded pixels take ``fill`` (the dataset mean: zero after normalization, as PatchCleanser's).
    """
    x = x.reshape(1, 3, *x.shape[-2:])
    masks = mask_set(x.shape[-2:], _pair(mask_size), _pair(stride))
    fill_t = torch.as_tensor(fill, dtype=x.dtype).view(1, 3, 1, 1)

    def classify(occluded: Tensor) -> np.ndarray:
        return model(torch.where(occluded, fill_t, x)).argmax(1).numpy()

    first = classify(masks)
    inferences = len(masks)
    if (first == first[0]).all():
        return DoubleMaskingResult(int(first[0]), "agreed", inferences)
    majority = int(np.bincount(first).argmax())
    for i in np.flatnonzero(first != majority):
        second = classify(masks[i] | masks)
        inferences += len(masks)
        if (second == first[i]).all():
            return DoubleMaskingResult(int(first[i]), "disagreer", inferences)
    return DoubleMaskingResult(majority, "majority", inferences)


class Steered(nn.Module):
    """Runs ``model`` on the batch (its full cost), then returns one-hot logits of ``rule(masks)``.

    ``rule`` gets the sorted indices of the masks of ``masks`` that are fully occluded (pixels equal
    to ``fill``) in each image, and returns its label: it forces double masking down a chosen path.
    """

    def __init__(
        self,
        model: nn.Module,
        masks: Tensor,
        fill: Sequence[float],
        rule: Callable[[tuple[int, ...]], int],
        num_classes: int,
    ) -> None:
        super().__init__()
        self.model, self.rule, self.num_classes = model, rule, num_classes
        self.register_buffer("regions", masks.flatten(1).float(), persistent=False)  # (M, H*W)
        self.register_buffer("fill", torch.as_tensor(fill, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        self.model(x)
        visible = (x != self.fill).any(1).flatten(1).float()  # (B, H*W)
        covered = (visible @ self.regions.T) == 0  # (B, M)
        labels = torch.tensor([self.rule(tuple(row.nonzero().flatten().tolist())) for row in covered])
        return F.one_hot(labels, self.num_classes).float()


def best_rule(masks: tuple[int, ...]) -> int:
    """Every masked image gets label 0: round one is unanimous."""
    return 0


def worst_rule(num_classes: int) -> Callable[[tuple[int, ...]], int]:
    """Round one: mask i -> i mod K (as many disagreers as K classes allow); round two never unanimous."""

    def rule(masks: tuple[int, ...]) -> int:
        return masks[0] % num_classes if len(masks) == 1 else (sum(masks) + 1) % num_classes

    return rule


# ----------------------------------------------------------------------------- timing


def interleaved(
    fns: dict[str, Callable[[], object]], repeats: int, warm: Iterable[str] | None = None
) -> dict[str, list[float]]:
    """Seconds per call of each ``fn``, called in turn ``repeats`` times after one warm-up call of each in ``warm``
    (default: all)."""
    for name in fns if warm is None else warm:
        fns[name]()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            tic = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - tic)
    return times


def defense_for(backbone: str, width: float, mean: Sequence[float]) -> PatchZero:
    return PatchZero(PSPNet(backbone, width=width), mean=mean).eval()


@torch.inference_mode()
def bench_clip_model(
    name: str, kw: dict[str, Any], detectors: list[tuple[str, float]], repeats: int
) -> list[dict[str, Any]]:
    """One row per detector: time per clip of ``model(x)`` vs ``model(defense(x))``."""
    model = build_model(name, **kw)
    x = torch.rand(1, *model.spec.input_shape, generator=torch.Generator().manual_seed(0))
    defenses = {f"{b}@{w:g}": defense_for(b, w, model.spec.mean) for b, w in detectors}
    fns: dict[str, Callable[[], object]] = {"undefended": lambda: model(x)}
    fns |= {key: (lambda d=d: model(d(x))) for key, d in defenses.items()}
    times = interleaved(fns, repeats)
    base = statistics.median(times["undefended"])
    return [
        {
            "model": name,
            "input_shape": list(x.shape[1:]),
            "detector": {"backbone": b, "width": w},
            "undefended_s": base,
            "defended_s": statistics.median(times[f"{b}@{w:g}"]),
            "ratio": statistics.median(times[f"{b}@{w:g}"]) / base,
            "times_s": {"undefended": times["undefended"], "defended": times[f"{b}@{w:g}"]},
        }
        for b, w in detectors
    ]


def frame_classifier(name: str, num_classes: int) -> nn.Module:
    """A torchvision image classifier (random init) taking [0,1] frames, ImageNet-normalized inside."""
    net = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    return nn.Sequential(Normalize(IMAGENET_MEAN, IMAGENET_STD), net).eval()


@torch.inference_mode()
def bench_frames(
    classifier: str, size: int, num_classes: int, patch_area: float, k: int, backbone: str, width: float, repeats: int
) -> dict[str, Any]:
    model = frame_classifier(classifier, num_classes)
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0)) * 0.9 + 0.05
    patch = max(1, round(math.sqrt(patch_area) * size))
    mask_size, stride = mask_geometry(size, patch, k)
    masks = mask_set((size, size), (mask_size,) * 2, (stride,) * 2)
    defense = defense_for(backbone, width, IMAGENET_MEAN)
    best = Steered(model, masks, IMAGENET_MEAN, best_rule, num_classes)
    worst = Steered(model, masks, IMAGENET_MEAN, worst_rule(num_classes), num_classes)
    outcome: dict[str, DoubleMaskingResult] = {}

    def run(case: str, steered: Steered) -> None:
        outcome[case] = double_masking_predict(steered, x, mask_size, stride)

    fns: dict[str, Callable[[], object]] = {
        "undefended": lambda: model(x),
        "patchzero": lambda: model(defense(x)),
        "double_masking_best": lambda: run("best", best),
        "double_masking_worst": lambda: run("worst", worst),
    }
    times = interleaved(fns, repeats, warm=("undefended", "patchzero", "double_masking_best"))
    med = {name: statistics.median(t) for name, t in times.items()}
    return {
        "classifier": classifier,
        "input_shape": [3, size, size],
        "num_classes": num_classes,
        "detector": {"backbone": backbone, "width": width},
        "patch": {"area": patch_area, "side": patch},
        "masks": {"per_side": k, "count": len(masks), "size": mask_size, "stride": stride},
        "seconds": med,
        "double_masking": {case: {"case": r.case, "inferences": r.inferences} for case, r in outcome.items()},
        "ratio_best": med["double_masking_best"] / med["patchzero"],
        "ratio_worst": med["double_masking_worst"] / med["patchzero"],
        "patchzero_over_undefended": med["patchzero"] / med["undefended"],
        "times_s": times,
    }


# ----------------------------------------------------------------------------- report


def clip_table(rows: list[dict[str, Any]]) -> Table:
    t = Table(title="Time per clip, batch 1: defended = model(PatchZero(x))")
    for col in ("model", "input", "detector", "undefended s", "defended s", "ratio"):
        t.add_column(col, justify="left" if col in ("model", "input", "detector") else "right")
    for r in rows:
        det = r["detector"]
        t.add_row(
            r["model"], "x".join(map(str, r["input_shape"])), f"{det['backbone']} w{det['width']:g}",
            f"{r['undefended_s']:.4f}", f"{r['defended_s']:.4f}", f"{r['ratio']:.2f}x",
        )
    return t


def frame_table(r: dict[str, Any]) -> Table:
    m, det = r["masks"], r["detector"]
    t = Table(
        title=f"Per frame, {r['classifier']} {'x'.join(map(str, r['input_shape']))}: PatchZero ({det['backbone']} "
        f"w{det['width']:g}) vs double masking ({m['count']} masks of {m['size']}px, stride {m['stride']}, "
        f"patch {r['patch']['side']}px)"
    )
    for col in ("method", "inferences", "s / frame", "vs PatchZero"):
        t.add_column(col, justify="left" if col == "method" else "right")
    s, pz = r["seconds"], r["seconds"]["patchzero"]
    t.add_row("undefended", "1", f"{s['undefended']:.4f}", f"{s['undefended'] / pz:.2f}x")
    t.add_row("PatchZero", "1 + detector", f"{pz:.4f}", "1.00x")
    for case in ("best", "worst"):
        dm = r["double_masking"][case]
        t.add_row(
            f"double masking, {case} ({dm['case']})", str(dm["inferences"]),
            f"{s[f'double_masking_{case}']:.4f}", f"{r[f'ratio_{case}']:.2f}x",
        )
    return t


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny inputs and networks, one repeat (a smoke test)")
    p.add_argument("--skip-mars", action="store_true")
    p.add_argument("--paper", action="store_true", help="also time the paper's detector (resnet50, width 1)")
    p.add_argument("--size", type=int, help="clip frame side (default 112; 32 with --quick)")
    p.add_argument("--clip-len", type=int, help="frames per clip (default 16; 4 with --quick)")
    p.add_argument("--backbone", default="mobilenet_v3", choices=("mobilenet_v3", "resnet18", "resnet50"))
    p.add_argument("--width", type=float, help="detector width (default 0.5; 0.25 with --quick)")
    p.add_argument(
        "--frame-model",
        default="resnet18",
        choices=torchvision.models.list_models(module=torchvision.models),
        metavar="NAME",
        help="torchvision image classifier for the frame comparison (default resnet18)",
    )
    p.add_argument("--frame-size", type=int, help="frame side for the frame comparison (default 112; 32 with --quick)")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--patch-area", type=float, default=0.02, help="patch area fraction PatchCleanser is sized for")
    p.add_argument("--masks-per-side", type=int, help="PatchCleanser's k, k*k masks (default 6; 3 with --quick)")
    p.add_argument("--repeats", type=int, help="interleaved timed calls per setting (default 5; 1 with --quick)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    q = args.quick
    defaults = {"size": (112, 32), "clip_len": (16, 4), "width": (0.5, 0.25), "frame_size": (112, 32)}
    defaults |= {"masks_per_side": (6, 3), "repeats": (5, 1)}
    for key, (full, quick) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, quick if q else full)
    for key in ("size", "clip_len", "frame_size", "masks_per_side", "repeats", "threads", "num_classes"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1")
    if not 0 < args.patch_area < 1 or not args.width > 0:
        p.error("--patch-area must be in (0, 1) and --width > 0")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    detectors = [(args.backbone, args.width)] + ([("resnet50", 1.0)] if args.paper else [])
    clip_kw = {"size": args.size, "clip_len": args.clip_len}
    models = {"tiny3d": clip_kw} | ({} if args.skip_mars else {"mars": clip_kw | (QUICK_MARS if args.quick else {})})
    settings = {
        "device": "cpu",
        "threads": args.threads,
        "batch": 1,
        "repeats": args.repeats,
        "statistic": "median of interleaved repeats, one warm-up call each (none for double_masking_worst)",
        "quick": args.quick,
        "clip_models": models,
        "detectors": [{"backbone": b, "width": w} for b, w in detectors],
        "frame": {
            "model": args.frame_model,
            "size": args.frame_size,
            "num_classes": args.num_classes,
            "patch_area": args.patch_area,
            "masks_per_side": args.masks_per_side,
        },
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    console = Console(width=max(Console().width, 120))
    clips: list[dict[str, Any]] = []
    for name, kw in models.items():
        with console.status(f"{name}…"):
            clips += bench_clip_model(name, kw, detectors, args.repeats)
    console.print(clip_table(clips))
    with console.status("frames: PatchZero vs double masking…"):
        frames = bench_frames(
            args.frame_model, args.frame_size, args.num_classes, args.patch_area, args.masks_per_side,
            args.backbone, args.width, args.repeats,
        )
    console.print(frame_table(frames))
    result = {"settings": settings, "clips": clips, "frames": frames}
    write_json(args.json, result)
    console.print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
