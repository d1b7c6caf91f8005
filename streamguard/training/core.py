"""The resumable, bit-exact training core every trainer shares.

All randomness of step ``s`` (data order, augmentation, patch masks, attack seeds, dropout) is a pure
function of ``(train.seed, s)``, so a run killed after ``K`` steps and resumed from its checkpoint
reaches bit-identical weights to an uninterrupted run. :class:`Run` is one run's state file;
:func:`train_loop` steps, evaluates, checkpoints and reports progress.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ..checkpoints import (
    atomic_write_text,
    load_checkpoint,
    save_checkpoint,
)
from ..errors import CheckpointError, ConfigError
from ..recipes import Recipe

ProgressFn = Callable[[int, int, dict[str, float]], None]

_SALT = {
    "classifier": 1, "benign": 2, "attacked": 3, "augment": 4, "cache": 5, "stage2": 6, "eval": 7, "torch": 8, "frames": 9,
    "patches": 10, "footage": 11, "pool": 12, "race": 13, "graphics": 14, "validation": 15, "mine": 16, "hard": 17,
}  # fmt: skip


@dataclass
class TrainResult:
    """What a finished run left behind: the final checkpoint, its hash and the last metrics."""

    path: Path
    sha256: str
    steps: int
    metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    stopped_early: bool = False
    best_step: int | None = None  # stage 2: the evaluation kept, None if none was inside the guards


# ---------------------------------------------------------------- determinism


def seed_for(seed: int, salt: str, *keys: int) -> int:
    """A 32-bit seed (numpy's global RNG takes no more) that depends only on ``(seed, salt, *keys)``."""
    return int(np.random.SeedSequence([seed, _SALT[salt], *keys]).generate_state(1)[0])


def keyed_rng(seed: int, salt: str, *keys: int) -> np.random.Generator:
    return np.random.default_rng(seed_for(seed, salt, *keys))


@lru_cache(maxsize=8)
def _permutation(n: int, seed: int, salt: str, epoch: int) -> np.ndarray:
    return keyed_rng(seed, salt, epoch).permutation(n)


def step_indices(n: int, batch: int, seed: int, step: int, salt: str = "classifier") -> np.ndarray:
    """Dataset indices of ``step``'s batch: epoch-wise permutations, a pure function of ``(seed, step)``.

    Sample ``p = step * batch + i`` is element ``p % n`` of epoch ``p // n``'s permutation.
    """
    positions = step * batch + np.arange(batch)
    return np.array([_permutation(n, seed, salt, int(p // n))[p % n] for p in positions], dtype=np.int64)


class _StepBatches:
    """``DataLoader`` batch sampler: the batches of steps ``start .. total-1`` (order survives workers)."""

    def __init__(self, n: int, batch: int, seed: int, start: int, total: int, salt: str) -> None:
        self.n, self.batch, self.seed, self.start, self.total, self.salt = n, batch, seed, start, total, salt

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start, self.total):
            yield step_indices(self.n, self.batch, self.seed, step, self.salt).tolist()

    def __len__(self) -> int:
        return max(0, self.total - self.start)


def step_loader(ds: Dataset, batch: int, seed: int, start: int, total: int, salt: str, workers: int) -> Iterator[Any]:
    sampler = _StepBatches(len(ds), batch, seed, start, total, salt)
    collate = getattr(ds, "collate", None)  # a data set whose items the default cannot batch says how
    return iter(DataLoader(ds, batch_sampler=sampler, num_workers=workers, collate_fn=collate))


def pick_device(device: str | torch.device | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


class StepRNG:
    """Seed torch's and numpy's global RNGs (dropout, ART) from ``(seed, *keys)``; restore them after."""

    def __init__(self, seed: int, device: torch.device, *keys: int) -> None:
        self.fork = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
        self.value = seed_for(seed, "torch", *keys)

    def __enter__(self) -> None:
        self.fork.__enter__()
        self.numpy_state = np.random.get_state()
        torch.manual_seed(self.value)
        np.random.seed(self.value)  # ART draws random inits from numpy's global RNG

    def __exit__(self, *exc: Any) -> None:
        np.random.set_state(self.numpy_state)
        self.fork.__exit__(*exc)


# ---------------------------------------------------------------- resumable state


def _rng_state() -> tuple[dict[str, Tensor], dict[str, Any]]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    tensors = {"torch_rng": torch.get_rng_state(), "numpy_rng": torch.from_numpy(keys.astype(np.int64))}
    meta = {"numpy_rng": [kind, pos, has_gauss, gauss], "python_rng": [version, list(internal), gauss_next]}
    return tensors, meta


def _set_rng_state(tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_rng"])
    kind, pos, has_gauss, gauss = meta["numpy_rng"]
    np.random.set_state((kind, tensors["numpy_rng"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = meta["python_rng"]
    random.setstate((version, tuple(internal), gauss_next))


@dataclass
class Run:
    """One resumable run: its state file, what it trains, and the settings a resume must match."""

    path: Path
    model: nn.Module
    optimizer: torch.optim.Optimizer
    config: dict[str, Any]
    step: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    buffers: dict[str, Any] = field(default_factory=dict)  # more tensors a resume needs, as last restored
    collect: Callable[[], dict[str, Any]] | None = None  # gathers them at each save (stage 2's patch pool)
    main: bool = True  # under torchrun only rank 0 writes (streamguard.training.distributed)

    def save(self) -> None:
        if not self.main:
            return
        tensors, rng_meta = _rng_state()
        buffers = self.collect() if self.collect is not None else self.buffers
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "buffers": buffers, **tensors}
        order = {"scheme": "epoch-permutation", "seed": self.config["seed"], "step": self.step}
        meta = {"step": self.step, "config": self.config, "extra": self.extra, "data_order": order, **rng_meta}
        save_checkpoint(self.path, state, meta)

    def restore(self) -> None:
        if not self.path.is_file():
            raise CheckpointError(f"nothing to resume: {self.path} does not exist (run without --resume)")
        state, meta = load_checkpoint(self.path)
        for key, value in self.config.items():
            if meta["config"].get(key) != value:
                raise ConfigError(
                    f"cannot resume from {self.path}: it was trained with {key}={meta['config'].get(key)!r}, "
                    f"the recipe says {value!r}"
                )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        _set_rng_state(state, meta)
        self.step, self.extra, self.buffers = int(meta["step"]), dict(meta["extra"]), dict(state.get("buffers", {}))


def run_config(recipe: Recipe, **extra: Any) -> dict[str, Any]:
    t = recipe.train
    d = recipe.data
    return {"seed": t.seed, "batch": t.batch, "lr": t.lr, "data": [d.kind, d.root, d.clip_len, d.size], **extra}


def write_sidecar(path: Path, sha256: str, meta: dict[str, Any]) -> None:
    """``<checkpoint>.json``: command, seed, metrics and sha256, as ``weights/manifest.json`` wants them."""
    text = json.dumps({"file": path.name, "sha256": sha256, **meta}, indent=2, default=str)
    atomic_write_text(path.with_name(path.name + ".json"), text)


def train_loop(
    run: Run,
    total: int,
    seed: int,
    device: torch.device,
    step_fn: Callable[[int], dict[str, float]],
    eval_fn: Callable[[int], dict[str, float]] | None,
    eval_every: int,
    checkpoint_every: int,
    on_progress: ProgressFn | None,
    should_stop: Callable[[dict[str, Any]], bool] = lambda extra: False,
) -> dict[str, float]:
    """Steps ``run.step .. total-1``; evaluate, checkpoint and report progress; returns the last metrics."""
    metrics: dict[str, float] = dict(run.extra.get("last", {}))
    while run.step < total and not should_stop(run.extra):
        with StepRNG(seed, device, 0, run.step):
            metrics = step_fn(run.step)
        run.step += 1
        if eval_fn is not None and (run.step % eval_every == 0 or run.step == total):
            with StepRNG(seed, device, 1, run.step):
                scores = eval_fn(run.step)
            metrics.update(scores)
            run.extra.setdefault("history", []).append({"step": run.step, **scores})
        run.extra["last"] = metrics
        if run.step % checkpoint_every == 0 or run.step == total or should_stop(run.extra):
            run.save()
        if on_progress is not None:
            on_progress(run.step, total, metrics)
    return metrics


def start_run(run: Run, resume: bool) -> None:
    run.path.parent.mkdir(parents=True, exist_ok=True)
    if resume:
        run.restore()


# ---------------------------------------------------------------- data


def recipe_dataset(recipe: Recipe, split: str, clip_len: int | None = None, subset: int | None = None) -> Any:
    from ..data import recipe_clips

    return recipe_clips(recipe.data, split, clip_len=clip_len, subset=subset)


class InMemory(Dataset):
    """Caches a clip dataset's items as uint8 on first access (exact: decoded frames are uint8).

    SynthMotion fits in memory many times over; decoding it again at every step made training
    data-bound on both the CPU and the GPU.
    """

    def __init__(self, ds: Dataset) -> None:
        self.ds = ds
        self.items: dict[int, tuple[Tensor, int]] = {}

    def __len__(self) -> int:
        return len(self.ds)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        if i not in self.items:
            clip, label = self.ds[i]
            self.items[i] = ((clip * 255).round().to(torch.uint8), label)
        clip, label = self.items[i]
        return clip.float() / 255, label

    def __getattr__(self, name: str) -> Any:
        if name == "ds":
            raise AttributeError(name)
        return getattr(self.ds, name)


def one_cycle_lr(step: int, total: int, peak: float, warmup: float = 0.1) -> float:
    """Linear warm-up to ``peak`` then cosine decay to zero: the learning rate of ``step``."""
    ramp = max(1, int(total * warmup))
    if step < ramp:
        return peak * (step + 1) / ramp
    return float(peak * 0.5 * (1 + np.cos(np.pi * (step - ramp) / max(1, total - ramp))))


# ---------------------------------------------------------------- downstream classifier


def adamw(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
