"""Sharded evaluation: ``evaluate(..., shard=(K, N))`` runs every N-th chunk; merged shards == one run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_evaluation import CountingClips, _model, _patchzero, _recipe
from typer.testing import CliRunner

from streamguard.cli import app
from streamguard.errors import ConfigError, InputError
from streamguard.evaluation import Report, evaluate, report_markdown
from streamguard.evaluation.grid import parse_shard, shard_chunks
from streamguard.evaluation.report import find_shard_reports, merge_reports, save_merged

LABELS = [0, 1, 2, 0, 1, 2]  # six videos, attack.batch = 2: three chunks, so shard 0 of 2 runs chunks 0 and 2


def _evaluate(out: Path, shard: tuple[int, int] | None = None) -> Report:
    return evaluate(_recipe(out), model=_model(), patchzero=_patchzero(), dataset=CountingClips(LABELS), shard=shard)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    # one output folder (the recipe, output included, is part of the report): the single run writes
    # OUT/report.json, the shards OUT/shard-K-of-2/
    out = tmp_path_factory.mktemp("eval")
    single = _evaluate(out)
    shards = [_evaluate(out, (k, 2)) for k in range(2)]
    return {"single": single, "single_json": single.path.read_text(), "shards": shards, "out": out}


def test_shard_chunks_keep_the_single_runs_chunks() -> None:
    order = [5, 3, 0, 1, 4, 2, 6]
    assert shard_chunks(order, 2, None) == [(0, [5, 3]), (1, [0, 1]), (2, [4, 2]), (3, [6])]
    assert shard_chunks(order, 2, (0, 2)) == [(0, [5, 3]), (2, [4, 2])]
    assert shard_chunks(order, 2, (1, 2)) == [(1, [0, 1]), (3, [6])]
    assert shard_chunks(order, 2, (4, 5)) == []  # more shards than chunks: an empty shard
    assert parse_shard("1/4") == (1, 4)
    for bad in ("4/4", "-1/2", "1", "a/b", "0/0"):
        with pytest.raises(ConfigError):
            parse_shard(bad)


def test_shards_write_their_own_output_and_split_the_videos(runs: dict) -> None:
    single, shards, out = runs["single"], runs["shards"], runs["out"]
    order = single.settings["videos"]
    assert [s.settings["videos"] for s in shards] == [order[0:2] + order[4:6], order[2:4]]
    for k, s in enumerate(shards):
        assert s.path == out / f"shard-{k}-of-2" / "report.json"
        assert (out / f"shard-{k}-of-2" / "samples.jsonl").is_file()
        assert s.settings["shard"] == {"index": k, "count": 2, "order": order}


def test_merged_shards_equal_the_single_run(runs: dict) -> None:
    single, shards, out = runs["single"], runs["shards"], runs["out"]
    merged = merge_reports(list(reversed(shards)))  # any order of the shards
    assert merged.samples == single.samples  # same seeds per chunk: identical per-sample results
    assert merged.to_dict() == single.to_dict()
    assert report_markdown(merged) == report_markdown(single)
    path = save_merged(merged, out)  # over the single run's output
    assert path.read_text() == runs["single_json"]  # report.json byte for byte
    # the merged samples.jsonl is a log a later single run resumes from without recomputing anything
    data = CountingClips(LABELS)
    again = evaluate(_recipe(out), model=_model(), patchzero=_patchzero(), dataset=data)
    assert data.loaded == [] and again.samples == single.samples


def test_merge_refuses_incomplete_or_mixed_shards(runs: dict, tmp_path: Path) -> None:
    shards = runs["shards"]
    with pytest.raises(InputError, match="missing shard"):
        merge_reports(shards[:1])
    with pytest.raises(ConfigError, match="twice"):
        merge_reports([shards[0], shards[0], shards[1]])
    with pytest.raises(InputError, match="not a shard report"):
        merge_reports([runs["single"]])
    other = Report({**shards[1].settings, "fingerprint": "0" * 16}, shards[1].samples, tmp_path / "x.json")
    with pytest.raises(ConfigError, match="other settings"):
        merge_reports([shards[0], other])
    with pytest.raises(InputError, match="no shard report"):
        find_shard_reports([tmp_path])


def test_cli_merge_and_shard_option(runs: dict, tmp_path: Path) -> None:
    out, single = runs["out"], runs["single"]
    merged_out = tmp_path / "merged"
    result = CliRunner().invoke(app, ["merge", str(out), "--output", str(merged_out), "--markdown", str(tmp_path / "t.md")])
    assert result.exit_code == 0, result.output
    assert "Table 4" in result.output and "Table 5a" in result.output
    assert json.loads((merged_out / "report.json").read_text()) == single.to_dict()
    assert (tmp_path / "t.md").read_text() == report_markdown(single)
    dirs = [str(out / "shard-1-of-2"), str(out / "shard-0-of-2" / "report.json")]  # folders or files
    assert CliRunner().invoke(app, ["merge", *dirs, "--output", str(tmp_path / "m2")]).exit_code == 0
    missing = CliRunner().invoke(app, ["merge", dirs[0], "--output", str(tmp_path / "m3")])
    assert missing.exit_code == 3 and "missing shard(s) 0/2" in missing.output
    bad = CliRunner().invoke(app, ["evaluate", "synth-clip", "--shard", "2/2"])
    assert bad.exit_code == 2 and "shard 2/2" in bad.output
