"""``export``: the patch detector for serving fleets (ONNX Runtime, Triton, DeepStream)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

from ..errors import ConfigError
from .common import ImgszOpt, app, out, summary_table


@app.command("export")
def export_command(
    detector: Annotated[str, typer.Argument(help="PatchZero weights: shipped name or checkpoint path.")] = "synth-patchzero",
    format: Annotated[Literal["onnx"], typer.Option("--format", "-f", help="Output format.")] = "onnx",
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Graph path (default: ./DETECTOR.onnx).")] = None,
    imgsz: ImgszOpt = None,
    opset: Annotated[int, typer.Option("--opset", min=13, help="ONNX opset.")] = 17,
) -> None:
    """Write the detector as an ONNX graph at its working size with a dynamic batch, its settings in
    a .json beside it; checked against PyTorch with ONNX Runtime when that is installed.

    Run it with `streamguard sanitize --detector DETECTOR.onnx` (or watch, evaluate's DO rows), or
    load the graph in any ONNX runtime: frames (N, 3, H, W) RGB in [0, 1] -> logits (N, 1, H, W).
    """
    import torch

    from ..export import export_onnx
    from ..patchzero import load_defense, load_onnx_defense

    defense = load_defense(detector, input_size=(imgsz, imgsz) if imgsz else None)
    path = output or Path(f"{Path(detector).stem}.onnx")
    if path.suffix != ".onnx":
        raise ConfigError(f"--output {path}: an ONNX graph's name ends in .onnx")
    export_onnx(defense, path, source=detector, opset=opset)
    rows: dict[str, object] = {"graph": path, "settings": path.with_suffix(".json"),
                               "working size": "x".join(map(str, defense.input_size))}  # fmt: skip
    try:
        exported = load_onnx_defense(path)
    except ConfigError:
        rows["check"] = "skipped: ONNX Runtime is not installed (pip install 'streamguard[onnx]')"
    else:
        frames = torch.rand(8, 3, *defense.input_size, generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            diff = (exported.detector(frames) - defense.detector(frames)).abs().max().item()
        rows["check"] = f"ONNX Runtime vs PyTorch: max |logit difference| {diff:.1e} on 8 random frames"
    out.print(summary_table(f"streamguard export --format {format}", rows))
