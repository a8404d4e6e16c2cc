"""Writing video and images, atomically.

:class:`VideoWriter` writes uint8 RGB ``[H, W, 3]`` frames in the container its name asks for
(:data:`OUTPUT_FORMATS`: .mp4/.m4v, .mov and .mkv hold H.264 (libx264, yuv420p, BT.709 tags) with
AAC audio, .webm holds VP9 with Opus), to a hidden temporary file moved into place with
:func:`os.replace` only when it is complete; the source's audio, trimmed to the edited time
window, is re-encoded. Frames keep the source's timestamps where the source's frame rate is
variable (:func:`p2v_fast.media.reader.output_timing`), so the audio stays in sync.
:func:`save_png` writes one frame.

User-caused problems raise :class:`~p2v_fast.errors.InputError` with a one-line message; a failed
write (a full disk) is one :class:`~p2v_fast.errors.OutputError` line.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from types import TracebackType
from typing import Any, cast

import av
import av.error
import numpy as np
from av.video.reformatter import ColorPrimaries, ColorRange, Colorspace, ColorTrc
from PIL import Image

from p2v_fast.errors import InputError, disk_full, one_line, write_error
from p2v_fast.files import write_bytes_atomic
from p2v_fast.media.reader import Timing

_AAC_RATES = (96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000)
_AUDIO_LAG_S = 1.0  # audio is muxed this far behind the video so no chunk outruns the picture
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


def partial_path(out: Path) -> Path:
    return out.with_name(f".{out.stem}.partial{out.suffix or '.mp4'}")


def prepare_output(out_path: str | Path) -> Path:
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


def frame_rate(fps: float) -> Fraction:
    """``fps`` as a fraction: 30000/1001 for 29.97; exact enough for very low rates too."""
    rate = Fraction(fps).limit_denominator(1001)
    if rate <= 0 or abs(float(rate) - fps) > 1e-6 * fps:
        rate = Fraction(fps).limit_denominator(1_000_000)
    return rate


def video_stream(container: av.container.OutputContainer, codec: str, rate: Fraction, size: tuple[int, int],
                  crf: int, time_base: Fraction | None = None) -> av.video.stream.VideoStream:
    """A yuv420p ``codec`` stream (libx264, or VP9/VP8 for webm) at constant quality ``crf``
    (x264's scale; VP9's 0..63 is offset: x264's 18 looks about like VP9's 28), BT.709 tagged."""
    stream: Any = container.add_stream(codec, rate=rate)
    stream.width, stream.height = size
    stream.pix_fmt = "yuv420p"
    tag_bt709(stream, rate, time_base)
    if codec == "libx264":
        stream.options = {"crf": str(crf), "preset": "medium"}
    else:  # libvpx: constant quality, multithreaded rows
        stream.options = {"crf": str(min(63, crf + 10)), "b": "0", "deadline": "good", "cpu-used": "4", "row-mt": "1"}
    return stream


def tag_bt709(stream: av.video.stream.VideoStream, rate: Fraction, time_base: Fraction | None = None) -> None:
    """Set the time base and tag BT.709 limited range, matching :func:`yuv_frame`."""
    cc = stream.codec_context
    cc.time_base = time_base or 1 / rate
    if (stream.pix_fmt or "").startswith("yuv"):
        cc.colorspace = Colorspace.ITU709
        cc.color_primaries = ColorPrimaries.BT709
        cc.color_trc = ColorTrc.BT709
        cc.color_range = ColorRange.MPEG


def yuv_frame(frame: np.ndarray, pts: int, pix_fmt: str = "yuv420p", time_base: Fraction | None = None
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
    clean ``with`` exit flushes the encoders and renames it to ``out_path`` (os.replace; with
    ``publish``, hands it to ``publish(partial, out_path)`` instead, e.g.
    :meth:`p2v_fast.files.OutputSet.adopt`, which renames it with the run's other files), an
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
        publish: Callable[[Path, Path], None] | None = None,
    ) -> None:
        self.publish = publish  # given: the finished partial file is handed to it (partial, out), not renamed
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
        self.out_path = prepare_output(out_path)
        self.tmp_path = partial_path(self.out_path)
        self.size = (w, h)
        self.rate = frame_rate(fps)
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
            self._stream = video_stream(self._container, codec, self.rate, self.size, self.crf,
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
        vf = yuv_frame(_check_frame(frame, self.size), pts, time_base=self.time_base)
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
            if self.publish is not None:  # renamed later, with the other files of the run
                self.publish(self.tmp_path, self.out_path)
            else:
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


def save_png(path: str | Path, frame: np.ndarray) -> Path:
    """Atomically write a uint8 RGB ``[H, W, 3]`` (or gray ``[H, W]``) frame as PNG."""
    out = prepare_output(path)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(frame)).save(buf, format="PNG")
    return write_bytes_atomic(out, buf.getbuffer())
