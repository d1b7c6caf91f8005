"""An evaluation's results: the :class:`Report` and the resumable per-sample log it is built from."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoints import atomic_write_text
from ..errors import ConfigError, InputError
from ..metrics import PixelCounts, detection_ap
from ..recipes import Recipe, recipe_to_dict


def _weights_digest(modules: Sequence[nn.Module]) -> str:
    """sha256 of the modules' parameters and buffers, so that a retrained model or detector behind
    the same name or path never resumes its predecessor's results."""
    digest = hashlib.sha256()
    for module in modules:
        for name, tensor in module.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def results_fingerprints(recipe: Recipe, model: nn.Module, defenses: dict[str, nn.Module]) -> dict[str, str]:
    """What decides the per-sample results, in parts: ``""`` what every cell shares (the model's
    weights and the recipe's model, data and attack sections), and per defense name what only its
    cells depend on (its weights and settings: PatchZero's ``meta`` and transfer detector, the
    JPEG quality, the H.264 CRF). So a retrained detector recomputes only PatchZero's cells. The
    output folder, video count, defense list and adaptive variants are in no part (a record's attack
    key names its variant, and no cell depends on another, so adding one only adds its cells)."""
    d, ev = recipe_to_dict(recipe), recipe.evaluate
    own: dict[str, Any] = {"jpeg": ev.jpeg_quality, "h264": ev.h264_crf}
    if "patchzero" in defenses:  # the settings it runs with (its weights' meta under the recipe's [defense])
        own["patchzero"] = [getattr(defenses["patchzero"], "meta", None), ev.transfer_detector]

    def digest(value: Any, modules: Sequence[nn.Module]) -> str:
        text = json.dumps({"settings": value, "weights": _weights_digest(modules)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    parts = {"": digest({k: d[k] for k in ("model", "data", "attack")}, [model])}
    return parts | {name: digest(own.get(name), [m]) for name, m in defenses.items()}


def fingerprint_of(parts: dict[str, str]) -> str:
    """One fingerprint for all the parts (:func:`results_fingerprints`): shards of one run share it."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def write_atomic(path: str | os.PathLike[str], text: str) -> Path:
    atomic_write_text(path, text)
    return Path(path)


def record_key(defense: str, attack: str, video: int) -> tuple[str, str, int]:
    return defense, attack, video


@dataclass
class Report:
    """Everything one evaluation produced: settings and one record per (defense, attack, video).

    A record: ``{"defense", "attack", "method", "area", "mode", "video", "name"}`` and, for a clip
    classifier, ``"label", "pred", "correct", "top5"``; for a frame detector, ``"frames"`` (its boxes,
    scores and labels per frame) and ``"targets"`` (the true boxes and labels); plus ``"pixels": [tp,
    fp, fn, tn]`` for PatchZero.
    """

    settings: dict[str, Any]
    samples: list[dict[str, Any]] = field(default_factory=list)
    path: Path | None = None

    def records(self, defense: str, attack: str) -> list[dict[str, Any]]:
        return [r for r in self.samples if r["defense"] == defense and r["attack"] == attack]

    def accuracy(self, defense: str, attack: str, k: int = 1) -> float | None:
        """Top-1 (``k=1``) or top-5 (``k=5``) accuracy of one cell; ``None`` if it was not run."""
        recs = self.records(defense, attack)
        if not recs:
            return None
        return sum(r["correct" if k == 1 else "top5"] for r in recs) / len(recs)

    def worst_accuracy(self, defense: str, attacks: Sequence[str], k: int = 1) -> float | None:
        """Per-video worst case over ``attacks``: the fraction of videos correct (top-``k``) under every
        one of them that was run on it; ``None`` if none was run."""
        hits: dict[int, bool] = {}
        for attack in attacks:
            for r in self.records(defense, attack):
                hits[r["video"]] = hits.get(r["video"], True) and bool(r["correct" if k == 1 else "top5"])
        return sum(hits.values()) / len(hits) if hits else None

    def box_ap(self, defense: str, attack: str) -> dict[str, float] | None:
        """A frame detector's AP / AP50 / AP75 over every frame of one cell; ``None`` if it was not run."""
        recs = self.records(defense, attack)
        return _box_ap(recs) if recs else None

    def worst_box_ap(self, defense: str, attacks: Sequence[str]) -> dict[str, float] | None:
        """:meth:`worst_accuracy` for a frame detector: each video's frames as the attack that left
        it the lowest AP50 of those run on it (then the lowest AP), and the AP of them all together;
        ``None`` if none was run."""
        worst: dict[int, tuple[tuple[float, float], dict[str, Any]]] = {}
        for attack in attacks:
            for r in self.records(defense, attack):
                ap = _box_ap([r])
                key = (ap["ap50"], ap["ap"])
                if r["video"] not in worst or key < worst[r["video"]][0]:
                    worst[r["video"]] = (key, r)
        return _box_ap([r for _, r in worst.values()]) if worst else None

    def pixel_counts(self, attacks: Sequence[str]) -> PixelCounts:
        """PatchZero's pixel counts summed over the given attack keys (``"clean"`` for benign clips)."""
        total = PixelCounts()
        for r in self.samples:
            if r["defense"] == "patchzero" and r["attack"] in attacks:
                total = total + PixelCounts(*r["pixels"])
        return total

    def to_dict(self) -> dict[str, Any]:
        return {**self.settings, "samples": self.samples}

    def save(self, path: str | os.PathLike[str]) -> Path:
        self.path = write_atomic(path, json.dumps(self.to_dict(), indent=1))
        return self.path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Report:
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise InputError(f"cannot read report {path}: {err}") from None
        samples = d.pop("samples", [])
        return cls(d, samples, path)


def _box_ap(records: list[dict[str, Any]]) -> dict[str, float]:
    preds = [{k: torch.tensor(v).reshape(-1, 4) if k == "boxes" else torch.tensor(v) for k, v in p.items()}
             for r in records for p in r["frames"]]  # fmt: skip
    targets = [{k: torch.tensor(v).reshape(-1, 4) if k == "boxes" else torch.tensor(v, dtype=torch.int64) for k, v in g.items()}
               for r in records for g in r["targets"]]  # fmt: skip
    return detection_ap(preds, targets)


class SampleLog:
    """``samples.jsonl``: a header line (the results' fingerprints), then one JSON record per line, appended.

    Resuming keeps the records whose defense's fingerprint part is unchanged and drops the others
    (they are computed again); settings or weights that every cell shares must match.
    """

    def __init__(self, path: Path, parts: dict[str, str], header: dict[str, Any], resume: bool) -> None:
        self.path = path
        self.records: list[dict[str, Any]] = []
        path.parent.mkdir(parents=True, exist_ok=True)
        header = {**header, "fingerprint": fingerprint_of(parts), "parts": parts}
        if resume and path.is_file():
            self.records = self._read(parts, header)
        else:
            path.write_text(json.dumps({"header": header}) + "\n")
        self.done = {record_key(r["defense"], r["attack"], r["video"]) for r in self.records}

    def _read(self, parts: dict[str, str], header: dict[str, Any]) -> list[dict[str, Any]]:
        text = self.path.read_text()
        if not text.endswith("\n"):  # killed mid-line: drop the partial record
            text = text[: text.rfind("\n") + 1]
            self.path.write_text(text)
        lines = text.splitlines()
        try:
            old = json.loads(lines[0])["header"]
            records = [json.loads(line) for line in lines[1:]]
        except (IndexError, KeyError, json.JSONDecodeError):
            raise InputError(f"{self.path}: not a StreamGuard sample log; remove it or use --no-resume") from None
        before = old.get("parts", {})
        if before.get("") != parts[""]:
            raise ConfigError(
                f"{self.path} holds results of different settings; use --no-resume or another --output"
            )
        now = {**{k: v for k, v in before.items() if k not in parts}, **parts}  # defenses not run now keep theirs
        kept = [r for r in records if before.get(r["defense"]) == now.get(r["defense"])]
        if before != now:  # a defense changed (or was added): its old records go, the header is brought up to date
            header = {**header, "parts": now}
            write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in [{"header": header}, *kept]))
        return kept

    def append(self, records: list[dict[str, Any]]) -> None:
        with open(self.path, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
            f.flush()
            os.fsync(f.fileno())
        self.records += records
        self.done |= {record_key(r["defense"], r["attack"], r["video"]) for r in records}


# ---------------------------------------------------------------- shards


def find_shard_reports(paths: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """The ``report.json`` of each shard: a path is a shard's ``report.json``, a shard folder, or a
    folder holding ``shard-K-of-N/`` folders (an evaluation's output)."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_file():
            found.append(p)
        elif (p / "report.json").is_file() and p.name.startswith("shard-"):
            found.append(p / "report.json")
        elif p.is_dir() and (inner := sorted(p.glob("shard-*-of-*/report.json"))):
            found += inner
        else:
            raise InputError(f"{p}: no shard report (expected report.json or shard-K-of-N/ folders)")
    return found


def merge_reports(reports: Sequence[Report]) -> Report:
    """The N shard reports of ``evaluate(..., shard=(K, N))`` as the report of the single run.

    Every shard of the same run (same results fingerprint, same video order, same N) must be there
    exactly once; the samples are sorted as a single run sorts them (video position, defense,
    attack) and the settings are the single run's (no ``"shard"``, ``"videos"`` = the whole order).
    """
    if not reports:
        raise InputError("no shard reports to merge")
    shards = []
    for r in reports:
        s = r.settings.get("shard")
        if not isinstance(s, dict):
            raise InputError(f"{r.path or 'report'}: not a shard report (evaluate --shard K/N writes those)")
        shards.append(s)
    first, base = reports[0], shards[0]
    for r, s in zip(reports[1:], shards[1:]):
        if r.settings.get("fingerprint") != first.settings.get("fingerprint"):
            raise ConfigError(f"{r.path}: results of other settings or weights than {first.path}")
        if s["count"] != base["count"] or s["order"] != base["order"]:
            raise ConfigError(f"{r.path}: a shard of another split than {first.path} (N or video order differ)")
    n = base["count"]
    seen: dict[int, Path | None] = {}
    for r, s in zip(reports, shards):
        if s["index"] in seen:
            raise ConfigError(f"shard {s['index']}/{n} given twice ({seen[s['index']]}, {r.path})")
        seen[s["index"]] = r.path
    missing = sorted(set(range(n)) - set(seen))
    if missing:
        raise InputError(f"missing shard(s) {', '.join(f'{k}/{n}' for k in missing)} of {n}")
    order: list[int] = base["order"]
    position = {v: i for i, v in enumerate(order)}
    samples = [rec for r in reports for rec in r.samples]
    if len({record_key(rec["defense"], rec["attack"], rec["video"]) for rec in samples}) != len(samples):
        raise ConfigError("shards overlap: a sample appears in more than one shard")
    samples.sort(key=lambda rec: (position[rec["video"]], rec["defense"], rec["attack"]))
    settings = {k: v for k, v in first.settings.items() if k not in ("shard", "videos")}
    return Report({**settings, "videos": order}, samples)


def save_merged(report: Report, out: str | os.PathLike[str]) -> Path:
    """Write a merged report as a single run leaves its output: ``report.json`` and a ``samples.jsonl``
    that a later ``evaluate`` resumes from. An existing ``samples.jsonl`` of other settings is kept
    (``ConfigError``)."""
    out = Path(out)
    log = out / "samples.jsonl"
    fingerprint, parts = report.settings.get("fingerprint"), report.settings.get("parts")
    if log.is_file():
        try:
            header = json.loads(log.read_text().split("\n", 1)[0])["header"]
        except (KeyError, TypeError, json.JSONDecodeError):
            header = {}
        if header.get("fingerprint") != fingerprint:
            raise ConfigError(f"{log} holds results of other settings; merge into another --output")
    head = {"header": {"fingerprint": fingerprint, "parts": parts, "recipe": report.settings.get("recipe")}}
    write_atomic(log, "".join(json.dumps(r) + "\n" for r in [head, *report.samples]))
    return report.save(out / "report.json")
