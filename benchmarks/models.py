"""CPU throughput of every registered downstream model at its native input size (batch 1).

    python benchmarks/models.py [--quick] [--models tiny3d mars ...] [--threads 1]

Forward is ``eval()`` + ``no_grad`` (the pipeline's inference); forward+backward is a loss
gradient w.r.t. the input, as an attack step does (clip models: eval mode + cross-entropy;
detectors: torchvision training losses with batch norm frozen, as ART does). Each measurement
runs one warm-up call, then as many calls as fit in ``--seconds`` (at least one).
Writes a rich table and ``benchmarks/results/models.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torchvision
from rich.console import Console
from rich.table import Table
from torch import nn

from streamguard.checkpoints import atomic_write_text
from streamguard.models import build_model, count_parameters, list_models

RESULTS = Path(__file__).resolve().parent / "results" / "models.json"


def rate(fn: Callable[[], None], seconds: float, max_iters: int) -> tuple[float, int]:
    """Calls per second of ``fn`` after one warm-up call; returns ``(rate, iterations)``."""
    start = time.perf_counter()
    fn()
    warm = time.perf_counter() - start
    iters = max(1, min(max_iters, math.ceil(seconds / max(warm, 1e-6))))
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return iters / (time.perf_counter() - start), iters


def clip_steps(model: nn.Module) -> tuple[Callable[[], None], Callable[[], None]]:
    """(forward, forward+backward) on one random clip ``(1, 3, T, H, W)``."""
    x = torch.rand(1, *model.spec.input_shape)
    y = torch.zeros(1, dtype=torch.long)

    def forward() -> None:
        with torch.no_grad():
            model(x)

    def backward() -> None:
        xg = x.clone().requires_grad_(True)
        nn.functional.cross_entropy(model(xg), y).backward()

    return forward, backward


def frame_steps(model: nn.Module) -> tuple[Callable[[], None], Callable[[], None]]:
    """(forward, forward+backward) on one random frame ``(3, H, W)`` with one ground-truth box."""
    h, w = model.spec.input_size
    x = torch.rand(3, h, w)
    target = {"boxes": torch.tensor([[w / 4, h / 4, w / 2, h / 2]]), "labels": torch.tensor([1])}

    def forward() -> None:
        model.eval()
        with torch.no_grad():
            model([x])

    def backward() -> None:
        model.train()
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        xg = x.clone().requires_grad_(True)
        sum(model([xg], [target]).values()).backward()

    return forward, backward


def bench(name: str, seconds: float, max_iters: int) -> dict[str, Any]:
    model = build_model(name)
    for p in model.parameters():
        p.requires_grad_(False)
    forward, backward = (clip_steps if model.spec.task == "clip" else frame_steps)(model)
    fwd, fwd_iters = rate(forward, seconds, max_iters)
    bwd, bwd_iters = rate(backward, seconds, max_iters)
    spec = model.spec
    return {
        "model": name,
        "task": spec.task,
        "input_shape": list(spec.input_shape),
        "params": count_parameters(model),
        "forward_per_s": fwd,
        "forward_backward_per_s": bwd,
        "iterations": [fwd_iters, bwd_iters],
    }


def table(rows: list[dict[str, Any]], settings: dict[str, Any]) -> Table:
    t = Table(title=f"Downstream models on CPU, batch 1, {settings['threads']} thread(s)")
    for col in ("model", "task", "input shape", "params (M)", "fwd/s", "fwd+bwd/s", "s/fwd", "s/fwd+bwd"):
        t.add_column(col, justify="left" if col in ("model", "task", "input shape") else "right")
    for r in rows:
        t.add_row(
            r["model"],
            r["task"],
            "x".join(map(str, r["input_shape"])),
            f"{r['params'] / 1e6:.2f}",
            f"{r['forward_per_s']:.2f}",
            f"{r['forward_backward_per_s']:.2f}",
            f"{1 / r['forward_per_s']:.3f}",
            f"{1 / r['forward_backward_per_s']:.3f}",
        )
    return t


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list_models(), choices=list_models())
    parser.add_argument("--quick", action="store_true", help="one timed call per measurement")
    parser.add_argument("--seconds", type=float, default=3.0, help="time budget per measurement")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    settings = {
        "batch": 1,
        "device": "cpu",
        "threads": args.threads,
        "seconds_per_measurement": 0.0 if args.quick else args.seconds,
        "quick": args.quick,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    console = Console(width=max(Console().width, 120))
    rows = []
    for name in args.models:
        with console.status(f"{name}…"):
            rows.append(bench(name, settings["seconds_per_measurement"], 1 if args.quick else 50))
        r = rows[-1]
        console.log(f"{name}: {r['forward_per_s']:.2f} fwd/s, {r['forward_backward_per_s']:.2f} fwd+bwd/s")
    console.print(table(rows, settings))
    write_json(args.out, {"settings": settings, "results": rows})
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
