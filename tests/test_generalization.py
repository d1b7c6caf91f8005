"""benchmarks/generalization.py end to end on a video the test makes (the real one is not in CI)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_io import make_video

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "generalization.py"


@pytest.mark.slow
def test_quick_run_reports_every_family_area_and_size(tmp_path: Path) -> None:
    video = make_video(tmp_path / "held-out.mp4", frames=24, audio=False)
    out = tmp_path / "gen"
    subprocess.run([sys.executable, str(BENCH), "--quick", "--video", str(video), "--output", str(out)], check=True,
                   capture_output=True, timeout=900)  # fmt: skip
    result = json.loads(out.with_suffix(".json").read_text())
    families = {(r["family"], r["area"]) for r in result["families"]}
    assert len(families) == 2 * 10 and {f for f, _ in families} >= {"uniform", "blocky", "pgd", "apgd", "cw"}
    for r in result["families"]:
        assert set(r) >= {"model", "320x240", "640x480", "h264", "status", "fooled", "h264_fooled", "change"}
        assert 0 <= r["model"]["recall"] <= 1 and 0 <= r["h264"]["recall"] <= 1 and r["status"] in ("seen", "held out", "unseen")
    change = {r["family"]: r["change"] for r in result["families"] if r["area"] == 0.05}
    assert change["uniform"] > 40 > change["cw"]  # uniform noise replaces the pixels (~85 grey levels); CW nudges them
    assert {r["status"] for r in result["families"] if r["family"] in ("blocky", "cw")} == {"held out"}
    assert "testsrc2 1280x720" in result["benign_fpr"] and "| Family |" in out.with_suffix(".md").read_text()
