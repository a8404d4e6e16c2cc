"""Evaluate an edited video against its source with the paper's Table 2 metrics, streamed.

``p2v eval`` and ``p2v ablate`` both go through :func:`evaluate_video`, so the numbers an
ablation prints are the ones ``p2v eval`` gives on its output videos.

The comparison size is the edited video's size (or ``size``: its short side scaled to that, the
aspect kept). Source frames are mapped onto it the way ``p2v edit --resize`` framed them, so an
edit and its source line up pixel for pixel: ``crop`` scales to cover and centre-crops;
``stretch`` resizes (the paper's squashed 512x512); ``pad`` is ``crop``'s mapping, since a padded
edit's output is its picture without the bars, and the edit framed that picture by cover and crop
at its own size (the aspect ratios differ by under a pixel). Either ``--output-size`` compares like
with like: at ``input`` the edit is the working frame resampled to the source's size (crop: to the
cropped region at the source's scale), which this mapping gives the source too. Frames are
decoded one at a time from both videos; only the previous pair and one CLIP batch are held.

The source frames compared are ``start, start + stride, ...`` (the options the edit was made
with); their count must equal the edited video's frame count.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from p2v_fast.errors import InputError
from p2v_fast.files import json_safe
from p2v_fast.media import framing, reader
from p2v_fast.progress import NullProgress, Progress
from p2v_fast.quality.metrics import DEFAULT_CLIP_MODEL, FLOW_METHODS, ClipScorer, StreamingEvaluator, make_flow
from p2v_fast.text import plural

FrameCallback = Callable[[int, np.ndarray, np.ndarray], None]


@dataclass(frozen=True)
class VideoEval:
    """Table 2's metrics for one edited video (Pixel-MSE on the 0-255 scale)."""

    edited: str
    source: str
    prompt: str
    clip_model: str
    flow: str
    size: tuple[int, int]  # (W, H) the metrics were computed at
    n_frames: int
    source_start: int
    source_stride: int
    clip_text: float
    clip_image: float
    pixel_mse: float
    masked_fraction: float  # share of pixels excluded from Pixel-MSE (occluded, out of frame)
    per_pair_pixel_mse: tuple[float, ...]
    #: a scene clip's ground-truth scores (:func:`p2v_fast.quality.scene_truth.score_against_truth`),
    #: None for a clip without a ground-truth sidecar
    ground_truth: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return json_safe(asdict(self))


def comparison_size(info: reader.VideoInfo, size: int | None) -> tuple[int, int]:
    """(W, H) of the comparison: the edited video's own size, or its short side scaled to ``size``."""
    if size is None:
        return info.width, info.height
    if size < 2:
        raise InputError(f"--size must be at least 2 pixels; got {size}")
    return framing.working_size(info.width, info.height, size, multiple=1)


def check_inputs(
    edited: str | Path,
    source: str | Path,
    *,
    start: int = 0,
    max_frames: int | None = None,
    stride: int = 1,
) -> tuple[reader.VideoInfo, reader.VideoInfo, int]:
    """Probe both videos and check that they have the same number of frames (before any model loads)."""
    for what, path in (("edited video", edited), ("source video", source)):
        if not Path(path).exists():
            raise InputError(f"{what} does not exist: '{path}'")
    ed_info = reader.probe(edited)
    src_info = reader.probe(source)
    n_src = reader.selected_count(src_info, start, max_frames, stride)
    if ed_info.n_frames != n_src:
        if (start, max_frames, stride) == (0, None, 1):
            sel = f"source has {n_src}"
        else:
            sel = f"the selected source frames number {n_src} (of {src_info.n_frames})"
        hint = ""
        if ed_info.n_frames < n_src:
            hint = "; if the edit used --start/--stride/--max-frames, pass the same options to eval"
        raise InputError(
            f"videos differ in length: edited '{ed_info.path}' has {plural(ed_info.n_frames, 'frame')}, {sel} "
            f"('{src_info.path}'){hint}"
        )
    if ed_info.n_frames < 2:
        raise InputError(f"need at least 2 frames for temporal metrics; '{ed_info.path}' has {ed_info.n_frames}")
    return ed_info, src_info, ed_info.n_frames


def evaluate_video(
    edited: str | Path,
    source: str | Path,
    prompt: str,
    *,
    scorer: ClipScorer | None = None,
    clip_model: str = DEFAULT_CLIP_MODEL,
    flow: str = "dis",
    size: int | None = None,
    start: int = 0,
    max_frames: int | None = None,
    stride: int = 1,
    resize: str = "crop",
    progress: Progress | None = None,
    on_frame: FrameCallback | None = None,
    flow_fn: Any = None,
    json_path: str | Path | None = None,
    overwrite: bool = False,
) -> VideoEval:
    """CLIP-Text, CLIP-Image and Pixel-MSE of ``edited`` (edit prompt ``prompt``) against ``source``.

    ``scorer``: a loaded :class:`ClipScorer` to reuse (else ``clip_model`` is loaded).
    ``on_frame(i, edited_frame, source_frame)`` sees every compared pair (e.g. to keep thumbnails).
    ``flow_fn``: a prebuilt :func:`p2v_fast.quality.metrics.make_flow` for ``flow``, to reuse across videos.
    ``json_path``: also write :meth:`VideoEval.to_dict` there (never over either video; an existing
    file only with ``overwrite``).
    Inputs are checked before CLIP is loaded; problems raise :class:`InputError`.
    """
    # 1. Check inputs: options, paths and both videos' frame counts, before CLIP loads
    prompt, ed_info, src_info, n, wh = _check(edited, source, prompt, flow, size, start, max_frames, stride, resize,
                                              json_path, overwrite)
    # 2. Load the flow, then CLIP, unless given (RAFT's torchvision is checked before CLIP's 1.7 GB)
    flow_fn = flow_fn if flow_fn is not None else make_flow(flow)
    scorer = scorer if scorer is not None else ClipScorer(clip_model)
    # 3. Compare: decode both videos a pair at a time, scored as they stream
    ev = StreamingEvaluator(scorer, prompt, flow=flow, flow_fn=flow_fn)
    advance = (progress or NullProgress()).stage("evaluate", n)
    for i, (e, s) in enumerate(_pairs(ed_info, src_info, wh, start, max_frames, stride, resize)):
        ev.add(e, s)
        if on_frame is not None:
            on_frame(i, e, s)
        advance(1)
    # 4. Result, with a scene clip's ground-truth scores, and its JSON
    result = _result(ev, ed_info, src_info, prompt, scorer.name, flow, wh, start, stride)
    result = replace(result, ground_truth=_ground_truth(ed_info, src_info, prompt, start, max_frames, stride))
    if json_path is not None:
        from p2v_fast.files import write_json_atomic

        write_json_atomic(json_path, result.to_dict())
    return result


def _result(ev: StreamingEvaluator, ed_info: reader.VideoInfo, src_info: reader.VideoInfo, prompt: str,
            clip_model: str, flow: str, wh: tuple[int, int], start: int, stride: int) -> VideoEval:
    scores = ev.result()
    return VideoEval(
        edited=str(ed_info.path), source=str(src_info.path), prompt=prompt, clip_model=clip_model, flow=flow,
        size=wh, n_frames=int(scores["n_frames"]), source_start=start, source_stride=stride,
        clip_text=float(scores["clip_text"]), clip_image=float(scores["clip_image"]),
        pixel_mse=float(scores["pixel_mse"]), masked_fraction=float(scores["masked_fraction"]),
        per_pair_pixel_mse=tuple(ev.per_pair),
    )


def _ground_truth(ed_info: reader.VideoInfo, src_info: reader.VideoInfo, prompt: str, start: int,
                  max_frames: int | None, stride: int) -> dict[str, Any] | None:
    """A scene clip's (:mod:`p2v_fast.media.scenes`) ground-truth scores of the edit, at the clip's own
    size; None for a source without a ground-truth sidecar."""
    from p2v_fast.quality import scene_truth

    truth = scene_truth.find_truth(src_info.path)
    if truth is None:
        return None
    h, w = truth.depth.shape[1:]
    if abs(ed_info.width * h - ed_info.height * w) > max(w, h):  # another aspect: no pixel-exact mask
        return {"notes": [f"the edit is {ed_info.width}x{ed_info.height}, the scene {w}x{h}: ground truth needs "
                          "the clip's aspect"]}
    edited = np.stack(list(reader.read_frames(ed_info, size=(w, h), resize="stretch")))
    source = np.stack(list(reader.read_frames(src_info, size=(w, h), start=start, max_frames=max_frames,
                                              stride=stride, resize="stretch")))
    return scene_truth.score_against_truth(edited, source, truth, prompt, start, stride,
                                           depth_fn=scene_truth.mini_depth_fn())


def _check(edited: str | Path, source: str | Path, prompt: str, flow: str, size: int | None, start: int,
           max_frames: int | None, stride: int, resize: str, json_path: str | Path | None,
           overwrite: bool = False) -> tuple[str, reader.VideoInfo, reader.VideoInfo, int, tuple[int, int]]:
    """:func:`evaluate_video`'s inputs checked: the prompt, both videos' infos, their frame count
    and the comparison size (W, H)."""
    from p2v_fast.media.paths import check_report_path
    from p2v_fast.weights.prompts import check_prompt

    check_report_path(json_path, Path(edited), Path(source), what="video", overwrite=overwrite)
    prompt = check_prompt(prompt, "edit prompt")
    if flow not in FLOW_METHODS:
        raise InputError(f"--flow must be one of {', '.join(FLOW_METHODS)}; got {flow!r}")
    if resize not in framing.RESIZE_MODES:
        raise InputError(f"--resize must be one of {', '.join(framing.RESIZE_MODES)}; got {resize!r}")
    ed_info, src_info, n = check_inputs(edited, source, start=start, max_frames=max_frames, stride=stride)
    return prompt, ed_info, src_info, n, comparison_size(ed_info, size)


def _pairs(ed_info: reader.VideoInfo, src_info: reader.VideoInfo, wh: tuple[int, int], start: int,
           max_frames: int | None, stride: int, resize: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(edited, source) frames at the comparison size, one pair at a time; a length mismatch the
    containers' stored counts hid is an :class:`InputError` that counts both videos' frames."""
    ed_frames = reader.read_frames(ed_info, size=None if wh == (ed_info.width, ed_info.height) else wh)
    src_frames = reader.read_frames(src_info, size=wh, start=start, max_frames=max_frames, stride=stride,
                                   resize="stretch" if resize == "stretch" else "crop")  # pad: the edit cut its bars
    for i, (e, s) in enumerate(itertools.zip_longest(ed_frames, src_frames)):
        if e is None or s is None:  # a container's stored count was wrong: count the rest
            n_edited = i + (e is not None) + sum(1 for _ in ed_frames)
            n_source = i + (s is not None) + sum(1 for _ in src_frames)
            raise InputError(f"videos differ in length: edited '{ed_info.path}' decodes to "
                             f"{plural(n_edited, 'frame')}, source '{src_info.path}' to {n_source}")
        yield e, s
