"""In-memory JPEG and H.264 round trips: what a camera's or a network's codec does to frames.

Used by the compression baselines, the patch families' codec pass and the real-footage augmentation.
Both are deterministic: x264 runs single-threaded on its C code path (``asm=0``: its SIMD
macroblock-tree code occasionally gives a different bitstream for the same input), and the colour
conversion is OpenCV's (BT.601, limited range, as the decoder assumes) both ways, with no swscale
state between calls.
"""

from __future__ import annotations

from fractions import Fraction

import av
import cv2
import numpy as np

from .errors import InputError


def h264_roundtrip(
    frames: np.ndarray, crf: int, *, preset: str = "medium", tune: str | None = None, x264_params: str | None = "asm=0",
    fps: int = 25,
) -> np.ndarray:
    """Encode ``(T, H, W, 3)`` uint8 RGB frames with libx264 (yuv420p, ``crf``) and decode them back.

    Odd sizes are edge-padded to even (4:2:0 needs it) and cropped back. ``tune="zerolatency"``
    (no B-frames or lookahead) is what live camera encoders use.
    """
    t, h, w, _ = frames.shape
    padded = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    enc = av.CodecContext.create("libx264", "w")
    enc.width, enc.height, enc.pix_fmt = padded.shape[2], padded.shape[1], "yuv420p"
    enc.time_base, enc.framerate = Fraction(1, fps), Fraction(fps, 1)
    enc.thread_count = 1
    extra = {"tune": tune} if tune else {}
    extra |= {"x264-params": x264_params} if x264_params else {}
    enc.options = {"crf": str(crf), "preset": preset, "threads": "1", **extra}
    packets = []
    for i, image in enumerate(padded):
        frame = av.VideoFrame.from_ndarray(cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2YUV_I420), format="yuv420p")
        frame.pts = i
        packets += enc.encode(frame)
    packets += enc.encode(None)
    dec = av.CodecContext.create("h264", "r")
    dec.thread_count = 1
    decoded = [f for packet in packets for f in dec.decode(packet)] + list(dec.decode(None))
    if len(decoded) != t:
        raise InputError(f"H.264 round trip returned {len(decoded)} frames for {t}")
    return np.stack([cv2.cvtColor(f.to_ndarray(format="yuv420p"), cv2.COLOR_YUV2RGB_I420) for f in decoded])[:, :h, :w]


def jpeg_roundtrip(frames: np.ndarray, quality: int) -> np.ndarray:
    """Each ``(H, W, 3)`` uint8 RGB frame of ``(T, H, W, 3)`` through JPEG at ``quality`` (1-100) and back."""
    params = [cv2.IMWRITE_JPEG_QUALITY, int(quality)]
    return np.stack([cv2.imdecode(cv2.imencode(".jpg", f[..., ::-1], params)[1], cv2.IMREAD_COLOR)[..., ::-1] for f in frames])
