"""Real footage and photographs as benign backgrounds for the patch detector, built offline.

:func:`build_footage` turns the videos and photos under some folders (by default the Debian
packages ``opencv-doc``, ``gnome-backgrounds``, ``mate-backgrounds`` and scikit-image's bundled
photos: see :func:`default_folders`) into short clips at the detector's working scale:

* ``OUT/train/*.npy`` and ``OUT/test/*.npy``: one clip each, ``uint8`` ``(T, size, size, 3)`` RGB;
* ``OUT/footage.json``: the settings and, per clip, its source file, the source's sha256 prefix,
  kind (``video``/``photo``), split, window/motion and the augmentation applied. It is written
  last (atomically) and removed when a build starts, so its absence marks an incomplete build.

:class:`FootageClips` reads them back as ``(clip (3, T, size, size) float [0, 1], 0)``: label 0,
the clips only ever serve as backgrounds without a patch.

Decisions worth knowing:

* **Split by source, never by clip.** A source's split is a function of its file *name* only (a
  hash of its group, see :func:`source_group`), not of the seed, its folder or the clip: every
  build puts a file in the same split, and no test footage is ever trained on. Near-duplicates
  named alike share a group (``Megamind.avi`` / ``Megamind_bugy.avi``, ``Elephants_3840x2160.jpg``
  / ``Elephants.jpg``, ``wood-d.webp`` / ``wood-l.webp``, ``aloeL.jpg`` / ``aloeR.jpg``, the
  stereo pairs ``leftNN.jpg`` / ``rightNN.jpg``), so a scene is never on both sides.
* **vtest.avi is always test** (:data:`HELD_OUT`): it is the only real surveillance video (a
  static camera, pedestrians, 795 frames), the footage the defense is meant for; kept out of
  training it stays an unbiased held-out measure of false positives on real camera footage.
* **Determinism.** Clip ``j`` of a source draws everything (window, motion, augmentation, noise)
  from ``default_rng([seed, sha256(source bytes), j])``: the output does not depend on ``workers``,
  on the order of the folders or on which other files are present.
* **Resume.** After all clips of a source are written, ``OUT/.parts/<sha>.json`` records them. A
  rebuild with the same settings keeps the clip files of sources so recorded (re-rendering only
  missing files, bit-identical); a source without a matching record is rendered again.
* **Unreadable files** (no permission, wrong magic bytes, undecodable, too small or too short) are
  skipped, listed in ``footage.json["skipped"]`` and counted in one :class:`FootageWarning`.
  Files with the same bytes are used once. Grey, 16-bit and alpha images are read as 8-bit RGB.
* **Videos** are decoded twice with PyAV: once to count the frames that actually decode (headers
  lie: ``tree.avi`` announces 444 and holds 68), then once sequentially, converting and cropping
  only the frames some window needs.
* **Photos** get synthetic camera motion: a square window that pans (linear drift), zooms
  (0.85-1.15x, linear over the clip) and shakes (per-frame jitter); the photo is area-downscaled
  once per clip so each window spans about ``2 * size`` pixels, each frame is rendered with
  ``cv2.warpAffine`` (bilinear, sub-pixel) at ``2 * size`` and area-averaged to ``size``.
* **Augmentation** per clip, each with some probability (:data:`AUGMENT_P`): brightness/contrast
  (+-20%), Gaussian blur (sigma 0.3-1.2 px), sensor noise (sigma 1-6 /255), then either an H.264
  round trip (libx264 in memory, CRF 18-35, preset veryfast, tune zerolatency, one thread: bit-exact
  between runs, which it was not with lookahead and B-frames) or JPEG
  per frame (quality 30-90) – the order of a camera: scene, optics, sensor, codec.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import re
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import av
import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from ..checkpoints import atomic_write, atomic_write_text
from ..codecs import h264_roundtrip, jpeg_roundtrip
from ..errors import ConfigError, InputError

VIDEO_EXTS = frozenset({".avi", ".mp4", ".mkv", ".mov", ".webm"})
IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"})
HELD_OUT = frozenset({"vtest.avi"})  # always test: the held-out real surveillance video (module docstring)
DEBIAN_FOLDERS = (
    Path("/usr/share/doc/opencv-doc/examples/data"),  # opencv-doc: 4 videos, ~120 photos
    Path("/usr/share/backgrounds/gnome"),  # gnome-backgrounds
    Path("/usr/share/backgrounds/mate"),  # mate-backgrounds
)
FORMAT = 1
META = "footage.json"
PARTS = ".parts"
AUGMENT_P = {"color": 0.5, "blur": 0.3, "noise": 0.5, "h264": 0.35, "jpeg": 0.35}  # h264 / jpeg / neither
VIDEO_SCALE = (0.3, 1.0)  # window side / the frame's short side
VIDEO_ASPECT = 0.1  # |log(width / height)| of a video window at most (square-ish)
PHOTO_SCALE = (0.3, 0.8)  # window side at zoom 1 / the photo's short side (0.8 / 0.85 < 1: fits)
PHOTO_ZOOM = (0.85, 1.15)
PHOTO_DRIFT = 0.5  # pan over the clip per axis, at most this fraction of the window
PHOTO_SHAKE = 0.02  # per-frame jitter sigma, at most this fraction of the window
_GROUP_ALIASES = {"right": "left"}  # stereo pairs: leftNN.jpg / rightNN.jpg are one scene
_MAGIC_VIDEO = (b"RIFF", b"\x1a\x45\xdf\xa3")  # AVI, Matroska/WebM; MP4/MOV: an ISO box at offset 4
_ISO_BOXES = (b"ftyp", b"moov", b"mdat", b"wide", b"free", b"skip", b"pnot")
_MAGIC_IMAGE = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"BM", b"II*\x00", b"MM\x00*")


class FootageWarning(UserWarning):
    """Some source files were skipped (the message counts them; ``footage.json`` lists them)."""


def default_folders() -> list[Path]:
    """The Debian packages' folders (:data:`DEBIAN_FOLDERS`) and scikit-image's ``data`` folder, those that exist."""
    folders = list(DEBIAN_FOLDERS)
    spec = importlib.util.find_spec("skimage")
    if spec is not None and spec.origin:
        folders.append(Path(spec.origin).parent / "data")
    return [f for f in folders if f.is_dir()]


def source_kind(path: str | Path) -> str | None:
    """``"video"``, ``"photo"`` or ``None`` from the file's extension."""
    ext = Path(path).suffix.lower()
    return "video" if ext in VIDEO_EXTS else "photo" if ext in IMAGE_EXTS else None


def source_group(name: str) -> str:
    """The split group of a file name: the stem up to its first ``_``/``-``/space/dot, without a
    trailing camel-case variant letter or two (``aloeL``, ``imageTextN``) and trailing digits,
    lowercased (``Megamind_bugy.avi`` -> ``megamind``, ``left07.jpg`` -> ``left``)."""
    stem = Path(name).stem
    stem = re.sub(r"(?<=[a-z])[A-Z]{1,2}$", "", stem)
    stem = re.split(r"[_\-\s.]", stem, maxsplit=1)[0] or stem
    key = stem.lower().rstrip("0123456789") or stem.lower()
    return _GROUP_ALIASES.get(key, key)


def split_of(path: str | Path, test_fraction: float = 0.2) -> str:
    """``"train"`` or ``"test"`` for a source file, from its name alone (see the module docstring)."""
    name = Path(path).name
    if name.lower() in HELD_OUT:
        return "test"
    digest = hashlib.sha256(source_group(name).encode()).digest()
    return "test" if int.from_bytes(digest[:8], "big") / 2**64 < test_fraction else "train"


def _sniff(path: Path, kind: str) -> str | None:
    """Why ``path`` cannot be a source of ``kind`` (``None``: it looks fine)."""
    try:
        if not os.access(path, os.R_OK):
            return "not readable"
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        return f"not readable ({e.strerror or e})"
    if not head:
        return "empty"
    if kind == "video":
        ok = head.startswith(_MAGIC_VIDEO) or head[4:8] in _ISO_BOXES
    else:
        ok = head.startswith(_MAGIC_IMAGE) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")
    return None if ok else f"not a {kind} file (unknown magic bytes)"


def _find(folders: Iterable[str | Path]) -> tuple[list[Path], list[dict[str, str]]]:
    found: set[Path] = set()
    for folder in folders:
        folder = Path(folder)
        if folder.is_file():
            found.add(folder)
        elif folder.is_dir():
            found.update(p for p in folder.rglob("*") if source_kind(p) and p.is_file())
        else:
            raise InputError(f"footage folder not found: {folder}")
    sources, skipped = [], []
    for path in sorted(found, key=str):
        kind = source_kind(path)
        why = f"unsupported extension {path.suffix!r}" if kind is None else _sniff(path, kind)
        if why is None:
            sources.append(path)
        else:
            skipped.append({"path": str(path), "reason": why})
    return sources, skipped


def _warn_skipped(skipped: Sequence[dict[str, str]]) -> None:
    if skipped:
        shown = ", ".join(f"{Path(s['path']).name} ({s['reason']})" for s in skipped[:3])
        more = f" and {len(skipped) - 3} more" if len(skipped) > 3 else ""
        warnings.warn(f"skipped {len(skipped)} footage file(s): {shown}{more}", FootageWarning, stacklevel=3)


def find_sources(*folders: str | Path) -> list[Path]:
    """The videos (:data:`VIDEO_EXTS`) and photos (:data:`IMAGE_EXTS`) under ``folders``
    (recursively; a file may be named directly), sorted by path. Files that cannot be read or whose
    magic bytes do not match their kind are left out and counted in one :class:`FootageWarning`;
    a folder that does not exist is an :class:`InputError`."""
    sources, skipped = _find(folders)
    _warn_skipped(skipped)
    return sources


# ---------------------------------------------------------------- rendering


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _clip_rng(seed: int, sha: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, int(sha[:8], 16), int(sha[8:16], 16), index])


def draw_augment(rng: np.random.Generator) -> dict[str, Any]:
    """The augmentation of one clip (only what applies), values rounded as recorded and applied."""
    aug: dict[str, Any] = {}
    if rng.random() < AUGMENT_P["color"]:
        aug["brightness"] = round(float(rng.uniform(0.8, 1.2)), 4)
        aug["contrast"] = round(float(rng.uniform(0.8, 1.2)), 4)
    if rng.random() < AUGMENT_P["blur"]:
        aug["blur_sigma"] = round(float(rng.uniform(0.3, 1.2)), 3)
    if rng.random() < AUGMENT_P["noise"]:
        aug["noise_sigma"] = round(float(rng.uniform(1.0, 6.0)), 3)  # in 1/255 units
    r = rng.random()
    if r < AUGMENT_P["h264"]:
        aug["h264_crf"] = int(rng.integers(18, 36))
    elif r < AUGMENT_P["h264"] + AUGMENT_P["jpeg"]:
        aug["jpeg_quality"] = int(rng.integers(30, 91))
    return aug


def apply_augment(clip: np.ndarray, aug: dict[str, Any], rng: np.random.Generator) -> np.ndarray:
    """``clip`` (T, H, W, 3) uint8 after ``aug`` (see :func:`draw_augment`); noise is drawn from ``rng``."""
    x = clip.astype(np.float32)
    if "brightness" in aug:
        mean = float(x.mean())
        x = ((x - mean) * aug["contrast"] + mean) * aug["brightness"]
    if "blur_sigma" in aug:
        x = np.stack([cv2.GaussianBlur(f, (0, 0), aug["blur_sigma"], borderType=cv2.BORDER_REFLECT101) for f in x])
    if "noise_sigma" in aug:
        x = x + rng.normal(0.0, aug["noise_sigma"], size=x.shape).astype(np.float32)
    out = np.clip(np.rint(x), 0, 255).astype(np.uint8)
    if "h264_crf" in aug:
        # tune=zerolatency (no B-frames, lookahead or mb-tree, as live camera encoders): without it libx264's
        # output differed between identical calls now and then, in a process that had decoded other video before
        out = h264_roundtrip(out, aug["h264_crf"], preset="veryfast", tune="zerolatency", x264_params=None)
    elif "jpeg_quality" in aug:
        out = jpeg_roundtrip(out, aug["jpeg_quality"])
    return np.ascontiguousarray(out)


def _decode_video(path: Path, wanted: set[int] | None = None) -> Iterable[tuple[int, Any]]:
    """``(index, av.VideoFrame)`` of the frames that decode, stopping at the first decode error
    (a truncated or corrupt tail); past ``max(wanted)`` decoding stops."""
    last = max(wanted) if wanted else None
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise InputError(f"{path}: no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        frames = container.decode(stream)
        index = 0
        while last is None or index <= last:
            try:
                frame = next(frames)
            except StopIteration:
                return
            except av.FFmpegError:
                return
            if wanted is None or index in wanted:
                yield index, frame
            index += 1


def _video_windows(n: int, h: int, w: int, settings: dict[str, Any], sha: str, indices: Sequence[int]) -> list[dict[str, Any]]:
    clip_len, seed = settings["clip_len"], settings["seed"]
    windows = []
    for j in indices:
        rng = _clip_rng(seed, sha, j)
        start = int(rng.integers(0, n - clip_len + 1))
        side = min(h, w) * float(rng.uniform(*VIDEO_SCALE))
        aspect = math.exp(float(rng.uniform(-VIDEO_ASPECT, VIDEO_ASPECT)))
        cw = max(1, min(w, round(side * math.sqrt(aspect))))
        ch = max(1, min(h, round(side / math.sqrt(aspect))))
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        windows.append({"index": j, "start": start, "crop": [x0, y0, cw, ch], "rng": rng})
    return windows


def _render_video(path: Path, settings: dict[str, Any], sha: str, todo: Sequence[int]) -> tuple[list[dict], dict[int, np.ndarray]]:
    size, clip_len, count = settings["size"], settings["clip_len"], settings["clips_per_video"]
    n, shape = 0, None
    for _, frame in _decode_video(path):
        shape = shape or (frame.height, frame.width)
        n += 1
    if shape is None:
        raise InputError(f"{path}: no frame decodes")
    if n < clip_len:
        raise InputError(f"{path}: too short ({n} frames < clip_len {clip_len})")
    h, w = shape
    windows = _video_windows(n, h, w, settings, sha, range(count))
    todo_set = set(todo)
    pending = [win for win in windows if win["index"] in todo_set]
    needed: dict[int, list[tuple[dict[str, Any], int]]] = {}
    buffers = {win["index"]: np.zeros((clip_len, size, size, 3), np.uint8) for win in pending}
    for win in pending:
        for t in range(clip_len):
            needed.setdefault(win["start"] + t, []).append((win, t))
    seen = 0
    for i, frame in _decode_video(path, set(needed)) if needed else ():
        rgb = frame.to_ndarray(format="rgb24")
        if rgb.shape[:2] != (h, w):  # a resolution change mid-stream: back to the first frame's size
            rgb = cv2.resize(rgb, (w, h), interpolation=cv2.INTER_AREA)
        for win, t in needed[i]:
            x0, y0, cw, ch = win["crop"]
            buffers[win["index"]][t] = cv2.resize(rgb[y0 : y0 + ch, x0 : x0 + cw], (size, size), interpolation=cv2.INTER_AREA)
        seen += 1
    if seen != len(needed):
        raise InputError(f"{path}: decoded {seen} of the {len(needed)} frames it needs on the second pass")
    records, clips = [], {}
    for win in windows:
        aug = draw_augment(win["rng"])
        if win["index"] in buffers:
            clips[win["index"]] = apply_augment(buffers[win["index"]], aug, win["rng"])
        records.append({"index": win["index"], "frames": [win["start"], win["start"] + clip_len],
                        "crop": win["crop"], "augment": aug})  # fmt: skip
    return records, clips


def _photo_motion(h: int, w: int, clip_len: int, rng: np.random.Generator) -> dict[str, Any]:
    """Per frame window centre and side (source pixels) of one photo clip, plus what to record."""
    base = min(h, w) * float(rng.uniform(*PHOTO_SCALE))
    z0, z1 = (float(z) for z in rng.uniform(*PHOTO_ZOOM, size=2))
    t = np.linspace(0.0, 1.0, clip_len) if clip_len > 1 else np.zeros(1)
    side = base / (z0 + (z1 - z0) * t)  # zoom in: the window shrinks
    half = side.max() / 2
    lo, hi = np.array([half, half]), np.array([w - half, h - half])  # centres keeping every window inside
    c0 = lo + (hi - lo) * rng.random(2)
    drift = rng.uniform(-PHOTO_DRIFT, PHOTO_DRIFT, size=2) * base
    c1 = np.clip(c0 + drift, lo, hi)
    shake_sigma = float(rng.uniform(0.0, PHOTO_SHAKE)) * base
    shake = rng.normal(0.0, shake_sigma, size=(clip_len, 2))
    centres = np.clip(c0[None] + (c1 - c0)[None] * t[:, None] + shake, lo, hi)
    record = {"side": round(base, 2), "zoom": [round(z0, 4), round(z1, 4)], "pan": [np.round(c0, 2).tolist(), np.round(c1, 2).tolist()],
              "shake_px": round(shake_sigma, 3)}  # fmt: skip
    return {"centres": centres, "sides": side, "record": record}


def _render_photo_clip(image: np.ndarray, motion: dict[str, Any], size: int) -> np.ndarray:
    centres, sides = motion["centres"], motion["sides"]
    h, w = image.shape[:2]
    # area-downscale once so the smallest window spans ~2 * size pixels, cropping the trajectory's bounding box first
    f = min(1.0, 2 * size / float(sides.min()))
    x0 = max(0, math.floor((centres[:, 0] - sides / 2).min()) - 2)
    y0 = max(0, math.floor((centres[:, 1] - sides / 2).min()) - 2)
    x1 = min(w, math.ceil((centres[:, 0] + sides / 2).max()) + 2)
    y1 = min(h, math.ceil((centres[:, 1] + sides / 2).max()) + 2)
    roi = image[y0:y1, x0:x1]
    if f < 1.0:
        dsize = (max(1, round(roi.shape[1] * f)), max(1, round(roi.shape[0] * f)))
        fx, fy = dsize[0] / roi.shape[1], dsize[1] / roi.shape[0]
        roi = cv2.resize(roi, dsize, interpolation=cv2.INTER_AREA)
    else:
        fx = fy = 1.0
    big = 2 * size
    frames = np.empty((len(sides), size, size, 3), np.uint8)
    for i, ((cx, cy), s) in enumerate(zip(centres, sides)):
        # inverse map: output pixel (u, v) of the big frame -> roi pixel (pixel centres aligned)
        sx, sy = s * fx / big, s * fy / big
        ox = ((cx - s / 2) - x0) * fx + 0.5 * sx - 0.5
        oy = ((cy - s / 2) - y0) * fy + 0.5 * sy - 0.5
        m = np.array([[sx, 0.0, ox], [0.0, sy, oy]])
        frame = cv2.warpAffine(roi, m, (big, big), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_REFLECT101)
        frames[i] = cv2.resize(frame, (size, size), interpolation=cv2.INTER_AREA)
    return frames


def _read_image(path: Path) -> np.ndarray:
    data = np.fromfile(str(path), np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None  # grey, 16-bit, alpha -> 8-bit BGR
    if image is None:
        raise InputError(f"{path}: cannot decode the image")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _render_photo(path: Path, settings: dict[str, Any], sha: str, todo: Sequence[int]) -> tuple[list[dict], dict[int, np.ndarray]]:
    size, clip_len, count, seed = settings["size"], settings["clip_len"], settings["clips_per_photo"], settings["seed"]
    image = _read_image(path)
    h, w = image.shape[:2]
    if min(h, w) < size // 2:
        raise InputError(f"{path}: too small ({w}x{h} < {size // 2} pixels on the short side)")
    records, clips = [], {}
    for j in range(count):
        rng = _clip_rng(seed, sha, j)
        motion = _photo_motion(h, w, clip_len, rng)
        aug = draw_augment(rng)
        if j in todo:
            clips[j] = apply_augment(_render_photo_clip(image, motion, size), aug, rng)
        records.append({"index": j, "motion": motion["record"], "augment": aug})
    return records, clips


def _safe_stem(path: Path) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", path.stem)[:40] or "source"


def _fingerprint(settings: dict[str, Any], sha: str) -> str:
    return hashlib.sha256(json.dumps({**settings, "sha256": sha, "format": FORMAT}, sort_keys=True).encode()).hexdigest()[:16]


def _build_source(job: dict[str, Any]) -> dict[str, Any]:
    """Render (or keep) the clips of one source; returns its record or ``{"skipped": reason}``."""
    path, out, kind, split, sha, settings = (Path(job["path"]), Path(job["out"]), job["kind"], job["split"],
                                             job["sha"], job["settings"])  # fmt: skip
    count = settings["clips_per_video" if kind == "video" else "clips_per_photo"]
    names = [f"{split}/{_safe_stem(path)}-{sha[:8]}-{j:02d}.npy" for j in range(count)]
    part_path = out / PARTS / f"{sha[:16]}.json"
    fp = _fingerprint(settings, sha)
    part = None
    if part_path.is_file():
        try:
            part = json.loads(part_path.read_text())
        except (OSError, ValueError):
            part = None
    if part is not None and part.get("fingerprint") == fp and [c["file"] for c in part["clips"]] == names:
        todo = [j for j, name in enumerate(names) if not (out / name).is_file()]
        if not todo:
            return part
    else:
        todo = list(range(count))
    render = _render_video if kind == "video" else _render_photo
    try:
        records, clips = render(path, settings, sha, todo)
    except (InputError, OSError, av.FFmpegError, cv2.error, ValueError) as e:
        return {"skipped": (str(e).splitlines() or [type(e).__name__])[0].removeprefix(f"{path}: ")}
    (out / split).mkdir(parents=True, exist_ok=True)
    for j, clip in clips.items():
        atomic_write(out / names[j], lambda f, clip=clip: np.save(f, clip))
    clip_records = [{"file": names[r["index"]], "source": str(path), "sha256": sha[:16], "kind": kind, "split": split, **r}
                    for r in records]  # fmt: skip
    part = {"fingerprint": fp, "source": str(path), "clips": clip_records}
    atomic_write_text(part_path, json.dumps(part))
    return part


def build_footage(
    folders: Sequence[str | Path] | None,
    out: str | Path,
    *,
    size: int = 64,
    clip_len: int = 16,
    clips_per_video: int = 24,
    clips_per_photo: int = 4,
    test_fraction: float = 0.2,
    seed: int = 0,
    workers: int = 1,
    on_progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Build the footage clips of every source under ``folders`` (``None``/empty: :func:`default_folders`)
    into ``out`` and return ``out``; ``on_progress(done, total)`` is called after each source.
    See the module docstring for the layout, the split, determinism and resuming."""
    if size < 16 or size % 2:
        raise ConfigError(f"size: expected an even number >= 16, got {size}")
    for name, value in (("clip_len", clip_len), ("clips_per_video", clips_per_video), ("clips_per_photo", clips_per_photo), ("workers", workers)):
        if value < 1:
            raise ConfigError(f"{name}: expected a positive int, got {value}")
    if not 0 <= test_fraction < 1:
        raise ConfigError(f"test_fraction: expected a value in [0, 1), got {test_fraction}")
    started = time.perf_counter()
    folders = [Path(f) for f in folders] if folders else default_folders()
    if not folders:
        raise InputError("no footage folders: none given and none of the Debian/scikit-image defaults exists "
                         "(see scripts/get_footage.sh)")  # fmt: skip
    sources, skipped = _find(folders)
    out = Path(out)
    try:
        (out / PARTS).mkdir(parents=True, exist_ok=True)
        (out / META).unlink(missing_ok=True)  # from now on the folder is an incomplete build
    except OSError as e:
        raise InputError(f"cannot create {out}: {e}") from None
    settings = {"size": size, "clip_len": clip_len, "clips_per_video": clips_per_video, "clips_per_photo": clips_per_photo,
                "test_fraction": test_fraction, "seed": seed}  # fmt: skip
    jobs, seen = [], {}
    for path in sources:
        try:
            sha = _sha256(path)
        except OSError as e:
            skipped.append({"path": str(path), "reason": f"not readable ({e.strerror or e})"})
            continue
        if sha in seen:
            skipped.append({"path": str(path), "reason": f"same bytes as {seen[sha]}"})
            continue
        seen[sha] = str(path)
        jobs.append({"path": str(path), "out": str(out), "kind": source_kind(path), "split": split_of(path, test_fraction),
                     "sha": sha, "settings": settings})  # fmt: skip
    results: list[dict[str, Any] | None] = [None] * len(jobs)
    if on_progress:
        on_progress(0, len(jobs))
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(min(workers, len(jobs))) as pool:
            futures = {pool.submit(_build_source, job): i for i, job in enumerate(jobs)}
            for done, future in enumerate(as_completed(futures), 1):
                results[futures[future]] = future.result()
                if on_progress:
                    on_progress(done, len(jobs))
    else:
        for done, job in enumerate(jobs, 1):
            results[done - 1] = _build_source(job)
            if on_progress:
                on_progress(done, len(jobs))
    clips, used = [], []
    for job, result in zip(jobs, results):
        assert result is not None
        if "skipped" in result:
            skipped.append({"path": job["path"], "reason": result["skipped"]})
            continue
        clips += result["clips"]
        used.append({"path": job["path"], "sha256": job["sha"][:16], "kind": job["kind"], "split": job["split"],
                     "group": source_group(Path(job["path"]).name), "clips": len(result["clips"])})  # fmt: skip
    skipped.sort(key=lambda s: s["path"])
    counts = {split: sum(c["split"] == split for c in clips) for split in ("train", "test")}
    meta = {
        "name": "footage",
        "format": FORMAT,
        "settings": settings,
        "folders": [str(f) for f in folders],
        "sources": used,
        "skipped": skipped,
        "counts": counts,
        "clips": clips,
        "seconds": round(time.perf_counter() - started, 2),
    }
    atomic_write_text(out / META, json.dumps(meta, indent=1))
    _warn_skipped(skipped)
    return out


def load_footage_meta(root: str | Path) -> dict[str, Any]:
    """``footage.json`` of a complete build under ``root`` (:class:`InputError` when missing or unreadable)."""
    path = Path(root) / META
    if not path.is_file():
        raise InputError(f"{path} not found (an incomplete or missing footage build): run `streamguard data footage ... --output {root}` first")
    try:
        meta = json.loads(path.read_text())
        meta["clips"], meta["settings"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"{path}: unreadable footage metadata ({e})") from None
    return meta


class FootageClips(Dataset):
    """Footage clips of one split: ``(clip (3, T, size, size) float32 in [0, 1], 0)``.

    Label 0 always: real footage only ever serves as benign background for the patch detector.
    ``records[i]`` is clip ``i``'s entry of ``footage.json`` (source, kind, window, augmentation).
    """

    def __init__(self, root: str | Path, split: str = "train") -> None:
        if split not in ("train", "test"):
            raise ConfigError(f"split: expected 'train' or 'test', got {split!r}")
        self.root = Path(root)
        self.split = split
        self.meta = load_footage_meta(self.root)
        self.records = [c for c in self.meta["clips"] if c["split"] == split]
        s = self.meta["settings"]
        self.shape = (s["clip_len"], s["size"], s["size"], 3)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path = self.root / self.records[i]["file"]
        try:
            clip = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            raise InputError(f"{path}: unreadable footage clip ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        if clip.shape != self.shape or clip.dtype != np.uint8:
            raise InputError(f"{path}: expected a uint8 clip of shape {self.shape}, got {clip.dtype} {clip.shape}")
        return torch.from_numpy(clip).permute(3, 0, 1, 2).float().div_(255).contiguous(), 0


__all__ = [
    "DEBIAN_FOLDERS", "HELD_OUT", "FootageClips", "FootageWarning", "build_footage", "default_folders", "find_sources",
    "load_footage_meta", "source_group", "split_of",
]  # fmt: skip
