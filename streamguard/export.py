"""The patch detector as an ONNX graph, for ONNX Runtime, Triton or DeepStream.

The graph is the detector alone at a fixed working size with a dynamic batch: frames
``(N, 3, H, W)`` RGB in [0, 1] -> logits ``(N, 1, H, W)``; a pixel is a patch where
``sigmoid(logit) > threshold``. The clip fusion, dilation and repaint stay with the caller (they
are a few lines: :class:`~streamguard.patchzero.PatchZero` does them around :class:`OnnxDetector`,
see :func:`~streamguard.patchzero.load_onnx_defense`);
``<name>.json`` beside the graph carries everything needed to do them the same way.

PSPNet's pyramid pooling averages its feature map over 1, 2, 3 and 6 bins; ONNX has no adaptive
pooling for bins that do not divide the map, so for export each pool becomes two fixed averaging
matrices (:class:`FixedAdaptivePool`), which compute exactly what ``adaptive_avg_pool2d`` does.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .checkpoints import atomic_write_text, sha256_file
from .errors import CheckpointError, ConfigError


def pool_matrix(n_in: int, n_out: int) -> Tensor:
    """``(n_out, n_in)``: row ``i`` averages inputs ``floor(i n_in / n_out) .. ceil((i+1) n_in / n_out) - 1``,
    the bins of ``adaptive_avg_pool``."""
    m = torch.zeros(n_out, n_in)
    for i in range(n_out):
        start, stop = (i * n_in) // n_out, -(-((i + 1) * n_in) // n_out)
        m[i, start:stop] = 1.0 / (stop - start)
    return m


class FixedAdaptivePool(nn.Module):
    """``AdaptiveAvgPool2d(bins)`` for ``(B, C, h, w)`` maps of one fixed size, as two matrix products."""

    def __init__(self, bins: int, h: int, w: int) -> None:
        super().__init__()
        self.register_buffer("rows", pool_matrix(h, bins))
        self.register_buffer("cols", pool_matrix(w, bins))

    def forward(self, x: Tensor) -> Tensor:
        return self.rows @ x @ self.cols.T


def exportable_detector(defense: nn.Module, size: tuple[int, int]) -> nn.Module:
    """A copy of ``defense``'s detector (eval mode) whose pyramid pools are fixed for ``size`` frames."""
    detector = copy.deepcopy(defense.detector).cpu().eval()
    maps: list[tuple[int, int]] = []
    hook = detector.ppm.register_forward_pre_hook(lambda module, args: maps.append(tuple(args[0].shape[-2:])))
    with torch.no_grad():
        detector(torch.zeros(1, 3, *size))
    hook.remove()
    for stage in detector.ppm.stages:
        stage[0] = FixedAdaptivePool(stage[0].output_size, *maps[0])
    return detector


def export_onnx(defense: nn.Module, path: str | os.PathLike[str], *, source: str = "", opset: int = 17) -> Path:
    """Write the detector of ``defense`` (a :class:`~streamguard.patchzero.PatchZero`) at its working
    size to ``path`` (ONNX, dynamic batch) and its meta to ``path`` with ``.json``, both atomically.
    Returns the graph's path."""
    if defense.input_size is None:
        raise ConfigError("export needs a working size: the weights have no input_size; pass --imgsz")
    size = tuple(defense.input_size)
    detector = exportable_detector(defense, size)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.export")
    try:
        torch.onnx.export(
            detector, (torch.rand(2, 3, *size),), str(tmp), dynamo=False, opset_version=opset,
            input_names=["frames"], output_names=["logits"], dynamic_axes={"frames": {0: "batch"}, "logits": {0: "batch"}},
        )  # fmt: skip
        os.replace(tmp, path)  # renamed when complete: an interrupted export leaves no half graph
    finally:
        tmp.unlink(missing_ok=True)
    meta = {
        "format": "onnx", "opset": opset, "source": source, "sha256": sha256_file(path),
        "input": {"name": "frames", "shape": ["batch", 3, *size], "range": [0.0, 1.0], "channels": "RGB"},
        "output": {"name": "logits", "shape": ["batch", 1, *size], "patch": "sigmoid(logit) > threshold"},
        "input_size": list(size), **{k: v for k, v in defense.meta.items() if k != "input_size"},
        "torch": torch.__version__,
    }  # fmt: skip
    atomic_write_text(path.with_suffix(".json"), json.dumps(meta, indent=2, default=str))
    return path


class OnnxDetector(nn.Module):
    """An exported detector under ONNX Runtime, in :class:`PatchZero`'s place for a PyTorch one:
    ``(N, 3, H, W)`` -> logits ``(N, 1, H, W)``, no gradients (so no BPDA through it)."""

    def __init__(self, path: str | os.PathLike[str], threads: int | None = None) -> None:
        super().__init__()
        try:
            import onnxruntime as ort
        except ImportError:
            raise ConfigError("ONNX Runtime is not installed: pip install 'streamguard[onnx]'") from None
        path = Path(path)
        meta_path = path.with_suffix(".json")
        if not meta_path.is_file():
            raise CheckpointError(f"{path}: no {meta_path.name} beside it (export with `streamguard export`)")
        self.meta: dict[str, Any] = json.loads(meta_path.read_text())
        if self.meta.get("sha256") != sha256_file(path):
            raise CheckpointError(f"{path}: sha256 does not match {meta_path.name} (tampered or truncated)")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def forward(self, x: Tensor) -> Tensor:
        logits = self.session.run(["logits"], {"frames": np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)})[0]
        return torch.from_numpy(logits).to(x.device)
