"""Training under torchrun: two gloo ranks on the CPU take the same steps as one process."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from streamguard.checkpoints import load_checkpoint
from streamguard.data import make_synthmotion
from streamguard.errors import ConfigError
from streamguard.training.distributed import Dist, data_parallel, sync_batchnorm


def test_rows_split_any_batch_and_weights_restore_the_whole_batch_mean() -> None:
    for world, n in [(2, 4), (2, 9), (3, 10), (4, 4)]:
        ranks = [Dist(r, world) for r in range(world)]
        rows = [d.rows(n) for d in ranks]
        assert [i for r in rows for i in range(r.start, r.stop)] == list(range(n))
        assert max(r.stop - r.start for r in rows) - min(r.stop - r.start for r in rows) <= 1
        assert sum(d.weight(n) for d in ranks) == pytest.approx(world)  # DDP divides by world: the mean
    assert Dist().rows(5) == slice(0, 5) and Dist().weight(5) == 1
    with pytest.raises(ConfigError, match="cannot be split"):
        Dist(0, 4).rows(3)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2), nn.BatchNorm1d(2))


def _rank(rank: int, world: int, store: str, x: torch.Tensor, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    d, net = Dist(rank, world), _net()
    ddp = data_parallel(net, d, torch.device("cpu"))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(2):
        loss = ddp(x[d.rows(len(x))]).square().mean() * d.weight(len(x))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    if rank == 0:
        torch.save(net.state_dict(), out)
    dist.destroy_process_group()


def test_two_gloo_ranks_with_global_batchnorm_equal_one_process(tmp_path: Path) -> None:
    x = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(1))  # 3 + 2 rows: unequal shares
    mp.spawn(_rank, args=(2, str(tmp_path / "store"), x, str(tmp_path / "ranks.pt")), nprocs=2)
    net = _net()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(2):
        loss = net(x).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    ranks = torch.load(tmp_path / "ranks.pt", weights_only=True)
    assert ranks.keys() == net.state_dict().keys()
    for key, value in net.state_dict().items():  # weights and running statistics
        torch.testing.assert_close(ranks[key], value, rtol=1e-5, atol=1e-6, msg=key)
    plain = _net()
    assert not torch.allclose(ranks["1.running_mean"], plain.state_dict()["1.running_mean"])  # it did train


def test_sync_batchnorm_keeps_the_state_dict_and_the_eval_output() -> None:
    net, ref = _net().eval(), _net().eval()
    before = net.state_dict()
    sync_batchnorm(net, torch.device("cpu"))
    assert type(net[1]).__name__ == "GlobalBatchNorm" and net.state_dict().keys() == before.keys()
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(net(x), ref(x))


@pytest.mark.slow
def test_torchrun_trains_the_classifier_like_one_process(tmp_path: Path) -> None:
    """``torchrun --nproc_per_node 2 streamguard train classifier`` (gloo) reaches one process's weights."""
    synth = make_synthmotion(tmp_path / "synth", videos_per_class=2, seed=0, size=32, frames=12)
    outputs = {}
    for name, launcher in [("one", []), ("two", ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"])]:
        toml = tmp_path / f"{name}.toml"
        toml.write_text(
            f'[model]\nname = "tiny3d"\nnum_classes = 12\n[data]\nroot = "{synth}"\nsize = 32\nclip_len = 8\nframes = 12\n'
            f'[train]\noutput = "{tmp_path / name}"\neval_every = 100\n[train.classifier]\nsteps = 3\nbatch = 6\nlr = 1e-2\n'
        )
        cmd = [sys.executable, *launcher, "-m", "streamguard", "train", "classifier", str(toml)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "STREAMGUARD_NO_PROGRESS": "1"}
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        outputs[name] = load_checkpoint(tmp_path / name / "classifier.pt")[0]
    one, two = outputs["one"], outputs["two"]
    assert one.keys() == two.keys()
    for key in one:  # Adam divides by sqrt(v): float rounding moves a few near-zero-gradient weights by ~1e-5
        torch.testing.assert_close(two[key].float(), one[key].float(), rtol=1e-4, atol=2e-4, msg=key)
    moved = max((one[k].float() - torch.zeros_like(one[k].float())).abs().max().item() for k in one if k.endswith("running_mean"))
    assert moved > 1e-3  # batch-norm statistics moved: the ranks trained


@pytest.mark.slow
def test_torchrun_trains_both_detector_stages(tmp_path: Path) -> None:
    """Stage 1 (attack cache shared out across the ranks, then the detector) reaches one process's
    weights; the race runs with each rank attacking its share of the drawn pool entries."""
    from streamguard.models import build_model, save_model
    from streamguard.patchzero import load_defense

    synth = make_synthmotion(tmp_path / "synth", videos_per_class=2, seed=0, size=32, frames=12)
    torch.manual_seed(0)
    save_model(build_model("tiny3d", 12, widths=(4, 4, 8, 8), clip_len=8, size=32), tmp_path / "victim.pt")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "STREAMGUARD_NO_PROGRESS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    runs = {}
    for name, launcher in [("one", [sys.executable]), ("two", torchrun)]:
        toml = tmp_path / f"{name}.toml"
        toml.write_text(
            f'[model]\nname = "tiny3d"\nnum_classes = 12\nweights = "{tmp_path / "victim.pt"}"\n[defense]\nwidth = 0.1\n'
            f'[data]\nroot = "{synth}"\nsize = 32\nclip_len = 8\nframes = 12\n[attack]\niters = 2\nbatch = 4\n'
            f'[train]\noutput = "{tmp_path / name}"\ncache = "{tmp_path / name / "cache"}"\nbatch = 4\nlr = 1e-3\n'
            f'steps = 2\neval_every = 2\neval_videos = 4\n[train.race]\npool = 4\ndraw = 2\niters = 1\nbenign = 1\n'
        )
        for stage in ("1", "2"):
            cmd = [*launcher, "-m", "streamguard", "train", "detector", str(toml), "--stage", stage]
            done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
            assert done.returncode == 0, done.stderr[-2000:]
        runs[name] = tmp_path / name
    assert sorted(p.name for p in (runs["one"] / "cache").glob("0*.pt")) == sorted(p.name for p in (runs["two"] / "cache").glob("0*.pt"))
    for entry in (runs["one"] / "cache").glob("0*.pt"):  # the same attacks, whichever rank made them
        a, b = (torch.load(r / "cache" / entry.name, weights_only=True) for r in runs.values())
        assert torch.equal(a["clip"], b["clip"]) and torch.equal(a["mask"], b["mask"])
    one, two = (load_checkpoint(r / "detector-stage1.pt")[0] for r in runs.values())
    close = [k for k in one if torch.allclose(two[k].float(), one[k].float(), rtol=1e-4, atol=2e-5)]
    assert len(close) >= 0.95 * len(one)
    # the rest: batch-norm biases whose gradient is zero up to rounding (a batch norm follows), which
    # Adam's g / sqrt(v) turns into steps of up to lr (1e-3) in either direction
    for key in one:
        torch.testing.assert_close(two[key].float(), one[key].float(), rtol=0, atol=1e-3, msg=key)
    race = load_defense(runs["two"] / "detector-stage2.pt")
    assert load_checkpoint(runs["two"] / "detector-stage2.pt")[1]["stage"] == 2 and race.detector is not None
