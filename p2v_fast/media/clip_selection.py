"""Which frames of which video, at which working size (``--start``, ``--max-frames``,
``--stride``, ``--size``, ``--resize``), written at which size (``--output-size``), and the digest
of their content that keys the cache."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from p2v_fast.config import EditConfig
from p2v_fast.errors import InputError
from p2v_fast.media import framing, reader
from p2v_fast.text import plural


@dataclass(frozen=True)
class ClipSelection:
    """Which frames of which video, at which working size."""

    path: Path
    info: reader.VideoInfo
    size: tuple[int, int]  # (W, H) of the working frames, multiples of 64
    start: int
    max_frames: int | None
    stride: int
    n_frames: int
    resize: str = "crop"  # how a source frame becomes a working frame (framing.frame_geometry)
    box: tuple[int, int, int, int] | None = None  # (x, y, w, h) of the picture; None: the whole frame
    output: str = "input"  # the size the edit is written at: the input's, or "working" (framing.output_frame)

    @property
    def fps(self) -> float:
        """Output frame rate: the source rate, divided by the stride (duration is kept)."""
        return self.info.fps / self.stride

    @property
    def latent_hw(self) -> tuple[int, int]:
        return self.size[1] // 8, self.size[0] // 8

    @property
    def output_size(self) -> tuple[int, int]:
        """(W, H) of the output frames (:func:`framing.output_frame`)."""
        return self._output()[1]

    def _output(self) -> tuple[tuple[int, int, int, int], tuple[int, int]]:
        return framing.output_frame((self.info.width, self.info.height), self.size, self.resize, self.box, self.output)

    def to_working_output(self, frame: np.ndarray) -> np.ndarray:
        """A working frame [H, W, 3] as ``--output-size working`` writes it: ``--resize pad``'s bars cut off."""
        if self.box is None:
            return frame
        x, y, w, h = self.box
        return np.ascontiguousarray(frame[y : y + h, x : x + w])

    def to_output(self, frame: np.ndarray) -> np.ndarray:
        """A working frame [H, W, 3] -> the output frame: ``pad``'s bars cut off, resampled to
        :attr:`output_size` (LANCZOS)."""
        region, size = self._output()
        return framing.resample(frame, region, size)

    def output_sources(self) -> Iterator[np.ndarray]:
        """The selected source frames framed as the output (the side-by-side's and the strip's
        input half): the working frames less ``pad``'s bars at ``--output-size working``, else
        read from the source straight at :attr:`output_size` (crop: the region the edit saw;
        stretch and pad: the whole picture), so they are not blurred by the working size."""
        if self.output == "working":
            return (self.to_working_output(f) for f in self.frames())
        return reader.read_frames(self.info, size=self.output_size, start=self.start, max_frames=self.max_frames,
                                  stride=self.stride, resize="crop" if self.resize == "crop" else "stretch")

    def frames(self) -> Iterator[np.ndarray]:
        """Stream the selected working frames, uint8 [H, W, 3]."""
        return reader.read_frames(  # the probed info, so no pass probes (for webm: decodes) again
            self.info, size=self.size, start=self.start, max_frames=self.max_frames, stride=self.stride,
            resize=self.resize,
        )


def probe_input(input_path: Path, cfg: EditConfig) -> reader.VideoInfo:
    """Probe the input (an image folder plays at ``cfg.fps``, 24 by default); --fps is refused for
    a video file, which keeps its own rate."""
    info = reader.probe(input_path, folder_fps=cfg.fps or 24.0)
    if cfg.fps is not None and not info.is_folder:
        raise InputError(f"--fps is for an image-folder input; '{input_path}' is a video and keeps its own rate "
                         f"({reader.format_fps(info.fps)} fps)")
    return info


def select_clip(path: str | Path, cfg: EditConfig, info: reader.VideoInfo | None = None) -> ClipSelection:
    """The frames ``cfg`` selects from ``path`` (``info``: its probe, if already done)."""
    info = info or reader.probe(path)
    size, box = framing.frame_geometry(info.width, info.height, cfg.size, cfg.resize)
    n = reader.selected_count(info, cfg.start, cfg.max_frames, cfg.stride)
    return ClipSelection(Path(path), info, size, cfg.start, cfg.max_frames, cfg.stride, n, cfg.resize,
                         None if box == (0, 0, *size) else box, cfg.output_size)


def frames_digest(selection: ClipSelection) -> str:
    """sha256 of the selected, resized frames (one decode pass, nothing kept)."""
    h = hashlib.sha256()
    count = 0
    for frame in selection.frames():
        h.update(np.ascontiguousarray(frame).tobytes())
        count += 1
    if count != selection.n_frames:
        raise InputError(short_clip_message(selection, count))
    h.update(repr((selection.size, selection.resize, selection.box)).encode())
    return h.hexdigest()


def short_clip_message(selection: ClipSelection, decoded: int) -> str:
    """The error for a clip whose container promises more frames than decode (a truncated copy)."""
    return (f"'{selection.path}' should give {plural(selection.n_frames, 'frame')} here but only {decoded} decode "
            f"(a truncated or damaged file?); pass --max-frames {decoded} to edit the frames it has"
            if decoded else f"no frame of '{selection.path}' decodes (a truncated or damaged file?)")
