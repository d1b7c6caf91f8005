"""The README's first command: a real adaptive patch attack on a real video, removed by PatchZero.

1. render a short SynthMotion benchmark video (seeded; ``clips`` motions one after the other),
2. patch it with Masked PGD against the shipped clip classifier: ``mode="do"`` attacks the classifier
   alone (the attacker ignores the defense), ``mode="bpda"`` attacks it *behind* the shipped PatchZero
   detector (the adaptive attacker differentiates through the defense),
3. sanitize the attacked video with PatchZero,
4. report clean / attacked / defended predictions per clip and the detector's pixel scores, and write
   the input, attacked and sanitized videos, a side-by-side overlay video and a PNG strip.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import Tensor, nn

from .attacks import MaskedAttack, attack_video
from .checkpoints import DEFAULT_CLASSIFIER, DEFAULT_DETECTOR
from .data import SYNTH_CLASSES, render_video
from .metrics import PixelCounts
from .models import load_model
from .patchzero import build_defense
from .pipeline import overlay
from .sinks import VideoSink


@dataclass
class DemoResult:
    mode: str
    video_class: str
    truth: list[str]
    seed: int
    area: float
    clean: list[str]
    attacked: list[str]
    defended: list[str]
    pixel_precision: float
    pixel_recall: float
    pixel_f1: float
    masked_fraction: float
    files: dict[str, str]

    def restored(self) -> int:
        """Clips whose defended prediction equals the clean one."""
        return sum(c == d for c, d in zip(self.clean, self.defended))


def _write_video(path: Path, frames: np.ndarray, fps: float = 12.0) -> None:
    """``frames``: (F, H, W, 3) uint8."""
    with VideoSink(path, frames.shape[2], frames.shape[1], fps, crf=0) as sink:
        for frame in frames:
            sink.write(frame)


def _strip(rows: list[np.ndarray], path: Path, scale: int) -> None:
    """PNG of the given overlay panels stacked vertically, upscaled for viewing."""
    image = np.concatenate(rows, axis=0)
    image = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
    cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))


def _to_uint8(x: Tensor | np.ndarray) -> np.ndarray:
    return (np.asarray(x) * 255 + 0.5).clip(0, 255).astype(np.uint8)


def run_demo(
    out: str | Path = "demo",
    *,
    seed: int = 0,
    video_class: int = 1,
    area: float = 0.10,
    iters: int = 20,
    mode: str = "bpda",
    clips: int = 2,
    classifier: str = DEFAULT_CLASSIFIER,
    detector: str = DEFAULT_DETECTOR,
    device: str = "cpu",
    on_progress: Callable[[int, int], None] | None = None,
) -> DemoResult:
    """Run the demo and write its files to ``out``; see the module docstring."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model: nn.Module = load_model(classifier).to(device)
    defense = build_defense(weights=detector, mean=model.spec.mean).to(device)
    size, t = model.spec.input_size[0], model.spec.clip_len
    classes = [(video_class + k) % len(SYNTH_CLASSES) for k in range(clips)]
    video = np.concatenate([render_video(c, seed + k, size=size, frames=t)[0] for k, c in enumerate(classes)])

    attack = MaskedAttack(model, "pgd", mode, defense=defense, eps=1.0, step=0.2, iters=iters, seed=seed, device=device)
    result = attack_video(video, attack, area=area, seed=seed, defense=defense, on_progress=on_progress)
    adv = torch.from_numpy(result.frames).permute(3, 0, 1, 2)[None].to(device)  # (1, 3, F, H, W)
    defense.reset()
    clean_chunks, mask_chunks = [], []
    for start in range(0, adv.shape[2], t):
        cleaned, mask = defense.sanitize(adv[:, :, start : start + t])
        clean_chunks.append(cleaned)
        mask_chunks.append(mask)
    sanitized = torch.cat(clean_chunks, 2)[0].permute(1, 2, 3, 0).cpu().numpy()  # (F, H, W, 3)
    detected = torch.cat(mask_chunks, 2)[0, 0].cpu().numpy() > 0.5  # (F, H, W)
    counts = PixelCounts.from_masks(torch.from_numpy(detected), torch.from_numpy(result.mask > 0.5))

    attacked_u8, sanitized_u8 = _to_uint8(result.frames), _to_uint8(sanitized)
    panels = np.stack([overlay(a, m, s) for a, m, s in zip(attacked_u8, detected, sanitized_u8)])
    files = {
        "input": out / "input.mp4",
        "attacked": out / f"{mode}-attacked.mp4",
        "sanitized": out / f"{mode}-sanitized.mp4",
        "overlay": out / f"{mode}-overlay.mp4",
        "strip": out / f"{mode}-strip.png",
        "result": out / f"{mode}-result.json",
    }
    _write_video(files["input"], video)
    _write_video(files["attacked"], attacked_u8)
    _write_video(files["sanitized"], sanitized_u8)
    _write_video(files["overlay"], panels)
    _strip([panels[i] for i in np.linspace(0, len(panels) - 1, 4).astype(int)], files["strip"], scale=max(1, 224 // size))

    names = model.spec.class_names or tuple(SYNTH_CLASSES)
    demo = DemoResult(
        mode=mode,
        video_class=" then ".join(SYNTH_CLASSES[c] for c in classes),
        truth=[SYNTH_CLASSES[c] for c in classes],
        seed=seed,
        area=area,
        clean=[names[i] for i in result.clean],
        attacked=[names[i] for i in result.attacked],
        defended=[names[i] for i in (result.defended or [])],
        pixel_precision=counts.precision,
        pixel_recall=counts.recall,
        pixel_f1=counts.f1,
        masked_fraction=float(detected.mean()),
        files={k: str(v) for k, v in files.items()},
    )
    record = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in asdict(demo).items()}
    files["result"].write_text(json.dumps(record, indent=2, allow_nan=False))  # undefined scores are null
    return demo
