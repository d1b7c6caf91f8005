"""``data``: the data sets (SynthMotion, real footage)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape

if TYPE_CHECKING:
    pass


from .common import App, app, count_progress, err, out, summary_table

# ---------------------------------------------------------------- data

data_app = App(name="data", help="Data sets: generate SynthMotion in UCF101's layout; build real-footage backgrounds.", no_args_is_help=True)
app.add_typer(data_app)


@data_app.command("synth")
def data_synth(
    output: Annotated[Path, typer.Argument(help="Output folder (class folders, ucfTrainTestlist/, synthmotion.json).")],
    videos_per_class: Annotated[int, typer.Option("--videos-per-class", min=2, help="Videos per motion class.")] = 12,
    seed: Annotated[int, typer.Option("--seed", help="Everything is a function of this seed.")] = 0,
    size: Annotated[int, typer.Option("--size", min=16, help="Frame side in pixels (even).")] = 112,
    frames: Annotated[int, typer.Option("--frames", min=1, help="Frames per video.")] = 32,
    workers: Annotated[int, typer.Option("--workers", min=1, help="Processes rendering videos.")] = 1,
) -> None:
    """Generate SynthMotion: textured objects moving in 12 distinct ways over photo backgrounds."""
    import json

    from ..data import SYNTH_CLASSES, make_synthmotion

    total = len(SYNTH_CLASSES) * videos_per_class
    with count_progress("synthmotion", total) as on_progress:
        root = make_synthmotion(output, videos_per_class, seed, size=size, frames=frames, workers=workers, progress=on_progress)
    meta = json.loads((root / "synthmotion.json").read_text())
    test = len((root / "ucfTrainTestlist" / "testlist01.txt").read_text().splitlines())
    megabytes = sum(p.stat().st_size for p in root.rglob("*.avi")) / 2**20
    out.print(summary_table("streamguard data synth", {
        "output": root,
        "classes": len(meta["classes"]),
        "videos (train / test, fold 1)": f"{total - test} / {test}",
        "clip": f"{frames} frames x {size}x{size} @ {meta['fps']} fps",
        "seed": seed,
        "codec": meta["codec"],
        "size on disk (MiB)": megabytes,
        "wall time (s)": meta["seconds"],
    }))  # fmt: skip


@data_app.command("footage")
def data_footage(
    output: Annotated[Path, typer.Option("--output", "-o", help="Output folder (train/, test/, footage.json).")],
    folders: Annotated[list[Path] | None, typer.Argument(help="Folders (or files) of videos and photos; default: the "
        "Debian opencv-doc, gnome-backgrounds and mate-backgrounds folders and scikit-image's photos that exist.")] = None,
    size: Annotated[int, typer.Option("--size", min=16, help="Clip side in pixels (even): the detector's working scale.")] = 64,
    clip_len: Annotated[int, typer.Option("--clip-len", min=1, help="Frames per clip.")] = 16,
    clips_per_video: Annotated[int, typer.Option("--clips-per-video", min=1, help="Clips cut from each video.")] = 24,
    clips_per_photo: Annotated[int, typer.Option("--clips-per-photo", min=1, help="Clips (synthetic camera motion) per photo.")] = 4,
    test_fraction: Annotated[float, typer.Option("--test-fraction", min=0.0, max=0.99, help="Share of source groups held out (vtest.avi always is).")] = 0.2,
    seed: Annotated[int, typer.Option("--seed", help="Everything is a function of this seed (the split is not: it follows file names).")] = 0,
    workers: Annotated[int, typer.Option("--workers", min=1, help="Processes rendering sources.")] = 1,
) -> None:
    """Real footage and photos as benign training backgrounds for the patch detector: short clips, offline."""
    import json
    import warnings

    from ..data.footage import FootageWarning, build_footage, default_folders

    chosen = list(folders or default_folders())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", FootageWarning)
        with count_progress("footage", 0) as on_progress:
            root = build_footage(chosen, output, size=size, clip_len=clip_len, clips_per_video=clips_per_video,
                                 clips_per_photo=clips_per_photo, test_fraction=test_fraction, seed=seed, workers=workers,
                                 on_progress=on_progress)  # fmt: skip
    for w in caught:
        err.print(f"warning: {escape(str(w.message))}")
    meta = json.loads((root / "footage.json").read_text())
    kinds = {k: sum(s["kind"] == k for s in meta["sources"]) for k in ("video", "photo")}
    held = {k: sum(s["kind"] == k and s["split"] == "test" for s in meta["sources"]) for k in ("video", "photo")}
    megabytes = sum(p.stat().st_size for p in root.glob("*/*.npy")) / 2**20
    out.print(summary_table("streamguard data footage", {
        "output": root,
        "folders": ", ".join(meta["folders"]) or "-",
        "videos (of them test)": f"{kinds['video']} ({held['video']})",
        "photos (of them test)": f"{kinds['photo']} ({held['photo']})",
        "skipped files": len(meta["skipped"]),
        "clips (train / test)": f"{meta['counts']['train']} / {meta['counts']['test']}",
        "clip": f"{clip_len} frames x {size}x{size}",
        "seed": seed,
        "size on disk (MiB)": megabytes,
        "wall time (s)": meta["seconds"],
    }))  # fmt: skip


