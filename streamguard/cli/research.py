"""``models``, ``evaluate``, ``attack`` and ``demo``: the research side."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from ..errors import ConfigError
from .common import (
    DetectorOpt,
    DeviceOpt,
    ImgszOpt,
    ModelOpt,
    app,
    count_progress,
    defense_option,
    device_option,
    model_option,
    out,
    recipe_option,
    summary_table,
)


@app.command("models")
def models_command() -> None:
    """List the downstream models: task, input (C,T,H,W), normalization in [0,1] units, parameters."""
    from ..models import describe_model, list_models

    table = Table(title="streamguard models", title_justify="left")
    for column in ("name", "task", "input (C,T,H,W)", "mean", "std"):
        table.add_column(column)
    table.add_column("params", justify="right")
    for name in list_models():
        spec, params = describe_model(name)
        table.add_row(
            name, spec.task, "x".join(map(str, (3, spec.clip_len, *spec.input_size))),
            ", ".join(f"{v:.4g}" for v in spec.mean), ", ".join(f"{v:.4g}" for v in spec.std), f"{params / 1e6:.2f} M",
        )
    out.print(table)




# ---------------------------------------------------------------- evaluate


@app.command("evaluate")
def evaluate_command(
    recipe: Annotated[str, typer.Argument(help="Recipe name (pipelines/NAME.toml) or TOML path.")],
    max_videos: Annotated[int | None, typer.Option("--max-videos", min=1, help="Only the first N videos of the seeded order.")] = None,
    output: Annotated[Path | None, typer.Option("--output", help="Results folder (default: the recipe's evaluate.output).")] = None,
    no_resume: Annotated[bool, typer.Option("--no-resume", help="Start over instead of skipping the samples already in the output.")] = False,
    markdown: Annotated[Path | None, typer.Option("--markdown", help="Also write the tables as markdown (for the README).")] = None,
    detector: Annotated[str | None, typer.Option("--detector", help="PatchZero checkpoint to evaluate (overrides defense.weights).")] = None,
    defenses: Annotated[str | None, typer.Option("--defenses", help="Comma-separated defenses to run instead of evaluate.defenses (e.g. patchzero).")] = None,
    model: Annotated[str | None, typer.Option("--model", help="Downstream model checkpoint (overrides model.weights).")] = None,
    device: DeviceOpt = "cpu",
    shard: Annotated[str | None, typer.Option("--shard", metavar="K/N",
        help="Run only shard K of N (every N-th chunk of attack.batch videos from chunk K, so seeds and results "
             "match a single run) into OUTPUT/shard-K-of-N/; join the shards with `streamguard merge OUTPUT`.")] = None,
) -> None:
    """Every defense under every attack of a recipe: accuracy (Table 4) or, for a per-frame detector, box AP
    (Table 3), and PatchZero's pixel metrics (Table 5a)."""
    from dataclasses import replace

    from ..evaluation import evaluate
    from ..evaluation.grid import parse_shard
    from ..recipes import load_recipe

    part = parse_shard(shard) if shard is not None else None

    rec = load_recipe(recipe)
    settings = replace(rec.evaluate, max_videos=max_videos or rec.evaluate.max_videos, output=str(output or rec.evaluate.output))
    if defenses is not None:
        settings.defenses = [d.strip() for d in defenses.split(",") if d.strip()]
    rec = replace(rec, evaluate=settings)
    if detector is not None:
        rec.defense.weights = detector
    if model is not None:
        rec.model.weights = model
    label = f"evaluate {rec.name}" + (f" shard {part[0]}/{part[1]}" if part else "")
    with count_progress(label, 0) as on_progress:
        report = evaluate(rec, on_progress=on_progress, resume=not no_resume, device=device_option(device), shard=part)
    _print_tables(report, markdown)


def _print_tables(report: Any, markdown: Path | None) -> None:
    from ..evaluation import (
        is_frame_report,
        save_markdown,
        table3,
        table4,
        table5a,
        table5a_rows,
    )

    out.print(table3(report) if is_frame_report(report) else table4(report))
    if table5a_rows(report)[1]:
        out.print(table5a(report))
    if markdown is not None:
        out.print(f"markdown: {save_markdown(report, markdown)}")
    out.print(f"results: {report.path} ({len(report.samples)} samples)")


@app.command("merge")
def merge_command(
    shards: Annotated[list[Path], typer.Argument(help="Shard folders (shard-K-of-N/), their report.json, or the "
                                                      "evaluation output holding them.")],
    output: Annotated[Path | None, typer.Option("--output", help="Where the merged report.json and samples.jsonl go "
                                                "(default: the recipe's evaluate.output the shards ran with).")] = None,
    markdown: Annotated[Path | None, typer.Option("--markdown", help="Also write the tables as markdown.")] = None,
) -> None:
    """Join the shards of `evaluate --shard K/N` into the report (and tables) a single run gives."""
    from ..evaluation.report import (
        Report,
        find_shard_reports,
        merge_reports,
        save_merged,
    )

    merged = merge_reports([Report.load(p) for p in find_shard_reports(shards)])
    save_merged(merged, output or Path(merged.settings["recipe"]["evaluate"]["output"]))
    _print_tables(merged, markdown)




# ---------------------------------------------------------------- attack


def _write_frames(path: Path, frames: Any, fps: float) -> None:
    """(F, H, W, 3) float frames in [0, 1]: ``.npy`` exactly (float32), any other suffix as lossless-ish H.264."""
    import numpy as np

    from ..sinks import VideoSink

    if path.suffix.lower() == ".npy":
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.partial.npy")
        with open(tmp, "wb") as f:
            np.save(f, np.asarray(frames, dtype=np.float32))
        os.replace(tmp, path)
        return
    height, width = frames.shape[1:3]
    with VideoSink(path, width, height, fps, crf=0) as sink:
        for frame in frames:
            sink.write(np.rint(np.asarray(frame) * 255).astype(np.uint8))


@app.command("attack")
def attack_command(
    input: Annotated[str, typer.Argument(help="Video file or lavfi:GRAPH to attack.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Attacked video at the model's input size: .npy "
                                         "(float32 (F,H,W,3) in [0,1], exact) or .mp4 (H.264 crf 0, yuv420p).")],
    model: ModelOpt = None,
    detector: DetectorOpt = None,
    imgsz: ImgszOpt = None,
    method: Annotated[str, typer.Option("--method", help="pgd, apgd or cw.")] = "pgd",
    mode: Annotated[str, typer.Option("--mode", help="do: gradients of the model only; bpda: through PatchZero.")] = "do",
    area: Annotated[float, typer.Option("--area", help="Patch area as a fraction of the frame.")] = 0.05,
    eps: Annotated[float | None, typer.Option("--eps", help="L-inf budget inside the patch (1 = anything).")] = None,
    step: Annotated[float | None, typer.Option("--step", help="Step size (CW: learning rate).")] = None,
    iters: Annotated[int | None, typer.Option("--iters", help="Iterations.")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Patch location and random starts.")] = None,
    moving: Annotated[bool, typer.Option("--moving", help="The patch drifts over the video instead of staying put.")] = False,
    mask_out: Annotated[Path | None, typer.Option("--mask-out", help="True patch mask: .npy (float32 (F,H,W)) or video.")] = None,
    recipe: Annotated[str | None, typer.Option("--recipe", help="Recipe name or TOML path (its model, defense and attack tables).")] = None,
    device: DeviceOpt = "cpu",
) -> None:
    """Put an adversarial patch on a video and show what it does to the model.

    Frames are resized to the model's input size and attacked clip by clip (clip_len frames, label = the model's clean prediction); the attacked frames are written at that size. One patch location is drawn for the whole video. With --detector (or --mode bpda) the table also shows the prediction after PatchZero.
    """
    from ..attacks import MaskedAttack, attack_video
    from ..checkpoints import DEFAULT_CLASSIFIER
    from ..io import open_source
    from ..models import load_model
    from ..recipes import AttackSection

    rec = recipe_option(recipe)
    net = model_option(model, rec, device) or load_model(DEFAULT_CLASSIFIER).to(device_option(device)).eval()
    section = rec.attack if rec is not None else AttackSection()
    if section.targeted:
        raise ConfigError("attack.targeted: the attack command attacks the model's own predictions; set targeted = false")
    defense = None
    if mode == "bpda" or detector is not None:
        defense = defense_option(detector, rec, net, input_size=imgsz).to(device_option(device))
    overrides = {k: v for k, v in {"eps": eps, "step": step, "iters": iters, "seed": seed}.items() if v is not None}
    attack = MaskedAttack.from_section(net, section, method, mode, defense=defense, device=device, **overrides)  # type: ignore[arg-type]
    with open_source(input) as source, count_progress(f"attack {Path(input).name}", 0) as on_progress:
        fps = source.fps
        result = attack_video((f.image for f in source), attack, area, attack.seed, moving=moving or section.moving,
                              defense=defense, on_progress=on_progress)  # fmt: skip
    _write_frames(output, result.frames, fps)
    if mask_out is not None:
        _write_frames(mask_out, result.mask if mask_out.suffix.lower() == ".npy" else result.mask[..., None].repeat(3, -1), fps)

    names = net.spec.class_names
    label = lambda k: names[k] if k < len(names) else str(k)
    table = Table(title=f"streamguard attack: {method} {mode}, area {area:g}", title_justify="left")
    for column in ("clip", "frames", "clean", "attacked") + (("attacked + PatchZero",) if defense is not None else ()):
        table.add_column(column)
    t, n = net.spec.clip_len, len(result.frames)
    for i, (clean, adv) in enumerate(zip(result.clean, result.attacked)):
        row = [str(i), f"{i * t}-{min(n, (i + 1) * t) - 1}", label(clean), label(adv)]
        table.add_row(*map(escape, row + ([label(result.defended[i])] if result.defended is not None else [])))
    out.print(table)
    fooled = sum(c != a for c, a in zip(result.clean, result.attacked))
    summary = {"attacked video": output, "size": f"{result.frames.shape[2]}x{result.frames.shape[1]} (model input)",
               "frames": n, "fooled clips": f"{fooled} / {len(result.clean)}", "patch area": float(result.mask.mean())}
    if result.defended is not None:
        summary["fooled after PatchZero"] = f"{sum(c != d for c, d in zip(result.clean, result.defended))} / {len(result.clean)}"
    if mask_out is not None:
        summary["mask"] = mask_out
    out.print(summary_table("streamguard attack", summary))


@app.command("demo")
def demo_command(
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Folder for the demo's videos, PNG strips and results.")] = Path("demo"),
    seed: Annotated[int, typer.Option(help="Seed of the video, the patch location and the attack.")] = 0,
    video_class: Annotated[int, typer.Option("--class", help="SynthMotion class of the first clip (0-11); the next clip shows the next class.")] = 1,
    area: Annotated[float, typer.Option(help="Patch area as a fraction of the frame.")] = 0.10,
    iters: Annotated[int, typer.Option(help="Masked PGD iterations (paper: 20).")] = 20,
    mode: Annotated[list[str], typer.Option("--mode", help="do (attack the classifier alone) and/or bpda (adaptive, through PatchZero).")] = ["do", "bpda"],  # noqa: B006
    device: Annotated[str, typer.Option(help="torch device (cpu, cuda...).")] = "cpu",
) -> None:
    """Patch a benchmark video with Masked PGD (downstream-only and adaptive BPDA), remove it with PatchZero."""
    from ..demo import run_demo

    if bad := [m for m in mode if m not in ("do", "bpda")]:
        raise ConfigError(f"--mode: expected do or bpda, got {bad[0]!r}")
    results = []
    for m in mode:
        with count_progress(f"demo: Masked PGD ({m}) on each clip", 0) as on_progress:
            results.append(run_demo(out_dir, seed=seed, video_class=video_class, area=area, iters=iters, mode=m,
                                    device=str(device_option(device)), on_progress=on_progress))  # fmt: skip
    first = results[0]
    table = Table(title=f"streamguard demo: {first.video_class}, {area:.0%} patch, Masked PGD eps 1.0 step 0.2 x{iters}, seed {seed}",
                  title_justify="left")  # fmt: skip
    table.add_column("clip")
    table.add_column("true class")
    table.add_column("clean")
    for r in results:
        table.add_column(f"{r.mode.upper()} attacked")
        table.add_column(f"{r.mode.upper()} + PatchZero")
    for i, (truth, clean) in enumerate(zip(first.truth, first.clean)):
        table.add_row(str(i), escape(truth), escape(clean), *(escape(x) for r in results for x in (r.attacked[i], r.defended[i])))
    out.print(table)
    rows: dict[str, Any] = {}
    for r in results:
        rows[f"{r.mode.upper()}: clips restored"] = f"{r.restored()} / {len(r.clean)}"
        scores = (r.pixel_precision, r.pixel_recall, r.pixel_f1)
        rows[f"{r.mode.upper()}: pixel precision / recall / F1"] = " / ".join("–" if math.isnan(v) else f"{v:.3f}" for v in scores)
        rows[f"{r.mode.upper()}: overlay, strip"] = f"{r.files['overlay']}, {r.files['strip']}"
    out.print(summary_table(f"PatchZero on the attacked video (files in {out_dir})", rows))
