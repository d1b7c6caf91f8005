"""Stage 2's race: batched PyTorch patch attacks (checked against ART) and the warm-started pool."""

import numpy as np
import pytest
import torch

from streamguard.attacks import MaskedAttack, patch_mask
from streamguard.data import render_video
from streamguard.detector import PSPNet
from streamguard.models import load_model, tiny3d
from streamguard.patchzero import PatchZero
from streamguard.training.race import PatchPool, PoolEntry, patch_attack


def _setup(n: int = 3) -> tuple[torch.nn.Module, PatchZero, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = tiny3d(num_classes=4, widths=(4, 8, 8, 8)).eval()
    defense = PatchZero(PSPNet("resnet18", width=0.1, aux=False), (0.5, 0.5, 0.5), dilate=1, bpda=True).eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(n, 3, 4, 32, 32, generator=gen)
    y = torch.arange(n) % 4
    mask = torch.from_numpy(np.stack([patch_mask((4, 32, 32), 0.1, s) for s in range(n)]))[:, None]
    z0 = torch.rand(x.shape, generator=gen)
    return model, defense, x, y, mask, z0


@pytest.mark.parametrize("method", ["pgd", "apgd"])
def test_a_continued_attack_is_one_long_attack(method: str) -> None:
    """A pool patch drawn 4 times for 5 iterations is exactly a fresh 20-iteration attack on the same detector."""
    model, defense, x, y, mask, z0 = _setup()
    fresh, fresh_loss, _ = patch_attack(model, defense, x, y, mask, z0, 20, method=method)
    z, state = z0, None
    for _ in range(4):
        z, loss, state = patch_attack(model, defense, x, y, mask, z, 5, method=method, state=state)
    assert torch.equal(z, fresh) and torch.equal(loss, fresh_loss)


def test_apgd_warm_starts_at_a_pools_decayed_step() -> None:
    """Fresh apgd starts at 2 x step; given per-clip ``steps`` it starts there and halves them when stalled."""
    model, defense, x, y, mask, z0 = _setup()
    fresh = patch_attack(model, defense, x, y, mask, z0, 5, method="apgd")
    given = patch_attack(model, defense, x, y, mask, z0, 5, method="apgd", steps=torch.full((len(x),), 0.4))
    assert torch.equal(fresh[0], given[0]) and torch.equal(fresh[2].step, given[2].step)
    small = torch.tensor([0.05, 0.4] * len(x))[: len(x)]
    _, _, state = patch_attack(model, defense, x, y, mask, z0, 5, method="apgd", steps=small)
    assert all(s in (b, b / 2) for s, b in zip(state.step.tolist(), small.tolist()))
    assert not torch.equal(state.best_z, fresh[2].best_z)


def test_attack_stays_in_the_patch_and_in_range_and_freezes_nothing() -> None:
    model, defense, x, y, mask, z0 = _setup()
    with torch.no_grad():
        before = torch.nn.functional.cross_entropy(model(defense(x * (1 - mask) + mask * z0)), y)
    z, loss, _ = patch_attack(model, defense, x, y, mask, z0, 10)
    assert z.min() >= 0 and z.max() <= 1 and torch.equal(z * (1 - mask), z0 * (1 - mask))
    assert loss.mean() > before
    assert all(p.requires_grad for p in defense.parameters()) and all(p.grad is None for p in defense.parameters())


def test_torch_and_art_masked_pgd_agree_on_the_shipped_classifier() -> None:
    """Same settings (DO, eps 1, step 0.2, 10 iterations, 10% squares): similar success on 8 clips."""
    model = load_model("synth-tiny3d").eval()
    videos = [render_video(c, 500 + c, size=64, frames=16)[0] for c in range(0, 12, 3)] * 2
    x = torch.from_numpy(np.stack(videos)).permute(0, 4, 1, 2, 3).float() / 255
    with torch.no_grad():
        y = model(x).argmax(1)
    mask = torch.from_numpy(np.stack([patch_mask((16, 64, 64), 0.10, s) for s in range(len(x))]))[:, None]
    art = MaskedAttack(model, "pgd", "do", eps=1.0, step=0.2, iters=10, seed=0)
    x_art = torch.from_numpy(art.generate(x.numpy(), y.numpy(), mask.numpy()))
    z, _, _ = patch_attack(model, None, x, y, mask, torch.rand(x.shape, generator=torch.Generator().manual_seed(0)), 10)
    with torch.no_grad():
        fooled_art = (model(x_art).argmax(1) != y).float().mean().item()
        fooled_torch = (model(x * (1 - mask) + mask * z).argmax(1) != y).float().mean().item()
    assert fooled_art >= 0.5 and abs(fooled_art - fooled_torch) <= 0.25, (fooled_art, fooled_torch)


def test_pool_refreshes_and_round_trips() -> None:
    rng = np.random.default_rng(0)

    def make(video: int, rng: np.random.Generator) -> PoolEntry:
        return PoolEntry(video, torch.ones(1, 2, 4, 4), torch.from_numpy(rng.random((3, 2, 4, 4), dtype=np.float32)))

    pool = PatchPool.fresh(5, make, n_videos=3, rng=rng)
    assert len(pool.entries) == 5 and {e.video for e in pool.entries} <= {0, 1, 2}
    for i in pool.draw(2, rng):
        pool.entries[i].iters, pool.entries[i].draws, pool.entries[i].fooled, pool.entries[i].step = 8, 2, True, 0.1
    assert pool.success() == 1.0
    copy = PatchPool([], make, 3)
    copy.load_state_dict(pool.state_dict())
    keys = [(e.video, e.iters, e.draws, e.fooled, e.step) for e in pool.entries]
    assert [(e.video, e.iters, e.draws, e.fooled, e.step) for e in copy.entries] == keys and 0.1 in {k[-1] for k in keys}
    assert all(torch.equal(a.content, b.content) for a, b in zip(copy.entries, pool.entries))
    pool.refresh(5, rng)
    assert sum(e.iters for e in pool.entries) == 0


def test_procedural_patches_cover_every_family_shape_and_pass() -> None:
    """Every texture renders in range; shapes cover about their area; codec passes keep the clip's shape."""
    from streamguard.patches import (
        SHAPES,
        TEXTURES,
        compressed,
        procedural_patch,
        shape_mask,
        texture,
    )

    rng = np.random.default_rng(0)
    for family in TEXTURES:
        t = texture(family, 9, 13, rng)
        assert t.shape == (3, 9, 13) and t.min() >= 0 and t.max() <= 1 and t.std() > 0 or family == "colour"
    for kind in SHAPES:
        m = shape_mask((4, 64, 64), 0.10, rng, kind)
        assert abs(m[0].mean() - 0.10) < 0.02 and all(np.array_equal(m[0], f) for f in m)  # fixed over the clip
    moving = shape_mask((8, 64, 64), 0.05, np.random.default_rng(3), "square", moving=True)
    assert not np.array_equal(moving[0], moving[-1])
    clip = torch.rand(3, 4, 32, 32)
    for codec, q in (("jpeg", 50), ("h264", 30)):
        out = compressed(clip, codec, q)
        assert out.shape == clip.shape and 0 < (out - clip).abs().mean() < 0.3  # white noise: the worst case for a codec
        assert torch.equal(out, compressed(clip, codec, q))  # deterministic
    x, m, draw = procedural_patch(clip, np.random.default_rng(5), ["stripes"], codec=0.0)
    assert draw.family == "stripes" and m.shape == (1, 4, 32, 32) and torch.equal(x * (1 - m), clip * (1 - m))


@pytest.mark.slow
def test_torch_and_art_masked_pgd_agree_on_the_shipped_frame_detector() -> None:
    """The race's frame attack (FrameDetectorTask's box loss) against ART's MaskedFrameAttack, same
    settings (DO, eps 1, step 0.2, 10 iterations, 10% squares over the object's first place, both
    from the clean frames, as ART starts): a similar drop of box AP50 on 4 clips of 8 frames."""
    from streamguard.attacks import MaskedFrameAttack
    from streamguard.training.race import FrameDetectorTask

    model = load_model("synth-frcnn").eval()
    rendered = [render_video(c, 700 + c, size=64, frames=8) for c in range(0, 12, 3)]
    x = torch.from_numpy(np.stack([f for f, _, _ in rendered])).permute(0, 4, 1, 2, 3).float() / 255
    targets = [[{"boxes": torch.from_numpy(b[None]), "labels": torch.ones(1, dtype=torch.int64)} for b in boxes]
               for _, boxes, _ in rendered]  # fmt: skip
    mask = torch.zeros_like(x[:, :1])
    for i, (_, boxes, _) in enumerate(rendered):  # a 20x20 square (10%) on the object where it starts
        cx, cy = int((boxes[0, 0] + boxes[0, 2]) / 2), int((boxes[0, 1] + boxes[0, 3]) / 2)
        top, left = min(max(cy - 10, 0), 44), min(max(cx - 10, 0), 44)
        mask[i, :, :, top : top + 20, left : left + 20] = 1
    task = FrameDetectorTask(model)
    art = MaskedFrameAttack(model, "do", eps=1.0, step=0.2, iters=10, seed=0)
    x_art = torch.from_numpy(art.generate(x.numpy(), targets, mask.numpy()))
    torch.manual_seed(0)
    z, _, _ = patch_attack(model, None, x, targets, mask, x.clone(), 10)
    clean, by_art, by_torch = task.score(x, targets), task.score(x_art, targets), task.score(x * (1 - mask) + mask * z, targets)
    assert clean >= 0.6 and by_art <= clean - 0.2, (clean, by_art)
    assert abs(by_art - by_torch) <= 0.2, (clean, by_art, by_torch)
