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
  through the real one.

A video counts as robust only if it survives every variant (:meth:`Report.worst_accuracy`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import Tensor, nn

from ..errors import ConfigError
from ..recipes import AttackSection

VARIANTS: tuple[str, ...] = ("t1", "identity", "iters100", "restarts", "transfer", "uncompleted")


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
    """The defense to attack through and the attack settings of variant ``name`` ("" = plain BPDA)."""
    if name == "":
        yield defense, section
    elif name == "t1":
        previous, defense.temperature = defense.temperature, 1.0
        try:
            yield defense, section
        finally:
            defense.temperature = previous
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
    elif name == "uncompleted":
        previous, defense.complete = defense.complete, "none"
        try:
            yield defense, section
        finally:
            defense.complete = previous
    else:
        raise ConfigError(f"evaluate.bpda_variants: unknown {name!r} (expected one of: {', '.join(VARIANTS)})")


def check_variants(names: list[str], transfer: Any) -> None:
    for name in names:
        if name not in VARIANTS:
            raise ConfigError(f"evaluate.bpda_variants: unknown {name!r} (expected one of: {', '.join(VARIANTS)})")
    if "transfer" in names and not transfer:
        raise ConfigError("evaluate.bpda_variants has 'transfer' but evaluate.transfer_detector is not set")
