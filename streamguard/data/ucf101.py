"""UCF101 on disk: split files, decoding, centre crops, and :class:`UCF101Clips`.

**UCF101 layout** (what :class:`UCF101Clips` reads and what SynthMotion writes)::

    root/ClassName/v_ClassName_gXX_cYY.avi
    root/ucfTrainTestlist/classInd.txt       "1 ApplyEyeMakeup"
    root/ucfTrainTestlist/trainlist0{1,2,3}.txt  "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1"
    root/ucfTrainTestlist/testlist0{1,2,3}.txt   "ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi"

The split files may also sit directly in ``root``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import av
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from ..errors import ConfigError, InputError, StreamGuardError
from ..resize import resize_uint8

SPLIT_DIR = "ucfTrainTestlist"
UCF101_MEAN = (114.7748 / 255, 107.7354 / 255, 99.4750 / 255)  # ActivityNet mean used by MARS
# UCF101's actions keep their label when mirrored (the usual flip augmentation), not when reversed.
UCF101_SYMMETRIES: dict[str, dict[str, str]] = {"hflip": {}}


# ----------------------------------------------------------------------------- UCF101 reading


def _split_dir(root: Path) -> Path:
    nested = root / SPLIT_DIR
    return nested if nested.is_dir() else root


def _read_lines(path: Path) -> list[tuple[int, list[str]]]:
    if not path.is_file():
        raise InputError(f"missing split file: {path}")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"cannot read split file {path}: {err}") from None
    return [(n, line.split()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]


def read_class_index(path: Path) -> list[str]:
    """Class names ordered by their ``classInd.txt`` id (ids 1..K, contiguous)."""
    classes: dict[int, str] = {}
    for n, fields in _read_lines(path):
        if len(fields) != 2 or not fields[0].isdigit():
            raise InputError(f"{path}:{n}: expected '<id> <ClassName>', got {' '.join(fields)!r}")
        classes[int(fields[0])] = fields[1]
    if sorted(classes) != list(range(1, len(classes) + 1)):
        raise InputError(f"{path}: class ids must be 1..{len(classes)}")
    return [classes[i] for i in range(1, len(classes) + 1)]


def read_split(root: Path, split: str, fold: int, classes: list[str]) -> list[tuple[Path, int]]:
    """``(video path, 0-based label)`` for every line of ``{split}list0{fold}.txt``."""
    path = _split_dir(root) / f"{split}list0{fold}.txt"
    lookup = {name.lower(): i for i, name in enumerate(classes)}
    videos = []
    for n, fields in _read_lines(path):
        rel = fields[0]
        folder = rel.replace("\\", "/").split("/")[0].lower()
        if len(fields) > 1:
            if not fields[1].isdigit() or not 1 <= int(fields[1]) <= len(classes):
                raise InputError(f"{path}:{n}: bad class id {fields[1]!r}")
            label = int(fields[1]) - 1
        elif folder in lookup:
            label = lookup[folder]
        else:
            raise InputError(f"{path}:{n}: class folder {folder!r} is not in classInd.txt")
        videos.append((root / rel, label))
    for video, _ in videos:
        if not video.is_file():
            raise InputError(f"{path}: listed video not found: {video}")
    return videos


def _error_text(err: Exception) -> str:
    return getattr(err, "strerror", None) or str(err)


def open_video(path: Path) -> tuple[Any, Any]:
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError, ValueError) as err:
        raise InputError(f"cannot read video {path}: {_error_text(err)}") from None
    if not container.streams.video:
        container.close()
        raise InputError(f"no video stream in {path}")
    return container, container.streams.video[0]


def _decode_frames(
    path: Path, container: Any, stream: Any, wanted: set[int] | None
) -> tuple[dict[int, np.ndarray], int]:
    """Decode the frames with the given indices (all when None) as (H, W, 3) uint8 RGB.

    Decoding stops after the last wanted frame. Returns the frames and how many were decoded.
    """
    last = max(wanted) if wanted else -1
    frames: dict[int, np.ndarray] = {}
    count = 0
    try:
        for count, frame in enumerate(container.decode(stream), 1):
            if wanted is None or count - 1 in wanted:
                frames[count - 1] = frame.to_ndarray(format="rgb24")
            if wanted is not None and count - 1 >= last:
                break
    except (av.FFmpegError, OSError, ValueError) as err:
        if not frames:
            raise InputError(f"cannot decode video {path}: {_error_text(err)}") from None
    if count == 0:
        raise InputError(f"no decodable frames in {path}")
    return frames, count


def clip_indices(num_frames: int, clip_len: int, stride: int, start: int | None) -> np.ndarray:
    """Frame indices of a clip; ``start=None`` centres it. Short videos loop (indices wrap)."""
    span = (clip_len - 1) * stride + 1
    if start is None:
        start = max(num_frames - span, 0) // 2
    return (start + stride * np.arange(clip_len)) % num_frames


def center_crop_resize(image: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) -> (size, size, 3): shorter side to ``size``, then the central square."""
    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = image[top : top + side, left : left + side]
    return np.ascontiguousarray(resize_uint8(square, (size, size)))


class UCF101Clips(Dataset):
    """Fixed-length clips from a tree in UCF101's layout (UCF101 itself or SynthMotion).

    ``dataset[i] -> (clip, label)``: clip ``(3, clip_len, size, size)`` float32 RGB in [0, 1],
    label the 0-based class index (``classInd`` id - 1). ``start="center"`` takes the middle of
    the video, ``"random"`` draws the start from the dataset's generator (seeded with ``seed``,
    reseeded per DataLoader worker by :func:`make_loader`). ``subset=N`` keeps a fixed random
    subset of N videos drawn with ``seed`` (the paper evaluates 202 UCF101 test videos).
    ``mean`` is the dataset's per-channel RGB mean in [0, 1] (exposed as ``.mean``); by default the
    one recorded in ``synthmotion.json``, else the ActivityNet mean MARS uses for UCF101.

    Every file is checked at construction (root, ``classInd.txt``, the split file, every listed
    video): a missing one raises :class:`InputError` naming it. A video that cannot be decoded
    raises :class:`InputError` naming it when loaded.
    """

    def __init__(
        self,
        root: str | Path,
        split: Literal["train", "test"] = "test",
        fold: int = 1,
        clip_len: int = 16,
        size: int = 112,
        stride: int = 1,
        start: Literal["center", "random"] = "center",
        subset: int | None = None,
        seed: int = 0,
        mean: tuple[float, float, float] | None = None,
    ) -> None:
        _check_options(split=split, fold=fold, clip_len=clip_len, size=size, stride=stride, start=start)
        self.root = Path(root)
        if not self.root.is_dir():
            raise InputError(f"data root not found: {self.root}")
        self.split, self.fold, self.clip_len, self.size = split, fold, clip_len, size
        self.stride, self.start, self.seed = stride, start, seed
        self.classes = read_class_index(_split_dir(self.root) / "classInd.txt")
        videos = read_split(self.root, split, fold, self.classes)
        if subset is not None:
            if not 1 <= subset <= len(videos):
                raise ConfigError(f"subset: {subset} is outside 1..{len(videos)} ({split} fold {fold})")
            keep = np.random.default_rng(seed).choice(len(videos), subset, replace=False)
            videos = [videos[i] for i in sorted(keep)]
        self.videos: list[tuple[Path, int]] = videos
        self.mean = tuple(mean) if mean is not None else _recorded_mean(self.root)
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.videos)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        clip, label, _ = self.load(index)
        return clip, label

    def load(self, index: int) -> tuple[torch.Tensor, int, np.ndarray]:
        """``(clip (3, T, S, S), label, frame indices (T,))``; indices say which source frames."""
        path, label = self.videos[index]
        frames, indices = self._read(path)
        clip = np.stack([center_crop_resize(f, self.size) for f in frames])  # (T, S, S, 3)
        clip = torch.from_numpy(np.ascontiguousarray(clip.transpose(3, 0, 1, 2))).float().div_(255)
        return clip, label, indices

    def reseed(self, seed: int) -> None:
        """Restart the random-start generator (called per DataLoader worker)."""
        self.rng = np.random.default_rng([self.seed, seed])

    def _start(self, num_frames: int) -> int | None:
        if self.start == "center":
            return None
        span = (self.clip_len - 1) * self.stride + 1
        return int(self.rng.integers(0, max(num_frames - span, 0) + 1))

    def _read(self, path: Path) -> tuple[list[np.ndarray], np.ndarray]:
        container, stream = open_video(path)
        with container:
            num_frames = stream.frames  # from the container header; 0 when it has none
            if num_frames > 0:
                indices = clip_indices(num_frames, self.clip_len, self.stride, self._start(num_frames))
                frames, _ = _decode_frames(path, container, stream, set(indices.tolist()))
                if all(i in frames for i in indices):
                    return [frames[i] for i in indices], indices
        container, stream = open_video(path)  # header missing or wrong: count by decoding
        with container:
            frames, num_frames = _decode_frames(path, container, stream, None)
        indices = clip_indices(num_frames, self.clip_len, self.stride, self._start(num_frames))
        return [frames[i] for i in indices], indices


def _check_options(**opts: Any) -> None:
    if opts["split"] not in ("train", "test"):
        raise ConfigError(f"split: expected 'train' or 'test', got {opts['split']!r}")
    if opts["fold"] not in (1, 2, 3):
        raise ConfigError(f"fold: expected 1, 2 or 3, got {opts['fold']!r}")
    if opts["start"] not in ("center", "random"):
        raise ConfigError(f"start: expected 'center' or 'random', got {opts['start']!r}")
    for name in ("clip_len", "size", "stride"):
        if not isinstance(opts[name], int) or opts[name] < 1:
            raise ConfigError(f"{name}: expected a positive int, got {opts[name]!r}")


def _recorded_mean(root: Path) -> tuple[float, float, float]:
    meta = root / "synthmotion.json"
    if meta.is_file():
        try:
            return tuple(json.loads(meta.read_text())["mean"])
        except (ValueError, KeyError, TypeError):
            raise InputError(f"{meta}: not a valid synthmotion.json") from None
    return UCF101_MEAN


class _Loader(DataLoader):
    """A DataLoader whose worker errors surface as the original one-line StreamGuardError.

    On an error the workers are shut down at once: torch's clean-up of a failed iterator left to
    the garbage collector stalls for ~10 s.
    """

    def __iter__(self) -> Iterator[Any]:
        iterator = super().__iter__()
        try:
            yield from iterator
        except BaseException as err:
            getattr(iterator, "_shutdown_workers", lambda: None)()
            lines = [line for line in str(err).splitlines() if line.strip()]
            if not isinstance(err, StreamGuardError) or len(lines) <= 1:
                raise
            prefix = f"{type(err).__module__}.{type(err).__qualname__}: "
            raise type(err)(lines[-1].removeprefix(prefix)) from None


def _worker_init(worker_id: int) -> None:
    info = get_worker_info()
    if info is not None and hasattr(info.dataset, "reseed"):
        info.dataset.reseed(info.seed)


def make_loader(dataset: Dataset, batch: int, workers: int = 0, seed: int = 0, shuffle: bool = False) -> DataLoader:
    """A DataLoader of ``(clips (N, 3, T, S, S), labels (N,))`` with seeded order and workers.

    Each worker reseeds the dataset's generator from the loader's seed, so random clip starts
    are reproducible for a given ``seed`` and ``workers`` and differ between workers and epochs.
    """
    return _Loader(
        dataset,
        batch_size=batch,
        shuffle=shuffle,
        num_workers=workers,
        worker_init_fn=_worker_init,
        generator=torch.Generator().manual_seed(seed),
    )
