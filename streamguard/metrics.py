"""Metrics shared by training and evaluation: top-k accuracy, box AP, and patch-pixel counts."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader


def topk_correct(logits: Tensor, labels: Tensor, k: int) -> Tensor:
    """``(N, K)`` logits, ``(N,)`` labels -> ``(N,)`` bool: the label is among the ``k`` highest scores."""
    k = min(k, logits.shape[1])
    return (logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1)


def topk_accuracy(logits: Tensor, labels: Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Fraction of samples whose label is in the top ``k`` predictions, for each ``k``."""
    return {k: topk_correct(logits, labels, k).float().mean().item() for k in ks}


def detection_ap(preds: list[dict[str, Tensor]], targets: list[dict[str, Tensor]]) -> dict[str, float]:
    """COCO box AP (mean over IoU 0.50:0.95), AP50 and AP75.

    ``preds``: per image ``{"boxes" (M, 4) xyxy, "scores" (M,), "labels" (M,)}`` (torchvision's
    detector output); ``targets``: ``{"boxes", "labels"}``.
    """
    from torchmetrics.detection import MeanAveragePrecision

    metric = MeanAveragePrecision(iou_type="bbox", backend="pycocotools")
    metric.update(preds, targets)
    result = metric.compute()
    return {"ap": result["map"].item(), "ap50": result["map_50"].item(), "ap75": result["map_75"].item()}


def _ratio(num: int, den: int) -> float:
    return num / den if den else float("nan")


@dataclass(frozen=True)
class PixelCounts:
    """Confusion counts of predicted vs. true patch pixels, summed over a data set (``a + b``).

    Ratios with an empty denominator (precision with no predicted pixel, recall on benign clips) are NaN.
    """

    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    @classmethod
    def from_masks(cls, pred: Tensor, true: Tensor) -> PixelCounts:
        """Counts from 0/1 masks of any (equal) shape."""
        p, t = pred.bool(), true.bool()
        return cls(int((p & t).sum()), int((p & ~t).sum()), int((~p & t).sum()), int((~p & ~t).sum()))

    def __add__(self, other: PixelCounts) -> PixelCounts:
        return PixelCounts(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn, self.tn + other.tn)

    @property
    def precision(self) -> float:
        return _ratio(self.tp, self.tp + self.fp)

    @property
    def recall(self) -> float:
        return _ratio(self.tp, self.tp + self.fn)

    @property
    def accuracy(self) -> float:
        return _ratio(self.tp + self.tn, self.tp + self.fp + self.fn + self.tn)

    @property
    def f1(self) -> float:
        return _ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn)

    @property
    def fpr(self) -> float:
        return _ratio(self.fp, self.fp + self.tn)


def pixel_scores(logits: Tensor, target: Tensor) -> dict[str, float]:
    """Pixel precision / recall / F1 of ``logits > 0`` against a 0/1 mask, pooled over the batch.

    For training logs: an empty denominator (nothing predicted, or a benign batch) scores 1.0
    rather than :class:`PixelCounts`' NaN, so running means stay finite.
    """
    c = PixelCounts.from_masks(logits > 0, target > 0.5)
    scores = {"precision": c.precision, "recall": c.recall, "f1": c.f1}
    return {k: 1.0 if math.isnan(v) else v for k, v in scores.items()}


@torch.no_grad()
def top1(model: nn.Module, ds: Any, batch: int, device: torch.device, defense: nn.Module | None = None) -> float:
    """Top-1 accuracy of ``model`` (behind ``defense`` if given) on every clip of ``ds``."""
    model.eval()
    correct = 0
    for x, y in DataLoader(ds, batch_size=batch):
        x = x.to(device)
        if defense is not None:
            x = defense(x)
        correct += topk_correct(model(x).cpu(), y, 1).sum().item()
    return correct / max(1, len(ds))
