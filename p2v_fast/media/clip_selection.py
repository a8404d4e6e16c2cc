"""Which frames of which video, at which working size (``--start``, ``--max-frames``,
``--stride``, ``--size``, ``--resize``), and the digest of their content that keys the cache."""

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

    @property
    def fps(self) -> float:
        """Output frame rate: the source rate, divided by the stride (duration is kept)."""
        return self.info.fps / self.stride

    @property
    def latent_hw(self) -> tuple[int, int]:
        return self.size[1] // 8, self.size[0] // 8

    @property
    def output_size(self) -> tuple[int, int]:
        """(W, H) of the output frames: the working frame without padding."""
        return self.size if self.box is None else (self.box[2], self.box[3])

    def to_output(self, frame: np.ndarray) -> np.ndarray:
        """A working frame [H, W, 3] -> the output frame: ``--resize pad``'s bars cut off."""
        if self.box is None:
            return frame
        x, y, w, h = self.box
        return np.ascontiguousarray(frame[y : y + h, x : x + w])

    def frames(self) -> Iterator[np.ndarray]:
        """Stream the selected working frames, uint8 [H, W, 3]."""
        return reader.read_frames(  # the probed info, so no pass probes (for webm: decodes) again
            self.info, size=self.size, start=self.start, max_frames=self.max_frames, stride=self.stride,
            resize=self.resize,
        )


def select_clip(path: str | Path, cfg: EditConfig, info: reader.VideoInfo | None = None) -> ClipSelection:
    """The frames ``cfg`` selects from ``path`` (``info``: its probe, if already done)."""
    info = info or reader.probe(path)
    size, box = framing.frame_geometry(info.width, info.height, cfg.size, cfg.resize)
    n = reader.selected_count(info, cfg.start, cfg.max_frames, cfg.stride)
    return ClipSelection(Path(path), info, size, cfg.start, cfg.max_frames, cfg.stride, n, cfg.resize,
                         None if box == (0, 0, *size) else box)


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
