"""Batch sanitizing on a Ray cluster (the ``ray`` extra): the same per-video work as
:func:`streamguard.batch.sanitize_many`, over Ray Data, with the defense and the model loaded once
per actor (``map_batches`` with a callable class) instead of once per worker process here.

``ray.init(address=...)`` joins a running cluster (``RAY_ADDRESS`` or ``"auto"``); without one Ray
starts a local instance. Each input's outputs go to the same ``<stem>.mp4`` / ``.jsonl`` paths as a
local batch, so the output folders must be visible to every node (a shared file system).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .batch import (
    BatchResult,
    Job,
    SanitizeSettings,
    expand_inputs,
    init_worker,
    plan_outputs,
    run_one,
)
from .errors import ConfigError, StreamGuardError

_FIELDS = ("input", "output", "predictions", "overlay")


class _SanitizeActor:
    """One Ray actor: builds the sanitizer once, then sanitizes the videos of each batch of rows."""

    def __init__(self, settings: SanitizeSettings, threads: int) -> None:
        init_worker(settings, threads)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        rows: dict[str, list[Any]] = {"index": [], "ok": [], "error": [], "fatal": [], "frames": [], "seconds": []}
        for i, *paths in zip(batch["index"], *(batch[f] for f in _FIELDS)):
            job = Job(paths[0], Path(paths[1]), *(Path(p) if p else None for p in paths[2:]))
            try:
                r, fatal = run_one(job), ""
            except StreamGuardError as e:  # a sanitizer that cannot be built: the driver raises it
                r, fatal = BatchResult(job.input, job.output, False, str(e)), str(e)
            for key, value in (("index", int(i)), ("ok", r.ok), ("error", r.error or ""), ("fatal", fatal),
                               ("frames", r.frames), ("seconds", r.seconds)):  # fmt: skip
                rows[key].append(value)
        return rows


def sanitize_ray(
    inputs: str | Sequence[str],
    out_dir: str | os.PathLike[str],
    *,
    actors: int = 2,
    settings: SanitizeSettings | None = None,
    predictions_dir: str | os.PathLike[str] | None = None,
    overlay_dir: str | os.PathLike[str] | None = None,
    address: str | None = None,
    threads: int = 1,
) -> list[BatchResult]:
    """:func:`~streamguard.batch.sanitize_many` on Ray: ``actors`` actors (``threads`` torch threads and
    CPUs each) share the videos. Returns one :class:`BatchResult` per input, in input order."""
    try:
        import ray
    except ImportError:
        raise ConfigError("Ray is not installed: pip install 'streamguard[ray]'") from None
    settings = settings or SanitizeSettings()
    if actors < 1:
        raise ConfigError(f"--workers: expected >= 1 Ray actors, got {actors}")
    jobs = plan_outputs(expand_inputs(inputs), out_dir, predictions_dir, overlay_dir)
    for folder in (out_dir, predictions_dir, overlay_dir):
        if folder is not None:
            Path(folder).mkdir(parents=True, exist_ok=True)
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"STREAMGUARD_NO_PROGRESS": "1"}})  # fmt: skip
    items = [{"index": i, **{f: str(getattr(j, f) or "") for f in _FIELDS}} for i, j in enumerate(jobs)]
    done = ray.data.from_items(items).map_batches(
        _SanitizeActor, fn_constructor_args=(settings, threads), batch_size=1, concurrency=min(actors, len(jobs)),
        num_cpus=threads,
    ).take_all()  # fmt: skip
    fatal = next((row["fatal"] for row in done if row["fatal"]), None)
    if fatal:
        raise ConfigError(fatal)
    results: list[BatchResult | None] = [None] * len(jobs)
    for row in done:
        j = jobs[int(row["index"])]
        ok = bool(row["ok"])
        results[int(row["index"])] = BatchResult(j.input, j.output, ok, row["error"] or None, j.predictions if ok else None,
                                                 j.overlay if ok else None, int(row["frames"]), float(row["seconds"]))  # fmt: skip
    return [r for r in results if r is not None]
