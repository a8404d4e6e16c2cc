"""Reading video: probing a clip, selecting its frames, streaming them, and their timing.

Inputs are video files that FFmpeg (through PyAV) can decode -- .mp4 .mov .webm .gif .mkv .avi
and more -- or a folder of .png/.jpg/.jpeg/.webp images taken in natural sort order. Reading is
streaming: :func:`read_frames` decodes one frame at a time and never holds the whole clip.
Display rotation (phone videos) is applied, so frames come out the way a player shows them.
Frames are ``numpy.uint8`` ``[H, W, 3]`` RGB arrays; sizes are ``(W, H)``.
:func:`output_timing` says when the selected frames play (a variable frame rate is kept), so the
writer keeps the audio in sync.

User-caused problems raise :class:`~p2v_fast.errors.InputError` with a one-line message.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import av.error
import numpy as np
from PIL import Image, ImageOps

from p2v_fast.errors import InputError, one_line
from p2v_fast.media.framing import check_resize, fit_array, fit_cover, fit_frame
from p2v_fast.text import plural

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
VIDEO_SUFFIXES = (".mp4", ".mov", ".webm", ".gif", ".mkv", ".avi")


@dataclass(frozen=True)
class VideoInfo:
    """What :func:`probe` found. ``width``/``height`` are as displayed (rotation applied)."""

    path: Path
    width: int
    height: int
    fps: float
    n_frames: int  # exact: container count for mp4/mov, else counted by decoding
    has_audio: bool
    is_folder: bool


@dataclass(frozen=True)
class Timing:
    """When the selected frames play: :func:`output_timing`."""

    fps: float  # nominal output rate: the source's (average) rate / stride
    start: float  # seconds: source time of the first selected frame (where its audio starts)
    duration: float  # seconds of source time the selected frames cover
    frame_times: tuple[float, ...] | None = None  # variable rate: each frame's time from ``start``; None: i / fps

    @property
    def variable(self) -> bool:
        return self.frame_times is not None


def format_fps(fps: float) -> str:
    """A frame rate as a source states it: 12 -> "12", 30000/1001 -> "29.97", 24000/1001 -> "23.976"."""
    return f"{fps:.3f}".rstrip("0").rstrip(".")


def _natural_key(name: str) -> list[Any]:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def list_images(folder: Path) -> list[Path]:
    """Image files in ``folder`` (no hidden files), in natural sort order (2 before 10)."""
    try:
        entries = list(folder.iterdir())
    except OSError as e:
        raise InputError(f"cannot read folder '{folder}': {one_line(e)}") from None
    images = [p for p in entries if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file()]
    return sorted(images, key=lambda p: _natural_key(p.name))


def _open_image(path: Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            return ImageOps.exif_transpose(im).convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise InputError(f"cannot read image '{path}': {e}") from None


def open_video(path: Path) -> av.container.InputContainer:
    try:
        container = av.open(str(path), mode="r")
    except PermissionError:
        raise InputError(f"cannot read '{path}': permission denied") from None
    except EOFError:
        raise InputError(f"video is empty or truncated: '{path}'") from None
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise InputError(f"not a readable video: '{path}' ({one_line(e)})") from None
    if not container.streams.video:
        container.close()
        raise InputError(f"no video stream in '{path}'")
    return container


def _rotation_k(frame: av.VideoFrame) -> int:
    """Quarter turns (np.rot90 sense, counter-clockwise) that make ``frame`` display upright."""
    try:
        return round(frame.rotation / 90) % 4
    except (AttributeError, TypeError, ValueError):
        return 0


def _check_input_path(p: Path, what: str = "input") -> list[Path]:
    """A folder's images (InputError if it has none); [] for a regular, readable file (InputError
    if ``p``, the ``what``, is missing, a FIFO, a device or unreadable). Only the file system is asked."""
    if not p.exists():
        raise InputError(f"{what} does not exist: '{p}'")
    if p.is_dir():
        images = list_images(p)
        if not images:
            raise InputError(f"no {'/'.join(IMAGE_SUFFIXES)} images in folder '{p}'")
        return images
    if not p.is_file():  # a FIFO or a device would be read forever
        raise InputError(f"{what} '{p}' is not a regular file or a folder (a FIFO, device or socket); "
                         "give a video file or a folder of images")
    if not os.access(p, os.R_OK):
        raise InputError(f"cannot read '{p}': permission denied")
    return []


def check_input(path: str | Path, what: str = "input") -> None:
    """InputError (one line, naming the ``what``) unless ``path`` is a folder with images or a file
    whose container opens with a video stream (its header only: nothing is decoded). Cheap, and
    free of the networks' libraries, so a command refuses a bad input before it loads them;
    :func:`probe` checks the same and more."""
    p = Path(path)
    if not _check_input_path(p, what):
        open_video(p).close()


def probe(path: str | Path, folder_fps: float = 24.0) -> VideoInfo:
    """Describe a video file or an image folder; raise InputError if it cannot be read.

    For a video the first frame is decoded (to prove the file is decodable and to learn its
    display rotation); containers that do not store a frame count (webm, mkv, gif, ...) are
    decoded in full to count frames exactly. A folder's fps is ``folder_fps``.
    """
    p = Path(path)
    images = _check_input_path(p)
    if images:
        if folder_fps <= 0:
            raise InputError(f"folder fps must be positive, got {folder_fps}")
        w, h = _open_image(images[0]).size
        return VideoInfo(p, w, h, float(folder_fps), len(images), False, True)

    with open_video(p) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        has_audio = bool(container.streams.audio)
        stored = stream.frames if p.suffix.lower() in (".mp4", ".mov", ".m4v") else 0
        count = 0
        first: av.VideoFrame | None = None
        try:
            for frame in container.decode(stream):
                if first is None:
                    first = frame
                count += 1
                if stored > 0:
                    break  # the container's count is trusted; one frame proves decodability
        except av.error.FFmpegError as e:
            if first is None:
                raise InputError(f"not a readable video: '{p}' ({one_line(e)})") from None
            # a damaged tail: keep what decoded
        if first is None:
            raise InputError(f"video has no frames: '{p}'")
        n_frames = stored if stored > 0 else count
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else 0.0
        if not 0 < fps < 1000 and stream.duration and stream.time_base:
            fps = n_frames / float(stream.duration * stream.time_base)
        if not 0 < fps < 1000:
            raise InputError(f"cannot determine the frame rate of '{p}'")
        w, h = first.width, first.height
        if _rotation_k(first) % 2:
            w, h = h, w
    return VideoInfo(p, w, h, fps, n_frames, has_audio, False)


def selected_count(info: VideoInfo, start: int = 0, max_frames: int | None = None, stride: int = 1) -> int:
    """How many frames ``start, start+stride, ...`` (at most ``max_frames``) selects."""
    if start < 0:
        raise InputError(f"start frame must be >= 0, got {start}")
    if stride < 1:
        raise InputError(f"stride must be >= 1, got {stride}")
    if max_frames is not None and max_frames < 1:
        raise InputError(f"max frames must be >= 1, got {max_frames}")
    if stride > 1 and start < info.n_frames and stride > info.n_frames - start:
        raise InputError(f"--stride {stride} is longer than the clip: '{info.path}' has "
                         f"{plural(info.n_frames - start, 'frame')} from frame {start}, so it would select one frame")
    n = len(range(start, info.n_frames, stride))
    if max_frames is not None:
        n = min(n, max_frames)
    if n == 0:
        raise InputError(f"start frame {start} is beyond the end of '{info.path}' ({plural(info.n_frames, 'frame')})")
    return n


def read_frames(
    path: str | Path | VideoInfo,
    size: tuple[int, int] | None = None,
    start: int = 0,
    max_frames: int | None = None,
    stride: int = 1,
    resize: str = "crop",
) -> Iterator[np.ndarray]:
    """Stream frames ``start, start+stride, ...`` (at most ``max_frames``) of a video/folder.

    Yields uint8 RGB ``[H, W, 3]`` arrays, one at a time. With ``size=(W, H)`` each frame is
    made exactly that size by ``resize`` (:func:`fit_frame`: scaled to cover and centre-cropped,
    stretched, or fitted inside and padded); otherwise frames keep the probed size (folder
    images that differ from the first image are fitted to it).
    Arguments are validated (InputError) when called, before the first frame is pulled.
    Passing the :class:`VideoInfo` from :func:`probe` instead of a path skips re-probing.
    """
    info = path if isinstance(path, VideoInfo) else probe(path)
    count = selected_count(info, start, max_frames, stride)
    if size is not None and (size[0] <= 0 or size[1] <= 0):
        raise InputError(f"invalid output size {size[0]}x{size[1]}")
    check_resize(resize)
    wanted = range(start, start + count * stride, stride)
    if info.is_folder:
        return _read_folder(info, size, wanted, resize)
    return _read_video(info, size, wanted, resize)


def _read_folder(info: VideoInfo, size: tuple[int, int] | None, wanted: range, resize: str) -> Iterator[np.ndarray]:
    images = list_images(info.path)
    target = size or (info.width, info.height)
    for i in wanted:
        if i >= len(images):
            return
        image = _open_image(images[i])
        if size is None:
            yield np.asarray(fit_cover(image, target))
        else:
            yield np.asarray(fit_frame(image, target, resize, (info.width, info.height)))


def _read_video(info: VideoInfo, size: tuple[int, int] | None, wanted: range,
                resize: str) -> Iterator[np.ndarray]:
    with open_video(info.path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        index = 0
        try:
            for frame in container.decode(stream):
                if index > wanted[-1]:
                    break
                if index >= wanted.start and (index - wanted.start) % wanted.step == 0:
                    arr = frame.to_ndarray(format="rgb24")
                    k = _rotation_k(frame)
                    if k:
                        arr = np.rot90(arr, k)
                    yield fit_array(arr, size, resize, (info.width, info.height))
                index += 1
        except av.error.FFmpegError as e:
            raise InputError(f"failed to decode '{info.path}' at frame {index}: {one_line(e)}") from None


def _packet_times(path: Path) -> list[float]:
    """Presentation times (seconds, sorted) of the first video stream's packets; no decoding."""
    with open_video(path) as container:
        stream = container.streams.video[0]
        tb = stream.time_base or Fraction(1, 1)
        return sorted(float(pk.pts * tb) for pk in container.demux(stream) if pk.pts is not None and pk.size)


def output_timing(info: VideoInfo, start: int = 0, count: int = 1, stride: int = 1) -> Timing:
    """When the ``count`` frames ``start, start+stride, ...`` play, and the source window their
    audio is cut from.

    A constant-rate source (every frame within 2 ms of a constant grid; the packets' timestamps
    are read, nothing decoded) plays them at ``fps / stride``. A variable-rate source keeps each
    frame's own time, so the audio cut from the same window stays in sync (re-timing it to a
    constant rate drifts by up to the rate's variation times the clip's length). Folders play at
    their ``fps``.
    """
    times: list[float] = []
    if not info.is_folder:
        try:
            times = _packet_times(info.path)
        except (InputError, av.error.FFmpegError):
            times = []
    if len(times) <= start:  # a folder, or no timestamps: the nominal rate from time 0
        return Timing(info.fps / stride, start / info.fps, count * stride / info.fps)
    first = times[start]
    off_grid = max(abs(t - times[0] - i / info.fps) for i, t in enumerate(times))
    if off_grid <= 0.002:
        return Timing(info.fps / stride, first, count * stride / info.fps)
    picked = [times[start + k * stride] for k in range(count) if start + k * stride < len(times)]
    end_at = start + count * stride
    mean_frame = (times[-1] - times[0]) / max(len(times) - 1, 1)
    end = times[end_at] if end_at < len(times) else times[-1] + mean_frame
    return Timing(info.fps / stride, first, end - first, tuple(t - first for t in picked))
