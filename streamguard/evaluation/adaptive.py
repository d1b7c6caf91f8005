"""The adaptive (BPDA) attack variants whose worst case the BPDA rows report.

A defense that beats one attack has not won, and a detector can look robust only because its
gradients mislead one attack (gradient masking). Against PatchZero the grid runs, besides the plain
BPDA attack (the defense's own soft mask, sigmoid temperature 4), each variant of
``[evaluate] bpda_variants``:

* ``t1``: the soft mask at temperature 1 (sharper, the sigmoid's own slope);
* ``identity``: the whole defense as a straight-through identity (exact forward, identity backward);
* ``iters100``: five times the recipe's iterations (100 for the paper's 20);
* ``restarts``: 5 random restarts, the best kept;
* ``transfer``: BPDA through a differently trained detector (``[evaluate] transfer_detector``),
  scored through the real one;
* ``uncompleted``: BPDA through the same defense without shape completion (``complete = "none"``;
  the attacker ignores it, in case its identity approximation misleads the plain attack), scored
  through the real one;
* ``grown``: BPDA whose soft mask is dilated besides the rim by half the square's side when the
  defense completes to squares (``complete = "square"``), by the side less one when it completes to
  their cover (``"cover"``): a differentiable stand-in for the completion,
  under which every detected pixel near the patch costs the attacker its whole neighbourhood, so
  the attack drives all of them down instead of the patch's border alone (no change otherwise);
* ``spread``: BPDA whose soft mask is dilated besides the rim by the largest patch's side less one,
  whatever the completion (the cover's stand-in): on a square a wider spread than ``grown``'s, and
  on every defense the attacker who drives down each detection within a patch's reach of the patch;
  it may hide a patch from the detector altogether, and then no completion helps;
* ``mean-fused``: BPDA through the same defense with the clip's logits averaged over time
  (``temporal = "mean"``) instead of its own fusion, scored through the real one: a median over
  frames passes the gradient to one frame a pixel, which may mislead the plain attack; the mean
  spreads it over all of them.

Variants combine with ``+`` (``mean-fused+iters100``), applied left to right.

A video counts as robust only if it survives every variant (:meth:`Report.worst_accuracy`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

from torch import Tensor, nn

from ..errors import ConfigError
from ..recipes import AttackSection

VARIANTS: tuple[str, ...] = ("t1", "identity", "iters100", "restarts", "transfer", "uncompleted", "grown", "spread", "mean-fused")
_SETTINGS: dict[str, tuple[str, Any]] = {  # variants that change one PatchZero setting: (attribute, value)
    "t1": ("temperature", 1.0),
    "uncompleted": ("complete", "none"),
    "grown": ("soft_reach", "completion"),
    "spread": ("soft_reach", "patch"),
    "mean-fused": ("temporal", "mean"),
}


class IdentityBackward(nn.Module):
    """``defense``'s exact output forward, the identity backward (BPDA's simplest approximation)."""

    bpda = True

    def __init__(self, defense: nn.Module) -> None:
        super().__init__()
        self.defense = defense

    def forward(self, x: Tensor) -> Tensor:
        previous = getattr(self.defense, "bpda", None)
        self.defense.bpda = False
        try:
            return x + (self.defense(x) - x).detach()
        finally:
            self.defense.bpda = previous


@contextmanager
def variant(name: str, defense: nn.Module, section: AttackSection, transfer: nn.Module | None) -> Iterator[tuple[nn.Module, AttackSection]]:
    """The defense to attack through and the attack settings of variant ``name`` ("" = plain BPDA).

    Variants combine with ``+``, applied left to right (``mean-fused+iters100``: 100 iterations through
    the mean-fused defense)."""
    with ExitStack() as stack:
        through = defense
        for part in filter(None, name.split("+")):
            through, section = stack.enter_context(_one_variant(part, through, section, transfer))
        yield through, section


@contextmanager
def _setting(defense: nn.Module, attr: str, value: Any) -> Iterator[None]:
    """``defense.attr = value`` for the duration (a variant that changes one PatchZero setting)."""
    previous = getattr(defense, attr)
    setattr(defense, attr, value)
    try:
        yield
    finally:
        setattr(defense, attr, previous)


@contextmanager
def _one_variant(name: str, defense: nn.Module, section: AttackSection, transfer: nn.Module | None) -> Iterator[tuple[nn.Module, AttackSection]]:
    if name in _SETTINGS:
        with _setting(defense, *_SETTINGS[name]):
            yield defense, section
    elif name == "identity":
        yield IdentityBackward(defense), section
    elif name == "iters100":
        yield defense, dataclasses.replace(section, iters=5 * section.iters)
    elif name == "restarts":
        yield defense, dataclasses.replace(section, restarts=max(5, section.restarts), random_init=True)
    elif name == "transfer":
        if transfer is None:
            raise ConfigError("evaluate.bpda_variants has 'transfer' but evaluate.transfer_detector is not set")
        yield transfer, section
    else:
        raise ConfigError(f"evaluate.bpda_variants: unknown {name!r} (expected one of: {', '.join(VARIANTS)})")


def check_variants(names: list[str], transfer: Any) -> None:
    for name in names:
        parts = name.split("+")
        for part in parts:
            if part not in VARIANTS:
                raise ConfigError(f"evaluate.bpda_variants: unknown {part!r} (expected one of: {', '.join(VARIANTS)}, or several joined by '+')")
        if "identity" in parts and set(parts[parts.index("identity") + 1 :]) & set(_SETTINGS):
            raise ConfigError(f"evaluate.bpda_variants: in {name!r} a PatchZero setting follows 'identity', which replaces the defense")
        if "transfer" in parts and not transfer:
            raise ConfigError("evaluate.bpda_variants has 'transfer' but evaluate.transfer_detector is not set")
