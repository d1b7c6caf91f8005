"""Safe checkpoint files: tensors plus JSON-able metadata, verified by sha256.

A checkpoint is a ``dict`` with two keys, ``state_dict`` (name -> tensor) and ``meta``
(plain Python values only). It is loaded with ``torch.load(weights_only=True)`` so no
arbitrary object is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch

from .errors import CheckpointError
from .recipes import package_dir


def sha256_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write(path: str | os.PathLike[str], write: Callable[[BinaryIO], None]) -> None:
    """``write(file)`` to a temporary name, fsync, then rename: a kill never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` through :func:`atomic_write`."""
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write a text file under a temporary name, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def check_state_dict(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], where: str) -> None:
    """Raise :class:`CheckpointError` naming the first missing, unexpected and mis-shaped keys of ``found``."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    misshaped = [
        f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}"
        for k, v in found.items()
        if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    ]
    problems = [
        f"{len(keys)} {what} ({', '.join(keys[:3])}{', …' if len(keys) > 3 else ''})"
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped))
        if keys
    ]
    if problems:
        raise CheckpointError(f"{where}: " + "; ".join(problems))


def load_state_dict_checked(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], where: str) -> None:
    """The one strict state-dict loader: :func:`check_state_dict` (a one-line :class:`CheckpointError`
    starting with ``where``), then load."""
    check_state_dict(module.state_dict(), dict(state_dict), where)
    module.load_state_dict(state_dict)


def save_checkpoint(
    path: str | os.PathLike[str], state_dict: dict[str, torch.Tensor], meta: dict[str, Any]
) -> str:
    """Write ``{"state_dict", "meta"}`` atomically and return the file's sha256."""
    atomic_save({"state_dict": state_dict, "meta": meta}, path)
    return sha256_file(path)


def load_checkpoint(
    path: str | os.PathLike[str], sha256: str | None = None, map_location: str | torch.device = "cpu"
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a checkpoint as ``(state_dict, meta)``.

    A bare state dict (as many authors release) is accepted and returned with empty meta.
    Raises :class:`CheckpointError` for a missing file, a hash mismatch, or a file that is not
    a tensors-only checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if sha256 is not None:
        actual = sha256_file(path)
        if actual != sha256:
            raise CheckpointError(
                f"checkpoint {path} failed its sha256 check (expected {sha256[:12]}…, got {actual[:12]}…): "
                "the file is truncated or was modified"
            )
    try:
        with warnings.catch_warnings():  # torch's notes on a file's pickle protocol: noise around a one-line error
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises many types for corrupt/unsafe files
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"cannot load checkpoint {path}: {first}") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        return obj["state_dict"], dict(obj.get("meta") or {})
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj, {}
    raise CheckpointError(f"{path} is not a StreamGuard checkpoint or a state dict")


WEIGHTS_DIR = Path(os.environ.get("STREAMGUARD_WEIGHTS") or package_dir("streamguard.weights", "weights"))
DEFAULT_CLASSIFIER = "synth-tiny3d"
DEFAULT_DETECTOR = "synth-patchzero"
DEFAULT_FRAME_DETECTOR = "synth-frcnn"


@dataclass(frozen=True)
class Weights:
    """A checkpoint we ship or a user gives: where it is, its hash, and what it is.

    ``meta`` holds everything needed to rebuild and use the network (for a downstream model:
    ``model`` name, ``spec``; for the patch detector: ``backbone``, ``input_size``, ``threshold``...).
    """

    name: str
    path: Path
    sha256: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def load(self, map_location: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        state_dict, meta = load_checkpoint(self.path, self.sha256, map_location)
        return state_dict, {**self.meta, **meta}


def read_manifest(weights_dir: Path | None = None) -> dict[str, dict[str, Any]]:
    """``weights/manifest.json``: ``{name: {"file", "sha256", "kind", "meta", "command", "metrics"}}``.

    ``weights_dir`` defaults to :data:`WEIGHTS_DIR`: ``$STREAMGUARD_WEIGHTS``, else the installed
    ``streamguard.weights`` package (the repository's top-level ``weights/``).
    """
    manifest = (weights_dir or WEIGHTS_DIR) / "manifest.json"
    if not manifest.is_file():
        return {}
    try:
        return json.loads(manifest.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{manifest}: not valid JSON ({err})") from None


def get_weights(ref: str | os.PathLike[str] | Weights) -> Weights:
    """Resolve a shipped weights name (``synth-tiny3d``) or a checkpoint path to :class:`Weights`.

    Shipped weights carry the sha256 from the manifest and are verified on load; a user's path is
    loaded as is (its hash is computed for reports, not checked).
    """
    if isinstance(ref, Weights):
        return ref
    manifest = read_manifest()
    if str(ref) in manifest:
        entry = manifest[str(ref)]
        return Weights(str(ref), WEIGHTS_DIR / entry["file"], entry.get("sha256"), dict(entry.get("meta", {})))
    path = Path(ref)
    if path.is_file():
        return Weights(path.stem, path)
    known = ", ".join(sorted(manifest)) or "none shipped"
    raise CheckpointError(f"weights not found: {ref} (not a file, and not a shipped name: {known})")
