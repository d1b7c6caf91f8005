"""Pipeline recipes: the TOML files in ``pipelines/`` that every command takes.

Parsing is strict: an unknown key or a value of the wrong type raises :class:`ConfigError`
naming the field (``attack.iters: expected int, got str``).
"""

from __future__ import annotations

import dataclasses
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from .errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass
class ModelSection:
    name: str = "tiny3d"
    weights: str | None = None
    num_classes: int | None = None
    input_size: int | None = None  # frame detectors: frames are resized to this (Faster R-CNN min/max size)


@dataclass
class DefenseSection:
    weights: str | None = None
    backbone: str = "mobilenet_v3"
    width: float = 1.0
    input_size: int | None = None
    threshold: float = 0.5
    dilate: int = 3
    temporal: Literal["mean", "none", "ema"] = "mean"
    ema: float = 0.5


@dataclass
class PipelineSection:
    clip_len: int | None = None
    stride: int | None = None
    batch: int = 4
    queue: int = 8
    topk: int = 5
    min_score: float = 0.5  # frame detectors: boxes reported from this score up


@dataclass
class DataSection:
    kind: Literal["ucf101", "synthmotion"] = "synthmotion"
    root: str = "data/synthmotion"
    split: Literal["train", "test"] = "test"
    fold: int = 1
    subset: int | None = None
    size: int = 112
    clip_len: int = 16
    stride: int = 1
    seed: int = 0
    videos_per_class: int = 12
    frames: int = 32
    rotation: list[float] = field(default_factory=lambda: [5.0, 10.0])  # SynthMotion rotate classes, degrees/frame
    workers: int = 0


@dataclass
class AttackSection:
    methods: list[str] = field(default_factory=lambda: ["pgd", "apgd"])
    modes: list[str] = field(default_factory=lambda: ["do", "bpda"])
    areas: list[float] = field(default_factory=lambda: [0.05, 0.10])
    eps: float = 1.0
    step: float = 0.2
    iters: int = 20
    restarts: int = 1
    random_init: bool = True
    targeted: bool = False
    moving: bool = False
    batch: int = 8
    seed: int = 0


@dataclass
class EvaluateSection:
    defenses: list[str] = field(default_factory=lambda: ["none", "gt", "jpeg", "h264", "patchzero"])
    jpeg_quality: int = 75
    h264_crf: int = 28
    max_videos: int | None = None
    output: str = "runs/evaluate"


@dataclass
class ClassifierTrainSection:
    """The benchmark's downstream classifier (PatchZero itself never retrains the protected model)."""

    steps: int = 1500
    batch: int = 16
    lr: float = 3e-3
    shift: int = 4
    symmetries: list[str] = field(default_factory=list)  # "hflip" / "reverse", with the labels they swap
    vortex: list[float] = field(default_factory=list)  # tiny3d: scales (px) of its rotation-sense features


@dataclass
class FrameDetectorTrainSection:
    """The benchmark's per-frame object detector (Faster R-CNN from scratch on SynthMotion's boxes)."""

    steps: int = 1000
    batch: int = 8
    lr: float = 1e-3
    eval_every: int | None = None  # default: train.eval_every (which PatchZero's stage 2 uses too)
    checkpoint_every: int | None = None  # default: train.checkpoint_every


@dataclass
class TrainSection:
    output: str = "runs/train"
    steps: int = 1000
    batch: int = 36
    lr: float = 1e-4
    aux_weight: float = 0.4
    checkpoint_every: int = 100
    eval_every: int = 100
    cache: str = "runs/attack-cache"
    attacked_per_video: int = 1
    cache_videos: int | None = None
    area_range: list[float] = field(default_factory=lambda: [0.02, 0.12])
    patience: int = 3
    eval_videos: int = 16
    seed: int = 0
    classifier: ClassifierTrainSection = field(default_factory=ClassifierTrainSection)
    frame_detector: FrameDetectorTrainSection = field(default_factory=FrameDetectorTrainSection)


@dataclass
class Recipe:
    name: str = "custom"
    description: str = ""
    model: ModelSection = field(default_factory=ModelSection)
    defense: DefenseSection = field(default_factory=DefenseSection)
    pipeline: PipelineSection = field(default_factory=PipelineSection)
    data: DataSection = field(default_factory=DataSection)
    attack: AttackSection = field(default_factory=AttackSection)
    evaluate: EvaluateSection = field(default_factory=EvaluateSection)
    train: TrainSection = field(default_factory=TrainSection)
    path: Path | None = None


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except ConfigError as err:
                errors.append(err)
        raise errors[0]
    if origin is Literal:
        if value not in get_args(tp):
            allowed = ", ".join(repr(a) for a in get_args(tp))
            raise ConfigError(f"{where}: expected one of {allowed}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        (item_tp,) = get_args(tp)
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {type(value).__name__}")
        return _build(tp, value, where)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool):
        if isinstance(value, bool) and tp is not bool or not isinstance(value, tp):
            raise ConfigError(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {_type_name(tp)}")


def _build(cls: type, table: dict[str, Any], where: str = "") -> Any:
    hints = get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls) if f.name != "path"}
    kwargs = {}
    for key, value in table.items():
        name = f"{where}.{key}" if where else key
        if key not in known:
            raise ConfigError(f"{name}: unknown key (expected one of: {', '.join(sorted(known))})")
        kwargs[key] = _coerce(value, hints[key], name)
    return cls(**kwargs)


def parse_recipe(table: dict[str, Any], path: Path | None = None) -> Recipe:
    """Build a :class:`Recipe` from a parsed TOML table, strictly."""
    recipe = _build(Recipe, table)
    recipe.path = path
    return recipe


def find_recipe(name_or_path: str | Path) -> Path:
    """A path as given, or the name of a recipe shipped in ``pipelines/`` (``synth-clip``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = pipelines_dir() / f"{name_or_path}.toml"
    if shipped.is_file():
        return shipped
    raise ConfigError(f"recipe not found: {name_or_path} (neither a file nor one of {', '.join(list_recipes())})")


def load_recipe(name_or_path: str | Path) -> Recipe:
    path = find_recipe(name_or_path)
    try:
        table = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid TOML ({err})") from None
    try:
        return parse_recipe(table, path)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def pipelines_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "pipelines"


def list_recipes() -> list[str]:
    return sorted(p.stem for p in pipelines_dir().glob("*.toml"))


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """Plain dict of every setting (for JSON reports next to results)."""
    out = dataclasses.asdict(recipe)
    out["path"] = str(recipe.path) if recipe.path else None
    return out


__all__ = [
    "Recipe",
    "ModelSection",
    "DefenseSection",
    "PipelineSection",
    "DataSection",
    "AttackSection",
    "EvaluateSection",
    "TrainSection",
    "ClassifierTrainSection",
    "FrameDetectorTrainSection",
    "load_recipe",
    "parse_recipe",
    "find_recipe",
    "list_recipes",
    "recipe_to_dict",
]
