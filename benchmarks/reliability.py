"""Reliability figures for issue 7: malformed inputs, stream faults, kills, memory over a long run, overload latency.

    python benchmarks/reliability.py [--minutes 3] [--damaged 40] [--kills 4] [--overload-seconds 20]

* **malformed**: every case of ``tests/fuzz_media.MALFORMED`` plus ``--damaged`` seeded random
  truncations / byte corruptions of a valid MP4, each through ``streamguard sanitize``; *clean* means
  the right frame count, or exit 3 with one ``error:`` line and nothing left in the output folder.
* **stream faults**: a loopback MPEG-TS server drops / stalls / sends garbage, then serves again;
  ``watch --reconnect 1`` *survives* when it records frames from after the fault into a playable file.
  Plus Ctrl-C during a stall: survived when it returns within 3 s with a playable file.
* **kills**: ``sanitize`` processes SIGKILLed at seeded random times over a full run's duration;
  *clean* means no file under the output name, or a complete one (it was renamed into place first).
  ``train classifier`` on a tiny SynthMotion killed once and ``--resume``d: *clean* when the final
  weights equal an uninterrupted run's.
* **memory**: about ``--minutes`` of wall time of 640x480 ``testsrc2`` through the sanitize pipeline
  (8-frame clips, MP4 output) with the light (MobileNetV3, untrained) detector: peak RSS over the
  first minute vs over the whole run.
* **overload**: a realtime 640x480 source at twice the frame rate the pipeline sustains (live mode):
  latency p50 / p99 (decode to write), frames dropped.

Writes a rich table and ``benchmarks/results/reliability.json``.
"""

from __future__ import annotations

import _thread
import argparse
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from typer.testing import CliRunner, Result

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from fuzz_media import (  # noqa: E402
    MALFORMED, FaultyStreamServer, build_case, corrupt, kill_while_writing, mdat_range, truncate, write_video,
)
from streamguard.cli import app  # noqa: E402
from streamguard.detector import PSPNet  # noqa: E402
from streamguard.patchzero import PatchZero, save_defense
from streamguard.io import open_source  # noqa: E402
from streamguard.pipeline import Item, Pipeline  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "reliability.json"
MEMORY_CLIP_LEN = 8
CLI = [sys.executable, "-c", "from streamguard.cli import main; main()"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "STREAMGUARD_NO_PROGRESS": "1"}
runner = CliRunner()


def invoke(args: list[str], timeout: float = 60.0) -> Result | None:
    """``streamguard ARGS`` in-process; ``None`` when it hangs past ``timeout``."""
    box: dict[str, Result] = {}
    worker = threading.Thread(target=lambda: box.setdefault("r", runner.invoke(app, args)), daemon=True)
    worker.start()
    worker.join(timeout)
    return box.get("r")


def frame_count(path: Path) -> int:
    try:
        with open_source(path) as src:
            return sum(1 for _ in src)
    except Exception:  # noqa: BLE001 - unplayable counts as zero
        return 0


def clean_refusal(result: Result | None, folder: Path) -> bool:
    if result is None or result.exit_code != 3:
        return False
    lines = result.output.strip().splitlines()
    leftovers = list(folder.iterdir()) if folder.exists() else []
    return len(lines) == 1 and lines[0].startswith("error: ") and not leftovers


def detector_file(folder: Path, width: float = 0.25) -> Path:
    """An untrained MobileNetV3 PatchZero that masks nothing (the cost is the same as a trained one)."""
    net = PSPNet("mobilenet_v3", aux=False, width=width)
    torch.nn.init.constant_(net.head[-1].bias, -30.0)
    path = folder / f"detector-{width:g}.pt"
    save_defense(PatchZero(net, mean=(0.5, 0.5, 0.5), dilate=1), path)
    return path


# ---------------------------------------------------------------- malformed inputs


def malformed(folder: Path, detector: Path, damaged: int, seed: int) -> dict[str, Any]:
    outcomes: dict[str, bool] = {}
    for name, case in MALFORMED.items():
        src = build_case(name, folder)
        out = folder / f"out-{name}" / "clean.mp4"
        result = invoke(["sanitize", str(src), "-o", str(out), "--detector", str(detector)])
        ok = result is not None and result.exit_code == 0 and frame_count(out) == case.frames
        outcomes[name] = ok if case.expect == "ok" else clean_refusal(result, out.parent) or (case.expect == "either" and ok)
    valid = write_video(folder / "valid.mp4", frames=12).read_bytes()
    start, end = mdat_range(valid)
    rng = np.random.default_rng(seed)
    random_clean = 0
    for k in range(damaged):
        hits = int(rng.integers(0, 7))
        data = corrupt(valid, rng.integers(start, end, hits).tolist(), rng.integers(1, 256, hits).tolist())
        src = folder / f"damaged-{k}.mp4"
        src.write_bytes(truncate(data, float(rng.uniform(0.0, 1.0)) if rng.random() < 0.7 else 1.0))
        out = folder / f"out-damaged-{k}" / "clean.mp4"
        result = invoke(["sanitize", str(src), "-o", str(out), "--detector", str(detector)])
        ok = result is not None and result.exit_code == 0 and frame_count(out) == 12
        random_clean += ok or clean_refusal(result, out.parent)
    tried = len(outcomes) + damaged
    return {"tried": tried, "clean": sum(outcomes.values()) + random_clean, "cases": outcomes,
            "damaged": {"tried": damaged, "clean": random_clean}}  # fmt: skip


# ---------------------------------------------------------------- stream faults


def stream_faults(folder: Path, detector: Path) -> dict[str, Any]:
    survived: dict[str, bool] = {}
    for fault in ("drop", "stall", "garbage"):
        out = folder / f"live-{fault}.mp4"
        with FaultyStreamServer([(fault, 40), ("ok", 40)]) as server:
            result = invoke(["watch", server.url, "-o", str(out), "--detector", str(detector), "--timeout", "1",
                             "--reconnect", "1"])  # fmt: skip
        recorded = frame_count(out)
        survived[fault] = result is not None and server.connections == 2 and recorded > 40
    survived["interrupt_during_stall"] = _interrupt_during_stall(folder, detector)
    return {"injected": len(survived), "survived": sum(survived.values()), "faults": survived}


def _interrupt_during_stall(folder: Path, detector: Path) -> bool:
    out = folder / "live-interrupt.mp4"
    interrupted: list[float] = []
    with FaultyStreamServer([("stall", 40)]) as server:

        def interrupt() -> None:
            while server.sent < 40:
                time.sleep(0.05)
            time.sleep(1.0)
            interrupted.append(time.monotonic())
            _thread.interrupt_main()

        threading.Thread(target=interrupt, daemon=True).start()
        runner.invoke(app, ["watch", server.url, "-o", str(out), "--detector", str(detector), "--timeout", "60"])
        stopped = time.monotonic()
    return bool(interrupted) and stopped - interrupted[0] < 3.0 and frame_count(out) > 0


# ---------------------------------------------------------------- kills


def sanitize_kills(folder: Path, detector: Path, kills: int, seed: int) -> dict[str, Any]:
    """Kill times uniform over the writing phase (first partial file .. 110% of a full run's pipeline time)."""
    src = write_video(folder / "kill-in.mp4", frames=240, size=(96, 128), fps=24, audio=True)
    cmd = [*CLI, "sanitize", str(src), "--detector", str(detector)]
    ref = subprocess.run([*cmd, "-o", str(folder / "kill-ref.mp4")], env=ENV, check=True, timeout=600,
                         capture_output=True, text=True)  # fmt: skip
    wall = float(next(line.split("│")[2] for line in ref.stdout.splitlines() if "wall time" in line))
    clean = mid_write = 0
    for k, delay in enumerate(np.random.default_rng(seed).uniform(0.0, 1.1, kills) * wall):
        out = folder / f"kill-{k}" / "clean.mp4"
        code = kill_while_writing([*cmd, "-o", str(out)], out.parent, float(delay), ENV)
        clean += code in (0, -signal.SIGKILL) and (not out.exists() or frame_count(out) == 240)
        mid_write += code == -signal.SIGKILL and not out.exists()
    return {"kills": kills, "clean": clean, "killed_mid_write": mid_write, "pipeline_wall_s": wall}


TRAIN_RECIPE = """
name = "kill-test"
[model]
name = "tiny3d"
[data]
kind = "synthmotion"
root = "{root}"
size = 32
clip_len = 4
frames = 8
videos_per_class = 2
[train]
checkpoint_every = 2
eval_every = 1000
seed = 0
[train.classifier]
steps = {steps}
batch = 4
"""


def train_kill_resume(folder: Path, steps: int = 40) -> dict[str, Any]:
    """``train classifier`` killed mid-run and resumed vs uninterrupted: identical final weights?"""
    from streamguard.checkpoints import load_checkpoint
    from streamguard.data import make_synthmotion

    make_synthmotion(folder / "synth", 2, 0, size=32, frames=8)
    recipe = folder / "train.toml"
    recipe.write_text(TRAIN_RECIPE.format(root=folder / "synth", steps=steps))
    cmd = [*CLI, "train", "classifier", str(recipe)]
    tic = time.monotonic()
    subprocess.run([*cmd, "-o", str(folder / "ref")], env=ENV, check=True, timeout=600, capture_output=True)
    full = time.monotonic() - tic
    state = folder / "run" / "classifier-state.pt"
    proc = subprocess.Popen([*cmd, "-o", str(folder / "run")], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not state.exists() and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.2 * full / 4)
    killed = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step_at_kill = load_checkpoint(state)[1]["step"] if state.exists() else 0
    subprocess.run([*cmd, "-o", str(folder / "run"), "--resume"], env=ENV, check=True, timeout=600, capture_output=True)
    ref, _ = load_checkpoint(folder / "ref" / "classifier.pt")
    got, _ = load_checkpoint(folder / "run" / "classifier.pt")
    same = ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    return {"kills": int(killed), "clean": int(killed and same), "step_at_kill": step_at_kill, "steps": steps}


# ---------------------------------------------------------------- load


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def memory(detector: Path, fps: float, minutes: float, output: Path, size: str = "640x480") -> dict[str, Any]:
    """Sanitize ``minutes`` of wall time of video (at the sustained ``fps``) to ``output``, sampling RSS."""
    from streamguard.patchzero import load_defense

    samples: list[tuple[float, float]] = []
    seconds = fps * minutes * 60 / 25
    with open_source(f"lavfi:testsrc2=size={size}:rate=25:duration={seconds:.2f}") as source:
        pipeline = Pipeline(source, load_defense(detector), clip_len=MEMORY_CLIP_LEN, batch=1, output=output)
        summary = pipeline.run(on_progress=lambda s: samples.append((s.elapsed, _rss_mb())), interval=1.0)
    first = max(r for t, r in samples if t <= 60)
    peak = max(r for _, r in samples)
    return {"minutes": minutes, "size": size, "frames": summary.frames, "fps": round(summary.fps, 2),
            "wall_s": round(summary.wall_time, 1), "rss_first_minute_mb": round(first, 1),
            "rss_peak_mb": round(peak, 1), "rss_growth_mb": round(peak - first, 1)}  # fmt: skip


class _LatencyPipeline(Pipeline):
    """Records every written frame's decode-to-write latency."""

    latencies: list[float]

    def _account(self, item: Item) -> None:
        super()._account(item)
        self.latencies.append(self._latency_last)


def overload(detector: Path, fps: float, seconds: float, size: str = "640x480") -> dict[str, Any]:
    from streamguard.patchzero import load_defense

    rate = max(2, round(2 * fps))
    with open_source(f"lavfi:testsrc2=size={size}:rate={rate},realtime", live=True) as source:
        pipeline = _LatencyPipeline(source, load_defense(detector), clip_len=1, batch=1, duration=seconds)
        pipeline.latencies = []
        summary = pipeline.run()
    lat = np.array(pipeline.latencies[int(0.1 * len(pipeline.latencies)):])  # skip warm-up
    return {"source_fps": rate, "sustained_fps": round(fps, 2), "seconds": seconds, "written": summary.frames,
            "dropped": summary.dropped, "latency_p50_s": round(float(np.percentile(lat, 50)), 3),
            "latency_p99_s": round(float(np.percentile(lat, 99)), 3), "latency_max_s": round(float(lat.max()), 3)}  # fmt: skip


def sustained_fps(detector: Path, clip_len: int, size: str = "640x480", frames: int = 24) -> float:
    """Frames per second the sanitize pipeline sustains (file mode, no output) with ``clip_len``."""
    from streamguard.patchzero import load_defense

    with open_source(f"lavfi:testsrc2=size={size}:rate=25:duration={frames / 25}") as source:
        return Pipeline(source, load_defense(detector), clip_len=clip_len, batch=1).run().fps


# ---------------------------------------------------------------- report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=3.0, help="length of the memory run (30 for the long version)")
    parser.add_argument("--damaged", type=int, default=40, help="random damaged MP4s on top of the named cases")
    parser.add_argument("--kills", type=int, default=4, help="sanitize processes SIGKILLed at random times")
    parser.add_argument("--no-train-kill", action="store_true", help="skip the train kill / resume check")
    parser.add_argument("--overload-seconds", type=float, default=20.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    console = Console()
    report: dict[str, Any] = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
                              "torch_threads": torch.get_num_threads(), "args": {k: str(v) for k, v in vars(args).items()}}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        tiny, light = detector_file(folder, 0.25), detector_file(folder, 1.0)
        steps = [
            ("malformed", lambda: malformed(folder / "m", tiny, args.damaged, args.seed)),
            ("stream_faults", lambda: stream_faults(folder, tiny)),
            ("sanitize_kills", lambda: sanitize_kills(folder, tiny, args.kills, args.seed)),
            ("train_kill", lambda: None if args.no_train_kill else train_kill_resume(folder / "t")),
        ]
        (folder / "m").mkdir()
        (folder / "t").mkdir()
        for name, fn in steps:
            with console.status(f"reliability: {name}"):
                report[name] = fn()
            console.log(name, report[name])
        with console.status("reliability: memory"):
            fps = sustained_fps(light, MEMORY_CLIP_LEN)
            report["memory"] = memory(light, fps, args.minutes, folder / "long.mp4")
        console.log("memory", report["memory"])
        with console.status("reliability: overload"):
            report["overload"] = overload(light, sustained_fps(light, 1), args.overload_seconds)
        console.log("overload", report["overload"])
    console.print(table(report))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"results: {args.output}")


def table(report: dict[str, Any]) -> Table:
    m, s, k, t = report["malformed"], report["stream_faults"], report["sanitize_kills"], report.get("train_kill")
    mem, ov = report["memory"], report["overload"]
    rows = [
        ("malformed inputs handled cleanly", f"{m['clean']} / {m['tried']}"),
        ("stream faults survived", f"{s['survived']} / {s['injected']}"),
        ("sanitize kills leaving no partial output", f"{k['clean']} / {k['kills']}"),
        ("train kills resumed to identical weights", f"{t['clean']} / {t['kills']}" if t else "skipped"),
        (f"peak RSS, first minute vs {mem['minutes']:g} min (MB)",
         f"{mem['rss_first_minute_mb']:.0f} vs {mem['rss_peak_mb']:.0f} (+{mem['rss_growth_mb']:.0f}), {mem['frames']} frames"),
        (f"live latency p50 / p99 at 2x overload ({ov['source_fps']} fps in, {ov['sustained_fps']} sustained)",
         f"{ov['latency_p50_s']:.3f} / {ov['latency_p99_s']:.3f} s, {ov['dropped']} dropped"),
    ]  # fmt: skip
    out = Table(title=f"streamguard reliability ({report['machine']})", title_justify="left")
    out.add_column("check")
    out.add_column("result", justify="right")
    for row in rows:
        out.add_row(*row)
    return out


if __name__ == "__main__":
    main()
