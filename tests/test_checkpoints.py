import json
from pathlib import Path

import pytest
import torch

from streamguard import checkpoints
from streamguard.checkpoints import (
    Weights,
    get_weights,
    load_checkpoint,
    save_checkpoint,
    sha256_file,
)
from streamguard.errors import CheckpointError


def _state() -> dict[str, torch.Tensor]:
    return {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(3)}


def test_round_trip_with_meta_and_hash(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    digest = save_checkpoint(path, _state(), {"model": "tiny3d", "mean": [0.5, 0.5, 0.5]})
    assert digest == sha256_file(path)
    state, meta = load_checkpoint(path, sha256=digest)
    assert torch.equal(state["w"], _state()["w"]) and meta["model"] == "tiny3d"
    assert not list(tmp_path.glob(".*tmp")), "temporary file left behind"


def test_tampered_and_truncated_files_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    digest = save_checkpoint(path, _state(), {})
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(path, sha256=digest)
    path.write_bytes(bytes(data[: len(data) // 3]))
    with pytest.raises(CheckpointError, match="cannot load"):
        load_checkpoint(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")


class _Evil:
    def __reduce__(self):  # noqa: D105 - pickle payload
        return (print, ("pwned",))


def test_arbitrary_objects_are_never_unpickled(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.ones(1)}, "meta": {"x": _Evil()}}, path)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    assert "pwned" not in capsys.readouterr().out


def test_bare_state_dict_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "bare.pt"
    torch.save(_state(), path)
    state, meta = load_checkpoint(path)
    assert set(state) == {"w", "b"} and meta == {}


def test_get_weights_by_name_and_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "net.pt"
    digest = save_checkpoint(path, _state(), {"kind": "test"})
    (tmp_path / "manifest.json").write_text(json.dumps({"net": {"file": "net.pt", "sha256": digest, "meta": {"a": 1}}}))
    monkeypatch.setattr(checkpoints, "WEIGHTS_DIR", tmp_path)
    shipped = get_weights("net")
    assert shipped.sha256 == digest and shipped.load()[1] == {"a": 1, "kind": "test"}
    assert get_weights(str(path)).path == path
    assert get_weights(shipped) is shipped
    with pytest.raises(CheckpointError, match="weights not found"):
        get_weights("no-such-weights")
    path.write_bytes(path.read_bytes() + b"x")
    with pytest.raises(CheckpointError, match="sha256"):
        Weights("net", path, digest).load()


def test_interpolate_mixes_two_checkpoints_in_weight_space(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util
    import sys

    script = Path(__file__).resolve().parents[1] / "experiments" / "interpolate.py"
    spec = importlib.util.spec_from_file_location("interpolate", script)
    interpolate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(interpolate)
    a = {"w": torch.zeros(2, 3), "bn.num_batches_tracked": torch.tensor(5)}
    b = {"w": torch.full((2, 3), 4.0), "bn.num_batches_tracked": torch.tensor(9)}
    save_checkpoint(tmp_path / "a.pt", a, {"backbone": "x"})
    save_checkpoint(tmp_path / "b.pt", b, {"backbone": "y"})
    ends = [str(tmp_path / "a.pt"), str(tmp_path / "b.pt")]
    monkeypatch.setattr(sys, "argv", ["interpolate.py", *ends, "--alpha", "0.25", "1", "--out-dir", str(tmp_path / "mix")])
    interpolate.main()
    quarter, meta = load_checkpoint(tmp_path / "mix" / "mix-0.25.pt")
    assert torch.allclose(quarter["w"], torch.ones(2, 3)) and int(quarter["bn.num_batches_tracked"]) == 9
    assert meta["backbone"] == "y" and meta["mix"]["alpha"] == 0.25
    end, _ = load_checkpoint(tmp_path / "mix" / "mix-1.pt")
    assert torch.equal(end["w"], b["w"])
    with pytest.raises(SystemExit, match="different parameters"):
        interpolate.mix(a, {"v": torch.zeros(1)}, 0.5)
