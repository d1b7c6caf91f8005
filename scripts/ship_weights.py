"""Copy trained checkpoints into ``weights/`` and record them in ``weights/manifest.json``.

    python scripts/ship_weights.py runs/train/synth-clip

Each run checkpoint has a ``<file>.json`` sidecar (written by ``streamguard train``) with the command,
seed and metrics; they go into the manifest next to the file's sha256, and the copy is verified by
loading it back through ``streamguard.checkpoints`` (``weights_only=True``).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from streamguard.checkpoints import WEIGHTS_DIR, load_checkpoint, sha256_file

SHIPPED = {  # recipe that trained it -> run file -> shipped name
    "synth-clip": {
        "classifier.pt": "synth-tiny3d",
        "detector-stage1.pt": "synth-patchzero-stage1",
        "detector-stage2.pt": "synth-patchzero",
    },
    "synth-detect": {"frame-detector.pt": "synth-frcnn"},  # its PatchZero stage 2 is an experiment (README)
}


def _recipe_name(checkpoint: Path) -> str | None:
    sidecar = checkpoint.with_name(checkpoint.name + ".json")
    return json.loads(sidecar.read_text()).get("recipe", {}).get("name") if sidecar.is_file() else None


def ship(run: Path, weights: Path = WEIGHTS_DIR) -> dict[str, dict]:
    manifest_path = weights / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    for file in sorted({f for files in SHIPPED.values() for f in files}):
        src = run / file
        if not src.is_file():
            continue
        recipe = _recipe_name(src)
        name = SHIPPED.get(recipe or "", {}).get(file)
        if name is None:
            print(f"skipped {src}: recipe {recipe or '?'} ships no {file}")
            continue
        dst = weights / f"{name}.pt"
        shutil.copyfile(src, dst)
        sha = sha256_file(dst)
        _, meta = load_checkpoint(dst, sha256=sha)
        sidecar = json.loads((run / f"{file}.json").read_text()) if (run / f"{file}.json").is_file() else {}
        manifest[name] = {
            "file": dst.name,
            "sha256": sha,
            "bytes": dst.stat().st_size,
            "kind": sidecar.get("kind", meta.get("kind", "model")),
            "what": meta.get("model") or f"PatchZero PSPNet ({meta.get('backbone')}, width {meta.get('width')})",
            "command": sidecar.get("command"),
            "seed": sidecar.get("seed"),
            "metrics": sidecar.get("metrics"),
        }
    manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+", help="training run directories (train.output)")
    args = parser.parse_args()
    for run in args.runs:
        manifest = ship(run)
    for name, entry in manifest.items():
        print(f"{name:28s} {entry['bytes'] / 1e6:6.2f} MB  sha256 {entry['sha256'][:12]}  {entry.get('metrics')}")


if __name__ == "__main__":
    main()
