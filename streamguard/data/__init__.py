"""Video data: UCF101 on disk (:mod:`.ucf101`), clips with object boxes (:mod:`.boxes`) and the
generated SynthMotion benchmark (:mod:`.synthmotion`), plus the glue from a recipe's ``[data]`` table."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..errors import ConfigError
from ..recipes import DataSection
from .boxes import BoxClips, crop_resize_boxes, load_boxes
from .footage import FootageClips, build_footage, find_sources  # noqa: F401 (re-exported)
from .synthmotion import (
    BACKGROUNDS,
    SYNTH_CLASSES,
    SYNTH_SYMMETRIES,
    make_synthmotion,
    render_video,
    write_video,
)
from .ucf101 import (
    UCF101_MEAN,
    UCF101_SYMMETRIES,
    UCF101Clips,
    center_crop_resize,
    clip_indices,
    make_loader,
    read_class_index,
    read_split,
)


def symmetry_labels(kind: str, name: str, classes: Sequence[str]) -> list[int]:
    """``perm[i]``: the label of class ``i`` after symmetry ``name`` (``"hflip"`` or ``"reverse"``) of
    data set ``kind``; raises :class:`ConfigError` for a symmetry that kind has not got."""
    table = {"synthmotion": SYNTH_SYMMETRIES, "ucf101": UCF101_SYMMETRIES}.get(kind, {})
    if name not in table:
        raise ConfigError(f"symmetry {name!r} is not label-safe for {kind} data (it has: {', '.join(table) or 'none'})")
    swaps = {**table[name], **{b: a for a, b in table[name].items()}}
    index = {c: i for i, c in enumerate(classes)}
    missing = sorted({swaps[c] for c in classes if c in swaps} - index.keys())
    if missing:
        raise ConfigError(f"symmetry {name!r} maps classes onto {', '.join(missing)}, which the data set has not got")
    return [index[swaps.get(c, c)] for c in classes]


def recipe_clips(d: DataSection, split: str, *, clip_len: int | None = None, subset: int | None = None) -> UCF101Clips:
    """The clips a recipe's ``[data]`` table names (centered starts).

    SynthMotion is generated first when its tree is not complete (``synthmotion.json``, written
    last, is missing), so an interrupted generation is redone rather than read half-written.
    """
    root = Path(d.root)
    if d.kind == "synthmotion" and not (root / "synthmotion.json").is_file():
        make_synthmotion(root, d.videos_per_class, d.seed, size=d.size, frames=d.frames, workers=max(1, d.workers),
                         rotation=tuple(d.rotation))  # fmt: skip
    return UCF101Clips(
        root, split=split, fold=d.fold, clip_len=clip_len or d.clip_len, size=d.size, stride=d.stride,
        start="center", subset=subset, seed=d.seed,
    )  # fmt: skip


__all__ = [
    "SYNTH_CLASSES", "SYNTH_SYMMETRIES", "symmetry_labels", "BACKGROUNDS", "UCF101Clips", "UCF101_MEAN", "BoxClips",
    "crop_resize_boxes", "make_loader", "load_boxes", "make_synthmotion", "recipe_clips", "render_video",
    "write_video", "read_class_index", "read_split", "clip_indices", "center_crop_resize",
]  # fmt: skip
