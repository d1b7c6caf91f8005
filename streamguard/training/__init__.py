"""Training: the benchmark's downstream models and the PatchZero detector's two stages.

* :mod:`.core`: the resumable, bit-exact step loop every trainer shares.
* :mod:`.augment`: clip augmentations and label-changing symmetries.
* :mod:`.downstream`: :func:`train_classifier` (the clip classifier) and :func:`train_frame_detector`
  (the per-frame Faster R-CNN) – for the benchmark only: PatchZero never retrains the model it protects.
* :mod:`.attack_cache`: :func:`build_attack_cache`, stage 1's downstream-only attacks on disk.
* :mod:`.stages`: :func:`train_detector_stage1` (cached DO attacks mixed 1:1 with benign clips) and
  :func:`train_detector_stage2` (online BPDA attacks against the detector being trained).
* :mod:`.race`: stage 2's attacks in plain PyTorch and its pool of warm-started patches.
"""

from .attack_cache import AttackCache, build_attack_cache
from .augment import augment_clips, mirror_clips
from .core import InMemory, TrainResult, step_indices
from .downstream import (
    FrameTargets,
    frame_ap,
    frame_detector_kwargs,
    synth_train_recipe,
    train_classifier,
    train_frame_detector,
)
from .stages import train_detector_stage1, train_detector_stage2

__all__ = [
    "AttackCache", "build_attack_cache", "augment_clips", "mirror_clips", "InMemory", "TrainResult", "step_indices",
    "FrameTargets", "frame_ap", "frame_detector_kwargs", "synth_train_recipe", "train_classifier",
    "train_frame_detector", "train_detector_stage1", "train_detector_stage2",
]  # fmt: skip
