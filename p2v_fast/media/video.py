"""Video and image-sequence input/output.

Every frame that crosses this module's boundary is a ``numpy.uint8`` array of shape
``[H, W, 3]`` in RGB order with values 0..255. Sizes are always given as ``(W, H)``.

Inputs are video files that FFmpeg (through PyAV) can decode -- .mp4 .mov .webm .gif .mkv .avi
and more -- or a folder of .png/.jpg/.jpeg/.webp images taken in natural sort order. Reading is
streaming: :func:`read_frames` decodes one frame at a time and never holds the whole clip.
Display rotation (phone videos) is applied, so frames come out the way a player shows them.

Output is written by :class:`VideoWriter` in the container its name asks for (:data:`OUTPUT_FORMATS`:
.mp4/.m4v, .mov and .mkv hold H.264 (libx264, yuv420p, BT.709 tags) with AAC audio, .webm holds
VP9 with Opus), to a hidden temporary file moved into place with :func:`os.replace` only when
it is complete; the source's audio, trimmed to the edited time window, is re-encoded. Frames
keep the source's timestamps where the source's frame rate is variable (:func:`output_timing`),
so the audio stays in sync.

User-caused problems raise :class:`~p2v_fast.errors.InputError` with a one-line message.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from types import TracebackType
from typing import Any, cast

import av
import av.error
import numpy as np
from av.video.reformatter import ColorPrimaries, ColorRange, Colorspace, ColorTrc
from PIL import Image, ImageOps

from p2v_fast.errors import InputError, disk_full, one_line, write_error
from p2v_fast.files import write_bytes_atomic

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
VIDEO_SUFFIXES = (".mp4", ".mov", ".webm", ".gif", ".mkv", ".avi")
_AAC_RATES = (96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000)
_AUDIO_LAG_S = 1.0  # audio is muxed this far behind the video so no chunk outruns the picture
#: Largest working frame side in pixels (SD2 is trained at 512 and 768; 2048 is a 256x256 latent).
MAX_SIDE = 2048
#: Time base of a variable-frame-rate output (90 kHz, as MPEG uses; exact for 24, 25, 30, 30000/1001, ...).
VFR_TIME_BASE = Fraction(1, 90000)


@dataclass(frozen=True)
class OutputFormat:
    """A container :class:`VideoWriter` writes, chosen by the output's extension."""

    container: str  # FFmpeg muxer name
    video: tuple[str, ...]  # encoders, first available wins
    audio: tuple[str, ...]


OUTPUT_FORMATS = {
    ".mp4": OutputFormat("mp4", ("libx264",), ("aac",)),
    ".m4v": OutputFormat("mp4", ("libx264",), ("aac",)),
    ".mov": OutputFormat("mov", ("libx264",), ("aac",)),
    ".mkv": OutputFormat("matroska", ("libx264",), ("aac",)),
    ".webm": OutputFormat("webm", ("libvpx-vp9", "libvpx"), ("libopus", "opus", "libvorbis")),
}


def output_format(path: str | Path) -> OutputFormat:
    """The container and codecs for ``path``'s extension; InputError (listing the supported ones) if
    there is none, or if this PyAV build lacks its encoders."""
    out = Path(path)
    fmt = OUTPUT_FORMATS.get(out.suffix.lower())
    if fmt is None:
        got = f"'{out.suffix}'" if out.suffix else "no extension"
        raise InputError(f"output '{out}' has {got}; a video output must end in "
                         f"{', '.join(OUTPUT_FORMATS)}")
    if not any(c in av.codecs_available for c in fmt.video):
        raise InputError(f"this PyAV build cannot encode {out.suffix} (no {' or '.join(fmt.video)} encoder); "
                         "use .mp4")
    return fmt


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


# --------------------------------------------------------------------------- probing


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


def _open_video(path: Path) -> av.container.InputContainer:
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


def probe(path: str | Path, folder_fps: float = 24.0) -> VideoInfo:
    """Describe a video file or an image folder; raise InputError if it cannot be read.

    For a video the first frame is decoded (to prove the file is decodable and to learn its
    display rotation); containers that do not store a frame count (webm, mkv, gif, ...) are
    decoded in full to count frames exactly. A folder's fps is ``folder_fps``.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"input does not exist: '{p}'")
    if p.is_dir():
        if folder_fps <= 0:
            raise InputError(f"folder fps must be positive, got {folder_fps}")
        images = list_images(p)
        if not images:
            raise InputError(f"no {'/'.join(IMAGE_SUFFIXES)} images in folder '{p}'")
        w, h = _open_image(images[0]).size
        return VideoInfo(p, w, h, float(folder_fps), len(images), False, True)
    if not p.is_file():  # a FIFO or a device would be read forever
        raise InputError(f"input '{p}' is not a regular file or a folder (a FIFO, device or socket); "
                         "give a video file or a folder of images")
    if not os.access(p, os.R_OK):
        raise InputError(f"cannot read '{p}': permission denied")

    with _open_video(p) as container:
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


# --------------------------------------------------------------------------- sizes & selection


def working_size(width: int, height: int, short_side: int = 512, multiple: int = 64,
                 max_side: int | None = MAX_SIDE) -> tuple[int, int]:
    """``(W, H)`` with the short side = ``short_side`` and the long side a multiple of
    ``multiple`` as close to the source aspect ratio as possible (halves round up). Neither side
    may exceed ``max_side`` (InputError naming the limit and the largest ``--size`` that fits)."""
    if multiple <= 0:
        raise InputError(f"size multiple must be positive, got {multiple}")
    if short_side <= 0 or short_side % multiple:
        raise InputError(f"short side must be a positive multiple of {multiple}, got {short_side}")
    if width <= 0 or height <= 0:
        raise InputError(f"invalid frame size {width}x{height}")
    short, long = min(width, height), max(width, height)

    def long_side(s: int) -> int:
        return max(multiple, math.floor(long * s / short / multiple + 0.5) * multiple)

    long_out = long_side(short_side)
    if max_side is not None and long_out > max_side:
        fits = [s for s in range(multiple, max_side + 1, multiple) if long_side(s) <= max_side]
        hint = (f"the largest --size that fits this {width}x{height} source is {fits[-1]}" if fits else
                f"no --size fits this {width}x{height} source (its aspect ratio is too extreme)")
        w, h = (short_side, long_out) if width <= height else (long_out, short_side)
        raise InputError(f"working size {w}x{h} (--size {short_side}) is over the limit of {max_side} pixels per "
                         f"side; {hint}")
    return (short_side, long_out) if width <= height else (long_out, short_side)


def selected_count(info: VideoInfo, start: int = 0, max_frames: int | None = None, stride: int = 1) -> int:
    """How many frames ``start, start+stride, ...`` (at most ``max_frames``) selects."""
    if start < 0:
        raise InputError(f"start frame must be >= 0, got {start}")
    if stride < 1:
        raise InputError(f"stride must be >= 1, got {stride}")
    if max_frames is not None and max_frames < 1:
        raise InputError(f"max frames must be >= 1, got {max_frames}")
    if stride > 1 and start < info.n_frames and stride > info.n_frames - start:
        raise InputError(f"--stride {stride} is longer than the clip: '{info.path}' has {info.n_frames - start} "
                         f"frames from frame {start}, so it would select one frame")
    n = len(range(start, info.n_frames, stride))
    if max_frames is not None:
        n = min(n, max_frames)
    if n == 0:
        raise InputError(f"start frame {start} is beyond the end of '{info.path}' ({info.n_frames} frames)")
    return n


def fit_cover(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Scale ``image`` to cover ``size`` = (W, H) keeping aspect, then centre-crop (LANCZOS)."""
    w, h = image.size
    tw, th = size
    if (w, h) == (tw, th):
        return image
    if w * th > tw * h:  # source is wider: crop left/right
        bw = h * tw / th
        box = ((w - bw) / 2, 0.0, (w + bw) / 2, float(h))
    else:
        bh = w * th / tw
        box = (0.0, (h - bh) / 2, float(w), (h + bh) / 2)
    return image.resize((tw, th), Image.Resampling.LANCZOS, box=box)


RESIZE_MODES = ("crop", "stretch", "pad")


def pad_box(source: tuple[int, int], size: tuple[int, int]) -> tuple[int, int, int, int]:
    """Box ``(x, y, w, h)`` of a ``source`` = (W, H) picture fitted inside ``size`` = (W, H),
    aspect kept, centred; ``w`` and ``h`` even (H.264 needs even sizes) and at least 2."""
    (sw, sh), (tw, th) = source, size
    scale = min(tw / sw, th / sh)
    w = min(tw - tw % 2, max(2, 2 * round(sw * scale / 2)))
    h = min(th - th % 2, max(2, 2 * round(sh * scale / 2)))
    return (tw - w) // 2, (th - h) // 2, w, h


def frame_geometry(width: int, height: int, size: int = 512,
                   resize: str = "crop") -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """The working frame ``(W, H)`` for a ``width`` x ``height`` source at ``size``, and the box
    ``(x, y, w, h)`` of the source's picture inside it (the whole frame unless ``pad``).

    - ``crop``: short side ``size``, long side the nearest multiple of 64 to the aspect ratio
      (:func:`working_size`); scaled to cover, centre-cropped. 854x480 at 512 -> 896x512.
    - ``stretch``: ``size`` x ``size``, squashed (the paper's and its code's framing).
      854x480 at 512 -> 512x512.
    - ``pad``: ``size`` x ``size``, the picture fitted inside with its aspect kept and black
      bars around it. 854x480 at 512 -> 512x512 holding a 512x288 picture at (0, 112).
    """
    if resize not in RESIZE_MODES:
        raise InputError(f"--resize must be one of {', '.join(RESIZE_MODES)}; got {resize!r}")
    if resize == "crop":
        wh = working_size(width, height, size)
        return wh, (0, 0, *wh)
    working_size(size, size, size)  # validates size
    if width <= 0 or height <= 0:
        raise InputError(f"invalid frame size {width}x{height}")
    box = pad_box((width, height), (size, size)) if resize == "pad" else (0, 0, size, size)
    return (size, size), box


def fit_frame(image: Image.Image, size: tuple[int, int], resize: str = "crop",
              source: tuple[int, int] | None = None) -> Image.Image:
    """``image`` as a ``size`` = (W, H) working frame by ``resize`` (see :func:`frame_geometry`).
    ``pad`` places the picture in the box :func:`pad_box` gives for ``source`` (the clip's
    probed size; default the image's own), so every frame of a clip gets the same box."""
    if resize == "stretch":
        return image if image.size == tuple(size) else image.resize(size, Image.Resampling.LANCZOS)
    if resize == "pad":
        x, y, w, h = pad_box(source or image.size, size)
        canvas = Image.new("RGB", size, (0, 0, 0))
        canvas.paste(fit_cover(image, (w, h)), (x, y))
        return canvas
    return fit_cover(image, size)


def _to_size(arr: np.ndarray, size: tuple[int, int] | None, resize: str = "crop",
             source: tuple[int, int] | None = None) -> np.ndarray:
    if size is None or ((arr.shape[1], arr.shape[0]) == tuple(size) and resize != "pad"):
        return np.ascontiguousarray(arr)
    return np.asarray(fit_frame(Image.fromarray(arr), size, resize, source))


# --------------------------------------------------------------------------- reading


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
    if resize not in RESIZE_MODES:
        raise InputError(f"--resize must be one of {', '.join(RESIZE_MODES)}; got {resize!r}")
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
    with _open_video(info.path) as container:
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
                    yield _to_size(arr, size, resize, (info.width, info.height))
                index += 1
        except av.error.FFmpegError as e:
            raise InputError(f"failed to decode '{info.path}' at frame {index}: {one_line(e)}") from None


# --------------------------------------------------------------------------- timing


def _packet_times(path: Path) -> list[float]:
    """Presentation times (seconds, sorted) of the first video stream's packets; no decoding."""
    with _open_video(path) as container:
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


# --------------------------------------------------------------------------- writing


def _partial_path(out: Path) -> Path:
    return out.with_name(f".{out.stem}.partial{out.suffix or '.mp4'}")


def _prepare_output(out_path: str | Path) -> Path:
    out = Path(out_path)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot create output folder '{out.parent}': {one_line(e)}") from None
    if out.is_dir():
        raise InputError(f"output path is a folder: '{out}'")
    if out.exists() and not out.is_file():
        raise InputError(f"output '{out}' exists and is not a regular file (a device, FIFO or socket)")
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise InputError(f"output folder is not writable: '{out.parent}'")
    return out


def _check_frame(frame: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if frame.dtype != np.uint8 or frame.shape != (size[1], size[0], 3):
        raise ValueError(f"expected uint8 frame of shape {(size[1], size[0], 3)}, got {frame.dtype} {frame.shape}")
    return np.ascontiguousarray(frame)


def _rate(fps: float) -> Fraction:
    """``fps`` as a fraction: 30000/1001 for 29.97; exact enough for very low rates too."""
    rate = Fraction(fps).limit_denominator(1001)
    if rate <= 0 or abs(float(rate) - fps) > 1e-6 * fps:
        rate = Fraction(fps).limit_denominator(1_000_000)
    return rate


def _video_stream(container: av.container.OutputContainer, codec: str, rate: Fraction, size: tuple[int, int],
                  crf: int, time_base: Fraction | None = None) -> av.video.stream.VideoStream:
    """A yuv420p ``codec`` stream (libx264, or VP9/VP8 for webm) at constant quality ``crf``
    (x264's scale; VP9's 0..63 is offset: x264's 18 looks about like VP9's 28), BT.709 tagged."""
    stream: Any = container.add_stream(codec, rate=rate)
    stream.width, stream.height = size
    stream.pix_fmt = "yuv420p"
    _tag_bt709(stream, rate, time_base)
    if codec == "libx264":
        stream.options = {"crf": str(crf), "preset": "medium"}
    else:  # libvpx: constant quality, multithreaded rows
        stream.options = {"crf": str(min(63, crf + 10)), "b": "0", "deadline": "good", "cpu-used": "4", "row-mt": "1"}
    return stream


def _tag_bt709(stream: av.video.stream.VideoStream, rate: Fraction, time_base: Fraction | None = None) -> None:
    """Set the time base and tag BT.709 limited range, matching :func:`_yuv_frame`."""
    cc = stream.codec_context
    cc.time_base = time_base or 1 / rate
    if (stream.pix_fmt or "").startswith("yuv"):
        cc.colorspace = Colorspace.ITU709
        cc.color_primaries = ColorPrimaries.BT709
        cc.color_trc = ColorTrc.BT709
        cc.color_range = ColorRange.MPEG


def _yuv_frame(frame: np.ndarray, pts: int, pix_fmt: str = "yuv420p", time_base: Fraction | None = None
               ) -> av.VideoFrame:
    vf = av.VideoFrame.from_ndarray(frame, format="rgb24")
    if pix_fmt.startswith("yuv"):
        vf = vf.reformat(format=pix_fmt, dst_colorspace=Colorspace.ITU709, dst_color_range=ColorRange.MPEG)
    else:
        vf = vf.reformat(format=pix_fmt)
    vf.pts = pts
    if time_base is not None:
        vf.time_base = time_base
    return vf


class _AudioTrack:
    """Decode the first audio stream of ``source``, keep the samples in
    ``[start, start + duration)`` seconds and encode them with ``codecs``' first available
    encoder (AAC; Opus or Vorbis for webm) into ``out``.

    Chunks are float planar ``[channels, samples]`` at the output rate; ``pos`` counts samples
    from the source's time zero. Output pts are samples from the window start.
    """

    def __init__(
        self,
        source: Path,
        out: av.container.OutputContainer,
        start: float,
        duration: float | None,
        codecs: tuple[str, ...] = ("aac",),
    ) -> None:
        self._in = _open_audio(source)
        in_stream = self._in.streams.audio[0]
        in_rate = in_stream.rate or 48000
        codec = next((c for c in codecs if c in av.codecs_available), None)
        if codec is None:
            self._in.close()
            raise InputError(f"this PyAV build has no audio encoder for the output ({' or '.join(codecs)})")
        if codec == "aac":
            self.rate = in_rate if in_rate in _AAC_RATES else 48000
        elif codec in ("libopus", "opus"):
            self.rate = 48000  # Opus codes at 48 kHz
        else:
            self.rate = in_rate
        self.layout = "mono" if in_stream.channels == 1 else "stereo"
        self.stream = cast(Any, out.add_stream(codec, rate=self.rate))
        self.stream.layout = self.layout
        self.stream.bit_rate = 96_000 if self.layout == "mono" else 192_000
        self._out = out
        self._s0 = round(start * self.rate)
        self._s1 = math.inf if duration is None else round((start + duration) * self.rate)
        if start > 1.0 and in_stream.time_base:
            self._in.seek(int((start - 0.5) / in_stream.time_base), stream=in_stream)
        self._chunks: Iterator[tuple[int, np.ndarray]] | None = self._decode(in_stream)
        self._pending: tuple[int, np.ndarray] | None = None
        self._decoded = False

    def _decode(self, in_stream: av.audio.stream.AudioStream) -> Iterator[tuple[int, np.ndarray]]:
        resampler = av.AudioResampler(format="fltp", layout=self.layout, rate=self.rate)
        pos: int | None = None
        for frame in _with_flush(self._in.decode(in_stream)):
            if pos is None and frame is not None:
                pos = round((frame.time or 0.0) * self.rate)
            for chunk in resampler.resample(frame):
                arr = chunk.to_ndarray()
                yield pos or 0, arr
                pos = (pos or 0) + arr.shape[1]

    def _next(self) -> tuple[int, np.ndarray] | None:
        if self._pending is None and self._chunks is not None:
            try:
                self._pending = next(self._chunks, None)
            except av.error.FFmpegError as e:
                if not self._decoded:
                    raise InputError(f"cannot decode audio of '{self._in.name}': {one_line(e)}") from None
                self._chunks = None  # a damaged tail (a truncated copy): the audio ends where it decoded
            self._decoded = self._decoded or self._pending is not None
        return self._pending

    def mux_until(self, seconds: float) -> None:
        """Encode and mux every chunk that starts before ``seconds`` (window time)."""
        limit = self._s0 + seconds * self.rate
        while (item := self._next()) is not None and item[0] < min(limit, self._s1):
            self._pending = None
            pos, arr = item
            lo, hi = max(0, self._s0 - pos), min(arr.shape[1], self._s1 - pos)
            if hi <= lo:
                continue
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(arr[:, lo:hi]), format="fltp", layout=self.layout)
            frame.sample_rate = self.rate
            frame.pts = pos + lo - self._s0
            frame.time_base = Fraction(1, self.rate)
            self._out.mux(self.stream.encode(frame))

    def finish(self, video_seconds: float) -> None:
        """Mux the rest of the window, never past the end of the video, and flush."""
        self._s1 = min(self._s1, self._s0 + round(video_seconds * self.rate))
        self.mux_until(math.inf)
        self._out.mux(self.stream.encode(None))

    def close(self) -> None:
        self._in.close()


def _with_flush(frames: Iterable[av.AudioFrame]) -> Iterator[av.AudioFrame | None]:
    yield from frames
    yield None


def _open_audio(source: Path) -> av.container.InputContainer:
    try:
        return av.open(str(source), mode="r")
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise InputError(f"cannot read audio from '{source}' ({one_line(e)})") from None


def _has_audio(source: Path, start: float) -> bool:
    """True if ``source`` has an audio stream that is longer than ``start`` seconds."""
    if source.is_dir():
        return False
    with _open_audio(source) as c:
        if not c.streams.audio:
            return False
        s = c.streams.audio[0]
        if s.duration and s.time_base:
            return float(s.duration * s.time_base) > start
        return c.duration is None or c.duration / av.time_base > start


class VideoWriter:
    """Write uint8 RGB ``[H, W, 3]`` frames to a video file, atomically.

    The container and codecs follow ``out_path``'s extension (:data:`OUTPUT_FORMATS`; others are
    refused). Frames go to ``.NAME.partial.SUFFIX`` next to ``out_path``, created on entry; a
    clean ``with`` exit flushes the encoders and renames it to ``out_path`` (os.replace), an
    exception (Ctrl-C, SIGTERM, a full disk: :class:`OutputError`) deletes it. ``size`` is
    (W, H), both even.

    ``fps``: the frame rate, or a :class:`Timing` (:func:`output_timing`) that also gives the
    audio window and, for a variable-rate source, each frame's time (kept, in a 90 kHz time
    base). If ``audio_source`` has audio, the window ``[audio_start, audio_start +
    audio_duration]`` seconds of it (clipped to the length of the written video; ``None`` = as
    long as the video) is re-encoded into the output.
    """

    def __init__(
        self,
        out_path: str | Path,
        fps: float | Timing,
        size: tuple[int, int],
        audio_source: Path | None = None,
        audio_start: float = 0.0,
        audio_duration: float | None = None,
        crf: int = 18,
    ) -> None:
        self.timing = fps if isinstance(fps, Timing) else None
        if self.timing is not None:
            fps, audio_start, audio_duration = self.timing.fps, self.timing.start, self.timing.duration
        assert not isinstance(fps, Timing)
        if not fps > 0 or not math.isfinite(fps):
            raise InputError(f"fps must be positive, got {fps}")
        w, h = size
        if w <= 0 or h <= 0 or w % 2 or h % 2:
            raise InputError(f"video output needs a positive even size, got {w}x{h}")
        if not 0 <= crf <= 51:
            raise InputError(f"crf must be in 0..51, got {crf}")
        if audio_start < 0:
            raise InputError(f"audio start must be >= 0, got {audio_start}")
        if audio_duration is not None and audio_duration <= 0:
            raise InputError(f"audio duration must be positive, got {audio_duration}")
        self.format = output_format(out_path)
        self.out_path = _prepare_output(out_path)
        self.tmp_path = _partial_path(self.out_path)
        self.size = (w, h)
        self.rate = _rate(fps)
        self.times = self.timing.frame_times if self.timing is not None else None
        self.time_base = VFR_TIME_BASE if self.times is not None else None
        self.crf = crf
        self.audio_source = Path(audio_source) if audio_source is not None else None
        self.audio_start = audio_start
        self.audio_duration = audio_duration
        self.frames_written = 0
        self._container: av.container.OutputContainer | None = None
        self._stream: av.video.stream.VideoStream | None = None
        self._audio: _AudioTrack | None = None

    def _io(self, what: str, fn: Any, *args: Any) -> Any:
        """Run a container call; a write failure (a full disk, ...) becomes one OutputError line."""
        try:
            return fn(*args)
        except OSError as e:  # av.error.OSError is one
            raise write_error(e, self.out_path) from None

    def __enter__(self) -> VideoWriter:
        try:
            self._container = av.open(str(self.tmp_path), mode="w", format=self.format.container,
                                      options={"movflags": "+faststart"} if self.format.container in ("mp4", "mov")
                                      else {})
        except (av.error.FFmpegError, OSError) as e:
            if disk_full(e):
                raise write_error(e, self.out_path) from None
            raise InputError(f"cannot write '{self.tmp_path}': {one_line(e)}") from None
        try:
            codec = next(c for c in self.format.video if c in av.codecs_available)
            self._stream = _video_stream(self._container, codec, self.rate, self.size, self.crf,
                                         self.time_base)
            src = self.audio_source
            if src is not None and _has_audio(src, self.audio_start):
                self._audio = _AudioTrack(src, self._container, self.audio_start, self.audio_duration,
                                          self.format.audio)
            self._io("start", self._container.start_encoding)  # the partial file exists from here on
        except BaseException:
            self._abort()
            raise
        return self

    def _seconds(self, frames: int) -> float:
        """Video time at which frame ``frames`` starts (the end of the ones before it)."""
        if self.times is None:
            return float(frames / self.rate)
        if frames < len(self.times):
            return self.times[frames]
        assert self.timing is not None
        return self.timing.duration

    def write(self, frame: np.ndarray) -> None:
        """Encode one uint8 RGB ``[H, W, 3]`` frame (H, W = the writer's size)."""
        if self._container is None or self._stream is None:
            raise RuntimeError("VideoWriter.write() called outside its 'with' block")
        if self.times is None:
            pts = self.frames_written
        elif self.frames_written < len(self.times):
            pts = round(self.times[self.frames_written] / VFR_TIME_BASE)
        else:
            raise ValueError(f"more frames than the {len(self.times)} timestamps given")
        vf = _yuv_frame(_check_frame(frame, self.size), pts, time_base=self.time_base)
        self._io("write", self._container.mux, self._stream.encode(vf))
        self.frames_written += 1
        if self._audio is not None:
            self._io("write", self._audio.mux_until, self._seconds(self.frames_written) - _AUDIO_LAG_S)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self._abort()
            return
        try:
            if self.frames_written == 0:
                raise ValueError(f"no frames were written to '{self.out_path}'")
            assert self._container is not None and self._stream is not None
            self._io("flush", self._container.mux, self._stream.encode(None))
            if self._audio is not None:
                self._io("flush", self._audio.finish, self._seconds(self.frames_written))
                self._audio.close()
            self._io("close", self._container.close)
            if self.out_path.exists() and not self.out_path.is_file():
                raise InputError(f"output '{self.out_path}' is not a regular file; nothing was replaced")
            self._io("rename", os.replace, self.tmp_path, self.out_path)
        except BaseException:
            self._abort()
            raise

    def _abort(self) -> None:
        for closable in (self._audio, self._container):
            if closable is not None:
                # best effort: the error that brought us here is the one to report
                with contextlib.suppress(Exception):
                    closable.close()
        self._audio = self._container = None
        with contextlib.suppress(OSError):
            self.tmp_path.unlink(missing_ok=True)


# --------------------------------------------------------------------------- images & samples


def save_png(path: str | Path, frame: np.ndarray) -> Path:
    """Atomically write a uint8 RGB ``[H, W, 3]`` (or gray ``[H, W]``) frame as PNG."""
    out = _prepare_output(path)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(frame)).save(buf, format="PNG")
    return write_bytes_atomic(out, buf.getbuffer())


def side_by_side(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``[H, Wa + Wb', 3]``: ``a`` then ``b``, ``b`` resized (keeping aspect) to ``a``'s height."""
    if b.shape[0] != a.shape[0]:
        w = max(1, round(b.shape[1] * a.shape[0] / b.shape[0]))
        b = np.asarray(Image.fromarray(b).resize((w, a.shape[0]), Image.Resampling.LANCZOS))
    return np.concatenate([a, b], axis=1)


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
) -> Path:
    """Write a deterministic synthetic clip (see :func:`sample_frame`) and return its path.

    The container follows the suffix: .mp4/.mov (H.264 + AAC), .mkv (H.264 + AAC),
    .webm (VP9 or VP8 + Opus), .gif (no audio; ``with_audio`` is ignored). The audio is a
    440 Hz sine as long as the video. Written atomically.
    """
    out = _prepare_output(path)
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
    if n_frames < 1 or fps <= 0:
        raise InputError(f"sample clip needs n_frames >= 1 and fps > 0, got {n_frames}, {fps}")

    rate = _rate(fps)
    tmp = _partial_path(out)
    try:
        with av.open(str(tmp), mode="w", format={".mkv": "matroska"}.get(suffix, suffix[1:])) as c:
            if vcodec == "libx264":
                vs = _video_stream(c, vcodec, rate, size, crf=18)
            else:
                vs = c.add_stream(vcodec, rate=rate)
                vs.width, vs.height = size
                vs.pix_fmt = pix_fmt
                _tag_bt709(vs, rate)
            aud = None  # an audio stream
            if with_audio and acodec is not None:
                a_rate = 48000
                aud = c.add_stream(acodec, rate=a_rate)
                aud.layout = "mono"
            for i in range(n_frames):
                c.mux(vs.encode(_yuv_frame(sample_frame(i, size), i, pix_fmt)))
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
