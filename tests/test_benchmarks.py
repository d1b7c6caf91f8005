"""benchmarks/defense_speed.py: PatchCleanser's double masking and a --quick end-to-end run."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import Tensor, nn

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "defense_speed.py"


@pytest.fixture(scope="module")
def ds() -> Iterator[ModuleType]:
    spec = importlib.util.spec_from_file_location("defense_speed", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


class Constant(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return torch.zeros(len(x), 4).index_fill_(1, torch.tensor([2]), 1.0)


@pytest.mark.parametrize("image,patch,k,count", [(32, 5, 3, 9), (48, 7, 4, 16), (30, 12, 6, 25), (30, 30, 2, 1)])
def test_mask_set_covers_every_patch_position(ds: ModuleType, image: int, patch: int, k: int, count: int) -> None:
    size, stride = ds.mask_geometry(image, patch, k)
    masks = ds.mask_set((image, image), (size, size), (stride, stride))
    assert masks.shape == (count, 1, image, image)
    for y in range(image - patch + 1):
        for x in range(image - patch + 1):
            assert masks[:, 0, y : y + patch, x : x + patch].flatten(1).all(1).any(), (y, x)


def test_double_masking_agreed_uses_one_round(ds: ModuleType) -> None:
    r = ds.double_masking_predict(Constant(), torch.rand(3, 24, 24), 10, 7)
    assert (r.label, r.case, r.inferences) == (2, "agreed", 9)


def steered(ds: ModuleType, rule, k: int = 3, size: int = 24, classes: int = 10):
    mask_size, stride = ds.mask_geometry(size, 4, k)
    masks = ds.mask_set((size, size), (mask_size,) * 2, (stride,) * 2)
    model = ds.Steered(Constant(), masks, ds.IMAGENET_MEAN, rule, classes)
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0)) * 0.9 + 0.05
    return ds.double_masking_predict(model, x, mask_size, stride)


def test_double_masking_confirms_a_disagreer_in_round_two(ds: ModuleType) -> None:
    # mask 4 hides the "patch": with it the label is 7 whatever else is masked; otherwise 1
    r = steered(ds, lambda masks: 7 if 4 in masks else 1)
    assert (r.label, r.case, r.inferences) == (7, "disagreer", 9 + 9)


def test_double_masking_unconfirmed_disagreers_fall_back_to_majority(ds: ModuleType) -> None:
    # round one: 0,1,0,1,... (majority 0, four disagreers); round two never unanimous
    r = steered(ds, lambda masks: masks[0] % 2 if len(masks) == 1 else len(masks) % 3, classes=3)
    assert (r.label, r.case, r.inferences) == (0, "majority", 9 + 4 * 9)


def test_forced_cases_cost_what_they_claim(ds: ModuleType) -> None:
    assert steered(ds, ds.best_rule).inferences == 9
    worst = steered(ds, ds.worst_rule(10))
    assert (worst.case, worst.inferences) == ("majority", 9 + 8 * 9)  # labels 0..8: 8 disagree with 0


def test_quick_run_writes_complete_json(ds: ModuleType, tmp_path: Path) -> None:
    out = tmp_path / "speed.json"
    ds.main(["--quick", "--json", str(out), "--threads", "1"])
    torch.set_num_threads(1)
    result = json.loads(out.read_text())
    settings = result["settings"]
    assert settings["quick"] and settings["threads"] == 1 and settings["repeats"] == 1
    assert settings["torch"] == torch.__version__ and settings["device"] == "cpu"
    assert [r["model"] for r in result["clips"]] == ["tiny3d", "mars"]
    ratios = [r["ratio"] for r in result["clips"]] + [result["frames"][k] for k in ("ratio_best", "ratio_worst")]
    assert all(math.isfinite(v) and v > 0 for v in ratios)
    for r in result["clips"]:
        assert r["input_shape"] == [3, 4, 32, 32] and len(r["times_s"]["defended"]) == 1
    frames = result["frames"]
    assert frames["masks"]["count"] == 9
    assert frames["double_masking"]["best"] == {"case": "agreed", "inferences": 9}
    assert frames["double_masking"]["worst"] == {"case": "majority", "inferences": 81}
    assert all(frames["seconds"][k] > 0 for k in ("double_masking_worst", "double_masking_best"))  # no time comparison: it fails on a loaded machine
