"""``train``: the benchmark models and the PatchZero detector's two stages."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ..errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    from ..recipes import Recipe


from .common import App, app, out, progress_bar, summary_table

# ---------------------------------------------------------------- train

train_app = App(name="train", help="Train the benchmark classifier or frame detector, and the PatchZero detector (resumable; "
               "runs under `torchrun --nproc_per_node N -m streamguard train ...` too, the batch split across processes).",
               no_args_is_help=True)  # fmt: skip
app.add_typer(train_app, name="train")

TrainRecipeArg = Annotated[str, typer.Argument(help="Recipe name (pipelines/NAME.toml) or TOML path.")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue exactly from the run's last checkpoint.")]
StepsOpt = Annotated[int | None, typer.Option("--steps", min=0, help="Override train.steps.")]
TrainOutputOpt = Annotated[Path | None, typer.Option("--output", "-o", help="Override train.output (the run directory).")]
TrainDeviceOpt = Annotated[str | None, typer.Option("--device", help="torch device (default: cuda if available, else cpu).")]
_METRIC_LABELS = {"loss": "loss", "acc": "acc", "top1": "top-1", "f1": "pixel F1", "robust_acc": "robust acc", "fooled": "fooled",
                  "ap": "AP", "ap50": "AP50"}


def _train_recipe(name: str, steps: int | None, output: Path | None) -> Recipe:
    from ..recipes import load_recipe

    rec = load_recipe(name)
    if steps is not None:
        rec.train.steps = steps
    if output is not None:
        rec.train.output = str(output)
    return rec


def _main_rank() -> bool:
    """Under torchrun only rank 0 shows progress and prints results."""
    return os.environ.get("RANK", "0") == "0"


@contextmanager
def _train_progress(description: str) -> Iterator[Callable[[int, int, dict[str, float]], None]]:
    """A progress bar fed by the training loops' ``on_progress(step, total, metrics)``."""
    if not _main_rank():
        yield lambda step, total, metrics: None
        return
    with progress_bar(description, None, "metrics", remaining=True) as update:
        if update is None:
            yield lambda step, total, metrics: None
            return

        def show(step: int, total: int, metrics: dict[str, float]) -> None:
            shown = "  ".join(f"{label} {metrics[k]:.3f}" for k, label in _METRIC_LABELS.items() if k in metrics)
            update(completed=step, total=total, metrics=shown)

        yield show


def _print_result(title: str, result: Any, *, race: bool = False) -> None:
    """The run's summary table; for a stage-2 ``race``, also which evaluation was kept."""
    if not _main_rank():
        return
    rows = {"checkpoint": result.path, "sha256": result.sha256, "steps": result.steps}
    if getattr(result, "stopped_early", False):
        rows["stopped"] = "early: no new best for train.patience evaluations"
    if race:
        best = result.best_step
        rows["kept"] = f"step {best}, the best inside the guards" if best is not None else "the last weights: no evaluation was inside the guards"
    out.print(summary_table(title, rows | {_METRIC_LABELS.get(k, k): v for k, v in result.metrics.items()}))


def _command_line() -> str:
    return " ".join(["streamguard", *sys.argv[1:]])


@train_app.command("classifier")
def train_classifier_command(
    recipe: TrainRecipeArg, resume: ResumeOpt = False, steps: StepsOpt = None, output: TrainOutputOpt = None,
    synth_train_videos: Annotated[int | None, typer.Option("--synth-train-videos", min=2,
        help="Train on a separate SynthMotion tree with this many videos per class.")] = None,
    device: TrainDeviceOpt = None,
) -> None:  # fmt: skip
    """Train the recipe's downstream classifier (benchmark only; PatchZero never retrains it)."""
    from ..training import train_classifier

    rec = _train_recipe(recipe, None, output)
    if steps is not None:
        rec.train.classifier.steps = steps
    with _train_progress(f"train classifier {rec.model.name}") as on_progress:
        result = train_classifier(rec, on_progress=on_progress, resume=resume, synth_train_videos=synth_train_videos,
                                  command=_command_line(), device=device)  # fmt: skip
    _print_result("streamguard train classifier", result)


@train_app.command("frame-detector")
def train_frame_detector_command(
    recipe: TrainRecipeArg, resume: ResumeOpt = False, steps: StepsOpt = None, output: TrainOutputOpt = None,
    device: TrainDeviceOpt = None,
) -> None:  # fmt: skip
    """Train the recipe's per-frame object detector (Faster R-CNN) on the benchmark's boxes."""
    from ..training import train_frame_detector

    rec = _train_recipe(recipe, None, output)
    if steps is not None:
        rec.train.frame_detector.steps = steps
    with _train_progress(f"train frame detector {rec.model.name}") as on_progress:
        result = train_frame_detector(rec, on_progress=on_progress, resume=resume, command=_command_line(), device=device)
    _print_result("streamguard train frame-detector", result)


@train_app.command("cache")
def train_cache_command(recipe: TrainRecipeArg, device: TrainDeviceOpt = None) -> None:
    """Build (or complete) the stage-1 cache of DO-attacked training clips."""
    from ..training import build_attack_cache

    rec = _train_recipe(recipe, None, None)
    with _train_progress("attack cache") as on_progress:
        cache = build_attack_cache(rec, on_progress=on_progress, device=device)
    if _main_rank():
        out.print(f"attack cache: {cache}")


@train_app.command("detector")
def train_detector_command(
    recipe: TrainRecipeArg,
    stage: Annotated[int, typer.Option("--stage", min=1, max=2, help="1: cached DO attacks; 2: online BPDA attacks.")] = 1,
    init: Annotated[str | None, typer.Option("--init",
        help="Stage 2's start: a checkpoint or shipped name (default: the run's detector-stage1.pt).")] = None,
    model: Annotated[str | None, typer.Option("--model", help="Downstream model to attack (overrides model.weights).")] = None,
    resume: ResumeOpt = False,
    steps: StepsOpt = None,
    output: TrainOutputOpt = None,
    device: TrainDeviceOpt = None,
) -> None:
    """Train the PatchZero detector; stage 1 first completes the attack cache."""
    from ..checkpoints import get_weights
    from ..training import (
        build_attack_cache,
        train_detector_stage1,
        train_detector_stage2,
    )

    rec = _train_recipe(recipe, steps, output)
    if model is not None:
        rec.model.weights = model
    if stage == 1:
        with _train_progress("attack cache") as on_progress:
            build_attack_cache(rec, on_progress=on_progress, device=device)
        with _train_progress("train detector, stage 1") as on_progress:
            result = train_detector_stage1(rec, on_progress=on_progress, resume=resume, command=_command_line(), device=device)
    else:
        init = init or str(Path(rec.train.output) / "detector-stage1.pt")
        try:
            get_weights(init)
        except CheckpointError:
            raise ConfigError(f"--init: {init} not found (train stage 1 first, or pass a checkpoint or shipped name)") from None
        with _train_progress("train detector, stage 2") as on_progress:
            result = train_detector_stage2(rec, init, on_progress=on_progress, resume=resume, command=_command_line(),
                                           device=device)  # fmt: skip
    _print_result(f"streamguard train detector --stage {stage}", result, race=stage == 2)


