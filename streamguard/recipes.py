"""Pipeline recipes: the TOML files in ``pipelines/`` that every command takes.

Parsing is strict: an unknown key or a value of the wrong type raises :class:`ConfigError`
naming the field (``attack.iters: expected int, got str``).

A recipe can build on another with a top-level ``extends = "synth-clip"`` (a shipped recipe's
name, or a path relative to the extending file): the parent's table is deep-merged under the
child's (the child wins; tables merge key by key, recursively; lists and other values are
replaced whole). Chains are allowed; a cycle is a :class:`ConfigError`. ``name`` and
``description`` are never inherited: an extending recipe without a ``name`` takes its file's stem.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
import types
from dataclasses import dataclass, field
from importlib.resources import files
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
    input_size: int | None = None  # working resolution; default: the weights' (the scale they were trained at)
    refine: bool = False  # PSPNet with a stride-4 refinement decoder (False: the paper's plain PSPNet)
    threshold: float = 0.5
    dilate: int = 3
    temporal: Literal["mean", "none", "ema", "median"] = "mean"
    ema: float = 0.5
    complete: Literal["none", "hull", "box", "square", "cover"] | None = None  # shape completion; default: the weights'
    patch_area: float | None = None  # "square", "cover": the threat model's largest patch, a fraction of the frame (default 0.1)
    cover_scale: float | None = None  # "cover": each region's squares at most this times its longer side (default 0: the largest patch)
    patch_areas: list[float] | None = None  # "cover": the threat model's smaller patches; a region is covered for the
    # smallest that holds its longer side (default none: every region for the largest, patch_area)
    min_core: int | None = None  # regions with fewer pixels over the threshold are dropped as specks (default 0: none)


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
    bpda_variants: list[str] = field(default_factory=list)  # more adaptive attacks on PatchZero; worst case reported
    transfer_detector: str | None = None  # the detector the "transfer" variant attacks through


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
class PatchesTrainSection:
    """Stage 1's patch families beyond the cached DO attacks (issue #15): procedural textures on
    SynthMotion and real-footage backgrounds (:mod:`streamguard.patches`, :mod:`streamguard.data.footage`)."""

    textures: list[str] = field(default_factory=list)  # streamguard.patches.TEXTURES to train on; [] = DO only
    held_out: list[str] = field(default_factory=list)  # families kept out of training, reported apart
    weights: dict[str, float] = field(default_factory=dict)  # how often a family is drawn, relative to 1 (the default)
    procedural: float = 0.5  # fraction of the attacked clips of a step that get a procedural patch
    footage: str | None = None  # built by `streamguard data footage`; benign backgrounds beside SynthMotion
    footage_fraction: float = 0.5  # fraction of benign and procedural clips drawn from the footage
    graphics: float = 0.0  # fraction drawn from synthetic full-frame graphics (streamguard.data.graphics)
    area_range: list[float] = field(default_factory=lambda: [0.01, 0.15])
    moving: float = 0.25
    upscale: float = 0.3
    codec: float = 0.3

    def __post_init__(self) -> None:
        if unknown := sorted(set(self.weights) - set(self.textures)):
            raise ConfigError(f"train.patches.weights: {', '.join(unknown)} not in train.patches.textures")


@dataclass
class RaceTrainSection:
    """Stage 2's race for clip classifiers (issue #16): a pool of warm-started BPDA patches, each
    continued ``iters`` iterations when drawn, mixed with DO, procedural and benign clips."""

    pool: int = 64  # warm-started patches (one training clip, place, size and content each)
    draw: int = 4  # pool patches continued and trained on per step
    iters: int = 4  # BPDA iterations per draw
    refresh: float = 0.15  # pool entries replaced by fresh ones (new place, random content) per step, on average:
    # an entry then lives about pool / refresh steps, drawn draw / refresh times (64 / 0.15 x 4 / 64: ~27 draws, ~107 iterations)
    method: Literal["pgd", "apgd"] = "pgd"  # apgd: each entry keeps the step its attack has decayed to across draws,
    # halved at a draw's end when the loss stalled (iters a multiple of race.CHECKPOINT, 5, so every draw checks).
    # Measured: against a moving detector nearly every draw stalls, so the pool freezes (docs/results.md, a race against AutoPGD)
    do: int = 0  # cached DO clips per step (the stage-1 cache), so the DO rows do not regress
    procedural: int = 1  # procedural patches per step ([train.patches] textures)
    benign: int = 2
    task_weight: float = 0.0  # weight of the downstream loss on the sanitized attacked clips (through the soft mask)
    edge_weight: float = 0.0  # extra BCE weight on the band of edge_px pixels either side of every patch border
    edge_px: int = 2
    hard: int = 0  # clean footage clips a step mined from those the detector comes nearest to masking (hard negatives)
    hard_task: int = 0  # clean clips of the task's own training videos a step, mined the same way
    uncompleted: int = 0  # pool slots (the first ones) whose attacks go through another view of the defense:
    uncompleted_view: Literal["uncompleted", "spread"] = "uncompleted"  # ... without shape completion, or with the soft
    # mask spread by the largest patch's side less one (the evaluation's variants of these names)
    uncompleted_iters: int = 0  # ... continued this many iterations a draw (0: iters)
    uncompleted_method: Literal["", "pgd", "apgd"] = ""  # ... by this method ("": method); apgd under a pgd race restarts
    # from the stored content at each draw (a warm start: docs/results.md, races against the completion-blind attacker)
    step_halflife: int = 0  # pgd: a pool patch's step halves every this many iterations it has accumulated (0: fixed)
    average: float = 0.0  # if set, the decay of a moving average of the detector's weights, which is what is scored and kept
    eval_iters: int = 20  # the held-out race: a fresh BPDA attack of this many iterations on train.eval_videos clips
    eval_method: Literal["pgd", "apgd"] = "pgd"  # ... and its method
    eval_uncompleted: bool = False  # ... through uncompleted_view, scored through the real defense
    max_benign_fpr: float = 1.0  # a checkpoint is kept as the best only if it masks at most this fraction of the pixels
    # of the held-out benign clips and of the clean validation clips


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
    patches: PatchesTrainSection = field(default_factory=PatchesTrainSection)
    race: RaceTrainSection = field(default_factory=RaceTrainSection)


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
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {type(value).__name__}")
        key_tp, value_tp = get_args(tp)
        return {_coerce(k, key_tp, where): _coerce(v, value_tp, f"{where}.{k}") for k, v in value.items()}
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


def _read_table(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid TOML ({err})") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read ({err.strerror or err})") from None


def _parent_path(ref: Any, child: Path) -> Path:
    """``extends = ref`` of recipe ``child``: a path relative to ``child``'s folder, else a shipped name."""
    if not isinstance(ref, str) or not ref:
        raise ConfigError(f"{child}: extends: expected a recipe name or path, got {type(ref).__name__} {ref!r}")
    relative = child.parent / ref
    if relative.is_file():
        return relative
    shipped = pipelines_dir() / f"{ref}.toml"
    if "/" not in ref and "\\" not in ref and shipped.is_file():
        return shipped
    raise ConfigError(
        f"{child}: extends: unknown recipe {ref!r} (neither a file next to it nor one of {', '.join(list_recipes())})"
    )


def merge_tables(parent: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """``child`` over ``parent``: tables merged key by key (recursively), anything else replaced."""
    out = copy.deepcopy(parent)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_tables(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _resolve_table(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The table of recipe ``path`` with its ``extends`` chain merged in, each file checked on its own."""
    key = path.resolve()
    if key in chain:
        cycle = " -> ".join(str(p) for p in (*chain[chain.index(key):], key))
        raise ConfigError(f"recipes extend each other in a cycle: {cycle}")
    table = _read_table(path)
    ref = table.pop("extends", None)
    try:  # strict per file, so an error names the file that has it
        parse_recipe(table, path)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    if ref is None:
        return table
    parent = _resolve_table(_parent_path(ref, path), (*chain, key))
    parent.pop("description", None)
    parent["name"] = path.stem
    return merge_tables(parent, table)


def load_recipe(name_or_path: str | Path) -> Recipe:
    """Parse a recipe (a path, or a shipped recipe's name), strictly, with its ``extends`` chain resolved."""
    path = find_recipe(name_or_path)
    table = _resolve_table(path)
    try:
        return parse_recipe(table, path)
    except ConfigError as err:  # pragma: no cover - every file of the chain parsed on its own
        raise ConfigError(f"{path}: {err}") from None


def package_dir(package: str, folder: str) -> Path:
    """The folder of a data package shipped with StreamGuard (``streamguard.pipelines``, ``streamguard.weights``).

    Found through :mod:`importlib.resources`, so an installed wheel reads its own copy (the
    packages are the repository's top-level ``pipelines/`` and ``weights/``, mapped in
    ``pyproject.toml``). The source tree's top-level ``folder`` is the fallback when
    ``streamguard`` is imported from a checkout that was never installed, or whose editable
    install predates these packages.
    """
    try:
        found = files(package)
    except ModuleNotFoundError:
        found = None
    if isinstance(found, Path) and found.is_dir():
        return found
    return Path(__file__).resolve().parent.parent / folder


def pipelines_dir() -> Path:
    """The shipped recipes' folder: the installed ``streamguard.pipelines`` package (``pipelines/``)."""
    return package_dir("streamguard.pipelines", "pipelines")


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
    "PatchesTrainSection",
    "RaceTrainSection",
    "load_recipe",
    "parse_recipe",
    "find_recipe",
    "list_recipes",
    "merge_tables",
    "pipelines_dir",
    "recipe_to_dict",
]
