"""Sample clips: a deterministic synthetic scene, written as a video or a folder of frames
(the demo's clip, the tests' and the benchmark's inputs)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np

from p2v_fast.errors import InputError
from p2v_fast.media.writer import (
    frame_rate,
    partial_path,
    prepare_output,
    save_png,
    tag_bt709,
    video_stream,
    yuv_frame,
)


def sample_frame(i: int, size: tuple[int, int] = (256, 192)) -> np.ndarray:
    """Frame ``i`` of the synthetic sample scene: uint8 RGB ``[H, W, 3]``.

    A colourful texture (smooth colour waves plus a random-colour checkerboard, fixed seed)
    pans 3 px right per frame; a white-rimmed disc moves along an ellipse on top.
    """
    w, h = size
    rng = np.random.default_rng(1234)
    palette = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8).astype(np.float32)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    xs = xs - 3.0 * i  # the scene moves right
    waves = np.stack(
        [
            0.5 + 0.5 * np.sin(xs / 17.0 + ys / 29.0),
            0.5 + 0.5 * np.sin(xs / 23.0 - ys / 13.0 + 2.0),
            0.5 + 0.5 * np.cos((xs + ys) / 31.0),
        ],
        axis=-1,
    )
    cell = palette[(ys // 16).astype(int) % 64, (xs // 16).astype(int) % 64]
    img = 0.55 * 255.0 * waves + 0.45 * cell
    cx = w / 2 + 0.3 * w * math.cos(i / 4.0)
    cy = h / 2 + 0.25 * h * math.sin(i / 4.0)
    r2 = (xs + 3.0 * i - cx) ** 2 + (ys - cy) ** 2
    radius = 0.12 * min(w, h)
    img[r2 < (radius + 2) ** 2] = (255, 255, 255)
    img[r2 < radius**2] = (220, 40, 40)
    return np.clip(img, 0, 255).astype(np.uint8)


def _sine(seconds: float, rate: int, freq: float = 440.0) -> np.ndarray:
    t = np.arange(round(seconds * rate), dtype=np.float32) / rate
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)[None, :]  # [1, samples]


def make_sample_clip(
    path: str | Path,
    n_frames: int = 24,
    size: tuple[int, int] = (256, 192),
    fps: float = 12.0,
    with_audio: bool = True,
    frames: Sequence[np.ndarray] | None = None,
) -> Path:
    """Write a deterministic synthetic clip (see :func:`sample_frame`) and return its path.

    ``frames`` (uint8 RGB [H, W, 3], all of ``size``): write these instead of the synthetic
    pattern (``n_frames`` is then their count).

    The container follows the suffix: .mp4/.mov (H.264 + AAC), .mkv (H.264 + AAC),
    .webm (VP9 or VP8 + Opus), .gif (no audio; ``with_audio`` is ignored). The audio is a
    440 Hz sine as long as the video. Written atomically.
    """
    out = prepare_output(path)
    suffix = out.suffix.lower()
    codecs = av.codecs_available
    vcodec: str | None
    acodec: str | None
    vs: Any
    aud: Any
    if suffix in (".mp4", ".mov", ".mkv"):
        vcodec, pix_fmt, acodec = "libx264", "yuv420p", "aac"
    elif suffix == ".webm":
        vcodec = next((c for c in ("libvpx-vp9", "libvpx") if c in codecs), None)
        acodec = next((c for c in ("libopus", "opus", "libvorbis") if c in codecs), None)
        pix_fmt = "yuv420p"
        if vcodec is None or (with_audio and acodec is None):
            raise InputError(f"this PyAV build cannot encode webm for '{out}'")
    elif suffix == ".gif":
        vcodec, pix_fmt, acodec = "gif", "rgb8", None
    else:
        raise InputError(f"unsupported sample clip suffix '{suffix}' in '{out}'")
    if frames is not None:
        n_frames = len(frames)
        if any(f.shape != (size[1], size[0], 3) or f.dtype != np.uint8 for f in frames):
            raise InputError(f"sample clip frames must be uint8 [{size[1]}, {size[0]}, 3]")
    if n_frames < 1 or fps <= 0:
        raise InputError(f"sample clip needs n_frames >= 1 and fps > 0, got {n_frames}, {fps}")

    rate = frame_rate(fps)
    tmp = partial_path(out)
    try:
        with av.open(str(tmp), mode="w", format={".mkv": "matroska"}.get(suffix, suffix[1:])) as c:
            if vcodec == "libx264":
                vs = video_stream(c, vcodec, rate, size, crf=18)
            else:
                vs = c.add_stream(vcodec, rate=rate)
                vs.width, vs.height = size
                vs.pix_fmt = pix_fmt
                tag_bt709(vs, rate)
            aud = None  # an audio stream
            if with_audio and acodec is not None:
                a_rate = 48000
                aud = c.add_stream(acodec, rate=a_rate)
                aud.layout = "mono"
            for i in range(n_frames):
                image = sample_frame(i, size) if frames is None else frames[i]
                c.mux(vs.encode(yuv_frame(image, i, pix_fmt)))
            c.mux(vs.encode(None))
            if aud is not None:
                samples = _sine(n_frames / float(rate), a_rate)
                frame = av.AudioFrame.from_ndarray(samples, format="flt", layout="mono")
                frame.sample_rate, frame.pts = a_rate, 0
                frame.time_base = Fraction(1, a_rate)
                c.mux(aud.encode(frame))
                c.mux(aud.encode(None))
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def make_sample_frames_folder(folder: str | Path, n: int = 24, size: tuple[int, int] = (256, 192)) -> Path:
    """Write ``n`` sample frames as ``frame_1.png`` ... ``frame_<n>.png`` (unpadded, so the
    folder exercises natural sorting) and return the folder."""
    d = Path(folder)
    for i in range(n):
        save_png(d / f"frame_{i + 1}.png", sample_frame(i, size))
    return d
