"""Can a small video CNN learn to tell two SynthMotion classes apart, when appearance cannot help?

    python experiments/rotation_probe.py [--variant tiny3d] [--steps 400] [--classes RotateClockwise RotateCounterClockwise]
                                         [--synth-train-videos N]

A binary task on the recipe's clips of two classes: the train clips, each also mirrored and/or
played backwards with its label swapped (:func:`streamguard.training.mirror_clips`; both classes
must be one symmetry's pair), so a network that memorizes appearance is at chance. Prints the
training loss and the test accuracy every 50 steps. Seeded (torch 0), AdamW lr 3e-3 with warm-up
and cosine decay, batch 32, the classifier's augmentation (shift 4). ``--synth-train-videos N`` uses
the train and test splits of the larger tree that ``streamguard train classifier --synth-train-videos
N`` trains on (generated when missing).

Variants: ``tiny3d`` (the benchmark classifier without its vortex features), ``tiny3d-notpool`` (no temporal stride in the stem
pooling), ``tiny3d-nopool`` (no stem pooling), ``tiny3d-diff`` (frame differences as 3 more input
channels), ``tiny3d-energy`` (motion-energy products -I_t I_x, -I_t I_y as 2 more channels, so local
flow is a first-order input), ``pairs`` (a full-resolution 2D CNN on frame triplets t, t+2, t+4),
``tiny3d-vortex`` (tiny3d with :class:`streamguard.models.VortexPool` features at 2, 3 and 5 px, as
the shipped classifier).
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from streamguard.data import SYNTH_SYMMETRIES, recipe_clips
from streamguard.models import Tiny3d
from streamguard.recipes import DataSection, load_recipe
from streamguard.training import synth_train_recipe, augment_clips, mirror_clips


def _motion_diff(x: Tensor) -> Tensor:
    """``(B, 3, T, H, W)`` -> its temporal differences, 0 for the last frame."""
    return torch.cat([x[:, :, 1:] - x[:, :, :-1], torch.zeros_like(x[:, :, :1])], 2)


def _motion_energy(x: Tensor) -> Tensor:
    """``(B, 3, T, H, W)`` -> ``(B, 2, T, H, W)``: -I_t I_x and -I_t I_y of the grey clip (signed flow proxies)."""
    g = x.mean(1, keepdim=True)
    gt = torch.cat([g[:, :, 1:2] - g[:, :, :1], (g[:, :, 2:] - g[:, :, :-2]) / 2, g[:, :, -1:] - g[:, :, -2:-1]], 2)
    gx = F.pad(g[..., 2:] - g[..., :-2], (1, 1)) / 2
    gy = F.pad(g[..., 2:, :] - g[..., :-2, :], (0, 0, 1, 1)) / 2
    return torch.cat([-gt * gx, -gt * gy], 1)


class ExtraChannels(nn.Module):
    """tiny3d whose stem also takes ``extra(x)`` (times ``gain``) as input channels."""

    def __init__(self, extra: str, channels: int, gain: float) -> None:
        super().__init__()
        self.net, self.extra, self.gain = Tiny3d(2), {"diff": _motion_diff, "energy": _motion_energy}[extra], gain
        c = self.net.stem[0]
        self.net.stem[0] = nn.Conv3d(3 + channels, c.out_channels, c.kernel_size, c.stride, c.padding, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(torch.cat([x, self.gain * self.extra(x)], 1))


class Triplets(nn.Module):
    """2D CNN at full resolution on frames (t, t+2, t+4) stacked as 9 channels; logits averaged over t."""

    def __init__(self) -> None:
        super().__init__()

        def block(cin: int, cout: int, k: int, stride: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, k, stride, k // 2), nn.BatchNorm2d(cout), nn.ReLU()]

        self.f = nn.Sequential(
            *block(9, 32, 5, 1), *block(32, 32, 3, 2), *block(32, 64, 3, 2), *block(64, 64, 3, 2),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 2),
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        b, _, t, h, w = x.shape
        win = torch.cat([x[:, :, 0 : t - 4 : 2], x[:, :, 2 : t - 2 : 2], x[:, :, 4:t:2]], 1)
        n = win.shape[2]
        return self.f(win.transpose(1, 2).reshape(b * n, 9, h, w)).view(b, n, 2).mean(1)


def build(variant: str) -> nn.Module:
    if variant == "pairs":
        return Triplets()
    if variant in ("tiny3d-diff", "tiny3d-energy"):
        extra = variant.split("-")[1]
        return ExtraChannels(extra, 3 if extra == "diff" else 2, 4.0)
    net = Tiny3d(2, vortex=(2, 3, 5) if variant == "tiny3d-vortex" else ())
    if variant == "tiny3d-notpool":
        net.stem[3] = nn.MaxPool3d((1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))
    elif variant == "tiny3d-nopool":
        net.stem[3] = nn.Identity()
    elif variant not in ("tiny3d", "tiny3d-vortex"):
        raise SystemExit(f"unknown variant {variant!r}")
    return net


def two_classes(data: DataSection, split: str, classes: list[str]) -> tuple[Tensor, Tensor]:
    """Every clip of the two classes in a split: ``(N, 3, T, H, W)`` in [0, 1] and labels 0 / 1."""
    ds = recipe_clips(data, split)
    ids = [ds.classes.index(c) for c in classes]
    picked = [(i, ids.index(label)) for i, (_, label) in enumerate(ds.videos) if label in ids]
    return torch.stack([ds[i][0] for i, _ in picked]), torch.tensor([y for _, y in picked])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="synth-clip")
    parser.add_argument("--variant", default="tiny3d")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--classes", nargs=2, default=["RotateClockwise", "RotateCounterClockwise"])
    parser.add_argument("--synth-train-videos", type=int, default=None, help="use the larger tree of N videos per class")
    args = parser.parse_args()
    data = synth_train_recipe(load_recipe(args.recipe), args.synth_train_videos).data
    a, b = args.classes
    symmetries = {name: [1, 0] for name, swaps in SYNTH_SYMMETRIES.items() if swaps.get(a) == b or swaps.get(b) == a}
    if not symmetries:
        raise SystemExit(f"{a} and {b} are no symmetry's pair")
    started = time.time()
    x_train, y_train = two_classes(data, "train", args.classes)
    x_test, y_test = two_classes(data, "test", args.classes)
    print(f"{args.variant}: {len(x_train)} train / {len(x_test)} test clips of {a} vs {b}, symmetries {', '.join(symmetries)}")
    torch.manual_seed(0)
    model = build(args.variant)
    optimizer = torch.optim.AdamW(model.parameters(), 3e-3, weight_decay=0.05)
    gen = torch.Generator().manual_seed(0)
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = 3e-3 * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        pick = torch.randint(0, len(x_train), (32,), generator=gen)
        x = augment_clips(x_train[pick], x_train.shape[2], gen, shift=4)
        x, y = mirror_clips(x, y_train[pick], symmetries, gen)
        model.train()
        loss = F.cross_entropy(model((x - 0.5) / 0.25), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % 50 == 0:
            model.eval()
            with torch.no_grad():
                acc = (model((x_test - 0.5) / 0.25).argmax(1) == y_test).float().mean().item()
            print(f"step {step + 1}: loss {loss.item():.3f}, test accuracy {100 * acc:.1f}% ({time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()
