"""`streamguard export`: the detector as ONNX, run by ONNX Runtime, agrees with PyTorch."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from streamguard.cli import app
from streamguard.detector import PSPNet
from streamguard.errors import CheckpointError, ConfigError
from streamguard.export import FixedAdaptivePool, export_onnx, pool_matrix
from streamguard.patchzero import (
    PatchZero,
    build_defense,
    load_onnx_defense,
    save_defense,
)

pytest.importorskip("onnxruntime")  # in the dev extra; `pip install 'streamguard[onnx]'` for users


@pytest.mark.parametrize("n, bins", [(8, 1), (8, 3), (8, 6), (7, 2), (5, 6), (12, 6)])
def test_fixed_pool_is_adaptive_average_pooling(n: int, bins: int) -> None:
    x = torch.randn(2, 3, n, n + 1)
    expected = F.adaptive_avg_pool2d(x, bins)
    torch.testing.assert_close(FixedAdaptivePool(bins, n, n + 1)(x), expected)
    assert torch.allclose(pool_matrix(n, bins).sum(1), torch.ones(bins))


def tiny_defense(input_size: tuple[int, int] | None = (32, 32)) -> PatchZero:
    torch.manual_seed(0)
    detector = PSPNet("mobilenet_v3", aux=True, width=0.1, refine=True).eval()
    return PatchZero(detector, (0.4, 0.5, 0.6), dilate=1, input_size=input_size).eval()


def test_onnx_runtime_matches_pytorch_and_sanitizes_the_same(tmp_path: Path) -> None:
    defense = tiny_defense()
    path = export_onnx(defense, tmp_path / "det.onnx", source="tiny")
    frames = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))  # a batch size it was not traced with
    exported = load_onnx_defense(path)
    with torch.inference_mode():
        torch.testing.assert_close(exported.detector(frames), defense.detector(frames), rtol=1e-4, atol=1e-4)
        clip = torch.rand(2, 3, 8, 96, 96, generator=torch.Generator().manual_seed(2))  # resized to the working size
        clip[:, :, :, 10:40, 10:40] = 1.0
        (a, ma), (b, mb) = defense.sanitize(clip), build_defense(weights=path).sanitize(clip)
    assert torch.equal(ma, mb) and torch.allclose(a, b)
    assert exported.input_size == defense.input_size and exported.dilate == 1


def test_a_tampered_graph_or_missing_meta_is_refused(tmp_path: Path) -> None:
    path = export_onnx(tiny_defense(), tmp_path / "det.onnx")
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load_onnx_defense(path)
    path.with_suffix(".json").unlink()
    with pytest.raises(CheckpointError, match="det.json"):
        load_onnx_defense(path)
    with pytest.raises(ConfigError, match="--imgsz"):
        export_onnx(tiny_defense(None), tmp_path / "no-size.onnx")


def test_cli_exports_and_checks(tmp_path: Path) -> None:
    weights = tmp_path / "tiny.pt"
    save_defense(tiny_defense(), weights)
    result = CliRunner().invoke(app, ["export", str(weights), "-o", str(tmp_path / "out.onnx"), "--imgsz", "48"])
    assert result.exit_code == 0, result.output
    assert "max |logit difference|" in result.output and (tmp_path / "out.json").is_file()
    assert load_onnx_defense(tmp_path / "out.onnx").input_size == (48, 48)
    result = CliRunner().invoke(app, ["export", str(weights), "-o", str(tmp_path / "out.pt")])
    assert result.exit_code == 2 and "ends in .onnx" in result.output and "Traceback" not in result.output
