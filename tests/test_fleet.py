"""``watch`` with many sources: one model, per-stream outputs and status, failures isolated."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_cli_sanitize import ckpts, runner  # noqa: F401 (fixture)

from streamguard.cli import app
from streamguard.detector import PSPNet
from streamguard.errors import InputError
from streamguard.fleet import expand_sources, read_streams_file, stream_names
from streamguard.patchzero import PatchZero


def test_stream_names_are_short_unique_and_file_safe() -> None:
    names = stream_names(["lavfi:testsrc2=size=64x48", "rtsp://user@cam1:8554/live?x=1", "/videos/a b.mp4",
                          "lavfi:testsrc2=size=32x32", "/dev/video0"])  # fmt: skip
    assert names == ["testsrc2", "cam1-8554-live", "a-b", "testsrc2-2", "video0"]


def test_streams_file_lines_comments_and_errors(tmp_path: Path) -> None:
    f = tmp_path / "site.streams"
    f.write_text("# cameras\nrtsp://cam1/live\n\n  lavfi:testsrc  # a test graph\n")
    assert read_streams_file(f) == ["rtsp://cam1/live", "lavfi:testsrc"]
    assert expand_sources(["x.mp4", str(f)]) == ["x.mp4", "rtsp://cam1/live", "lavfi:testsrc"]
    (tmp_path / "empty.streams").write_text("# nothing\n")
    with pytest.raises(InputError, match="no sources"):
        read_streams_file(tmp_path / "empty.streams")


def test_forked_defenses_share_the_network_but_not_the_ema_state() -> None:
    torch.manual_seed(0)
    defense = PatchZero(PSPNet("mobilenet_v3", aux=False, width=0.1), (0.5, 0.5, 0.5), temporal="ema").eval()
    twin = defense.fork()
    assert twin.detector is defense.detector
    a, b = torch.rand(1, 3, 4, 32, 32), torch.rand(1, 3, 4, 32, 32)
    with torch.no_grad():
        defense(a)
        twin(b)
        assert not torch.equal(defense._state, twin._state)
        fresh = PatchZero(defense.detector, (0.5, 0.5, 0.5), temporal="ema").eval()
        fresh(b)
        assert torch.equal(fresh._state, twin._state)  # the twin never saw stream a


def test_watch_serves_several_sources_and_reports_a_failed_one(tmp_path: Path, ckpts: dict[str, Path]) -> None:  # noqa: F811
    streams = tmp_path / "site.streams"
    streams.write_text("lavfi:smptebars=size=48x32:rate=25\n")
    out, preds = tmp_path / "rec", tmp_path / "pred"
    args = ["watch", "lavfi:testsrc=size=32x32:rate=25", str(streams), str(tmp_path / "absent.mp4"), "--duration", "1.5",
            "--model", str(ckpts["model"]), "--detector", str(ckpts["none"]), "-o", str(out), "--predictions", str(preds)]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 5, result.output  # a stream failed: StreamError
    assert "1 of 3 streams failed: absent" in result.output and "Traceback" not in result.output
    assert sorted(p.name for p in out.iterdir()) == ["smptebars.mp4", "testsrc.mp4"]
    for name in ("smptebars", "testsrc"):
        lines = [json.loads(line) for line in (preds / f"{name}.jsonl").read_text().splitlines()]
        assert any("topk" in r for r in lines)
    assert "2 streams, one model" not in result.output and "3 streams, one model" in result.output
    bad = runner.invoke(app, ["watch", "lavfi:testsrc", "lavfi:smptebars", "-o", str(tmp_path / "x.mp4"),
                              "--detector", str(ckpts["none"])])  # fmt: skip
    assert bad.exit_code == 2 and "outputs are folders" in bad.output
