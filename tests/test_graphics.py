"""Synthetic benign graphics: deterministic full-frame clips, and the training mix that draws them."""

from pathlib import Path

import numpy as np
import pytest
import torch

from streamguard.data.graphics import GraphicsClips
from streamguard.errors import ConfigError
from streamguard.recipes import parse_recipe
from streamguard.training.stages import (
    GRAPHICS_TRAIN,
    benign_bases,
    held_out_benign,
    paste_procedural,
)


def test_graphics_clips_are_deterministic_varied_and_sized() -> None:
    ds = GraphicsClips(8, size=32, clip_len=8, seed=3)
    clip, label = ds[5]
    assert clip.shape == (3, 8, 32, 32) and label == 0 and 0 <= clip.min() and clip.max() <= 1
    assert torch.equal(clip, GraphicsClips(8, size=32, clip_len=8, seed=3)[5][0])
    assert not torch.equal(clip, GraphicsClips(8, size=32, clip_len=8, seed=4)[5][0])
    clips = torch.stack([ds[i][0] for i in range(8)])
    assert clips.std(dim=(1, 2, 3, 4)).gt(0.02).sum() >= 6  # pictures, not flat fields
    assert (clips[:, :, 1:] != clips[:, :, :-1]).flatten(1).any(1).sum() >= 2  # some of them move


def test_benign_bases_mix_graphics_and_held_out_ones_are_never_drawn(tmp_path: Path) -> None:
    synth = GraphicsClips(4, size=32, clip_len=8, seed=9)  # stands in for SynthMotion
    rec = parse_recipe({"data": {"size": 32, "clip_len": 8}, "train": {"steps": 2, "patches": {"graphics": 0.5}}})
    draw = benign_bases(rec, synth, 4, 0)
    batch, natural = draw()
    from_synth = [any(torch.equal(b, synth[i][0]) for i in range(4)) for b in batch]
    assert batch.shape == (4, 3, 8, 32, 32) and sum(from_synth) == 2  # graphics = 0.5 of 4
    assert natural.tolist() == from_synth  # the graphics rows are flagged
    held = held_out_benign(rec, 4)  # no footage in this recipe: all graphics clips, past the training indices
    train = GraphicsClips(GRAPHICS_TRAIN, 32, 8, rec.train.seed)
    assert held.shape == (4, 3, 8, 32, 32)
    assert all(torch.equal(h, train[GRAPHICS_TRAIN + i][0]) for i, h in enumerate(held))


def test_procedural_patches_go_on_natural_clips_only() -> None:
    synth = GraphicsClips(4, size=32, clip_len=8, seed=9)  # stands in for SynthMotion
    rec = parse_recipe({"data": {"size": 32, "clip_len": 8},
                        "train": {"steps": 8, "patches": {"graphics": 0.5, "textures": ["colour"]}}})  # fmt: skip
    draw = benign_bases(rec, synth, 4, 0)
    for seed in range(6):  # however the rows are shuffled, the two patches land on the two synth clips
        bases = draw()
        x, mask = paste_procedural(rec, bases, 3, np.random.default_rng(seed))
        patched = mask.flatten(1).amax(1).gt(0)
        assert patched.tolist() == [True, True, False, False]
        for clip in x[2:]:  # untouched graphics clips, shuffled behind
            assert any(torch.equal(clip, b) for b, nat in zip(*bases) if not nat)


def test_family_weights_draw_families_in_proportion() -> None:
    synth = GraphicsClips(4, size=32, clip_len=8, seed=9)
    rec = parse_recipe({"data": {"size": 32, "clip_len": 8}, "train": {"steps": 2, "patches": {
        "textures": ["uniform", "colour"], "weights": {"colour": 9.0}, "codec": 0.0}}})  # fmt: skip
    bases = benign_bases(rec, synth, 4, 0)()
    rng = np.random.default_rng(0)
    colour = 0
    for _ in range(40):  # a colour field is one colour in the patch; uniform noise is not
        x, mask = paste_procedural(rec, bases, 1, rng)
        inside = x[0].permute(1, 2, 3, 0)[mask[0, 0] > 0.5]
        colour += bool(inside.std(0).max() < 1e-6)
    assert 30 <= colour <= 40  # 90% expected
    with pytest.raises(ConfigError, match="fractal"):  # a family it does not train on: refused when the recipe loads
        parse_recipe({"train": {"patches": {"textures": ["uniform"], "weights": {"fractal": 2.0}}}})
