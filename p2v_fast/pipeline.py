"""The library's entry points: invert a clip, edit a clip, preview the anchor frame.

The CLI parses options into an :class:`EditConfig`, calls one function here and renders its
result. Frames stream from the reader through the edit to the writer: only the anchor's
features, one frame's worth of features in flight and a few thumbnails are held.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from p2v_fast.config import EditConfig
from p2v_fast.errors import P2VError
from p2v_fast.files import OutputClaim, OutputSet
from p2v_fast.media import reader, writer
from p2v_fast.media.clip_selection import ClipSelection, frames_digest, probe_input, select_clip
from p2v_fast.media.framing import side_by_side
from p2v_fast.media.paths import EditPaths, check_not_in_folder, check_report_path, side_paths
from p2v_fast.method.ddim import DDIMSchedule
from p2v_fast.method.edit import EditContext, EditStats, FeatureStore, FrameState, run_schedule
from p2v_fast.method.frame_sink import FrameSink
from p2v_fast.method.inversion import invert_clip
from p2v_fast.method.inversion_cache import InvertedClip
from p2v_fast.nets.backends import TorchBackend
from p2v_fast.nets.graph_backend import engines_folder
from p2v_fast.nets.memory import budget_exceeded
from p2v_fast.nets.runtime import (
    Runtime,
    inversion_runtime,
    invert_precision,
    load_runtime,
    runtime_matching,
    torch_threads,
)
from p2v_fast.progress import NullProgress, Progress
from p2v_fast.text import plural
from p2v_fast.weights.downloads import check_downloads
from p2v_fast.weights.models import random_weights
from p2v_fast.weights.prompts import check_prompt, encode_prompt, source_prompt_for, warn_if_truncated


def warm_up(cfg: EditConfig, rt: Runtime, selection: ClipSelection, progress: Progress) -> None:
    """With ``--compile``: compile every batch bucket the clip's calls will use (inversion and
    edit) before the first is timed, rather than in the middle of the run."""
    from p2v_fast.method.edit import DEFAULT_WAVEFRONT_FRAMES
    from p2v_fast.method.inversion import MAX_INVERT_BATCH

    backend = rt.backend  # a separate grad backend runs only gradient calls, which run eager
    if not isinstance(backend, TorchBackend) or not backend.compiled:
        return
    n = selection.n_frames
    edit_frames = 1 if cfg.schedule == "sequential" else (cfg.batch_frames or DEFAULT_WAVEFRONT_FRAMES)
    invert_samples = min(n, cfg.invert_batch or MAX_INVERT_BATCH)  # 1 sample per frame: no CFG
    t0 = time.perf_counter()
    buckets = backend.warm_up(selection.latent_hw, max(min(edit_frames, n), -(-invert_samples // 2)))
    progress.log(f"compiled the UNet for {buckets} batch sizes in {time.perf_counter() - t0:.1f} s")


@dataclass
class PreparedClip:
    selection: ClipSelection
    inverted: InvertedClip
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """`p2v invert --json`: the frames inverted, where the cache entry is, the runtime it ran
        on, its seconds (0 work on a cache hit) and its reconstruction error."""
        sel, inv = self.selection, self.inverted
        return {"input": str(sel.path), "n_frames": sel.n_frames, "size": list(sel.size), "resize": sel.resize,
                "start": sel.start, "max_frames": sel.max_frames, "stride": sel.stride,
                "source_prompt": inv.source_prompt, "cache_hit": inv.cache_hit, "cache": str(inv.root),
                "inversion_runtime": inv.runtime, "reconstruction": inv.reconstruction, "seconds": self.seconds}


def describe_output(selection: ClipSelection) -> str:
    """One line: the working size and the size the edit is written at, and why."""
    (w, h), (ow, oh) = selection.size, selection.output_size
    if selection.output == "working":
        why = "--output-size working" + (", pad's bars cut" if selection.box is not None else "")
    elif selection.resize == "crop" and (ow, oh) != (selection.info.width, selection.info.height):
        why = "the cropped region at the input's scale"
    else:
        why = "the input's size" + ("; pad's bars cut" if selection.box is not None else "")
    return f"working size {w}x{h}, output {ow}x{oh} ({why})"


def prepare(cfg: EditConfig, input_path: Path, rt: Runtime, progress: Progress,
            info: reader.VideoInfo | None = None, output: bool = False) -> PreparedClip:
    """Select frames, resolve the source prompt, invert (or hit the cache); ``output``: also log
    the size the edit is written at (:func:`describe_output`)."""
    t0 = time.perf_counter()
    selection = select_clip(input_path, cfg, info)
    rt.backend.check_frame_size(*selection.size)  # engines for another size: refused before any work
    (w, h), n = selection.size, selection.n_frames
    framing = "" if selection.resize == "crop" else f" ({selection.resize})"
    progress.log(f"{plural(n, 'frame')} at {w}x{h}{framing} from '{input_path}'")
    if output:
        progress.log(describe_output(selection))
    spent = budget_exceeded(rt.backend.device, cfg.max_memory)
    if spent is not None:
        progress.log(spent)
    warm_up(cfg, rt, selection, progress)
    if cfg.source_prompt is None:
        first = next(iter(selection.frames()))
        source = source_prompt_for(rt.models, first, None, cfg.captioner)
        note = " (the tiny model's captioner has random weights: word salad by design)" \
            if rt.models.source == "tiny" else ""
        progress.log(f"source prompt (BLIP caption of frame 1): {source!r}{note}")
    else:  # a prompt the user typed: say what CLIP cuts off (a caption's cut is no one's concern)
        source = cfg.source_prompt.strip()
        warn_if_truncated(rt.models, source, "source prompt", progress.log, rt.warned)
    dtype, tf32 = invert_precision(cfg.invert_dtype, rt.models.device)
    where = inversion_runtime(rt.models, rt.backend, rt.grad_backend, dtype, tf32)
    # another process inverting the same entry: invert_clip waits for it (the entry's lock), then reuses it
    inverted = invert_clip(cfg, selection, rt.models, where, source, digest=frames_digest(selection),
                           batch=cfg.invert_batch, progress=progress)
    return PreparedClip(selection, inverted, time.perf_counter() - t0)


def invert_video(cfg: EditConfig, input_path: Path, progress: Progress | None = None,
                 runtime: Runtime | None = None, json_path: str | Path | None = None,
                 overwrite: bool = False) -> PreparedClip:
    """`p2v invert`: DDIM-invert the clip into the cache (and with ``json_path``, write
    :meth:`PreparedClip.to_dict` there: an existing file only with ``overwrite``)."""
    check_report_path(json_path, Path(input_path), overwrite=overwrite, engines=engines_folder(cfg.engines))
    info = probe_input(Path(input_path), cfg)
    select_clip(input_path, cfg, info)  # a bad size or frame selection fails before models load
    check_downloads(cfg.model, cfg.captioner, cfg.source_prompt)  # and weights that cannot be had
    with torch_threads(cfg.threads):
        rt = runtime_matching(runtime, cfg) if runtime is not None else load_runtime(cfg)
        prep = prepare(cfg, Path(input_path), rt, progress or NullProgress(), info)
    if json_path is not None:
        from p2v_fast.files import write_json_atomic

        write_json_atomic(json_path, prep.to_dict())
    return prep


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device``; to CUDA through pinned memory, without blocking the host."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def non_finite_message(cfg: EditConfig, frame: int) -> str:
    """The line for an edit whose latents went non-finite at ``frame``, naming the option most
    likely to blame: the anchor (frame 0) has no guided update, so there the guidance scale."""
    if frame > 0 and cfg.guided_steps > 0 and cfg.update_weight > 0:
        blame = f"lower --update-weight (it is {cfg.update_weight:g}; the paper's delta is 100)"
    else:
        blame = f"lower --guidance-scale (it is {cfg.guidance_scale:g}; the paper's is 7.5)"
    if cfg.dtype in ("fp16", "bf16"):
        blame += f" or edit in --dtype fp32 (it is {cfg.dtype})"
    return f"the edit's latents went non-finite (NaN or inf) at frame {frame + 1}: {blame}; nothing was written"


def finite_frames(frames: Iterator[FrameState], cfg: EditConfig) -> Iterator[FrameState]:
    """``frames`` (finished, in order), each checked finite before it is decoded or written: a
    non-finite latent stops the edit with :func:`non_finite_message`, the outputs not yet renamed."""
    for st in frames:
        if not bool(torch.isfinite(st.latent).all()):
            raise P2VError(non_finite_message(cfg, st.index))
        yield st


@dataclass
class EditResult:
    output: Path
    n_frames: int
    fps: float
    size: tuple[int, int]  # (W, H) of the output frames (--output-size: the input's, or the working frame's)
    seconds_total: float
    seconds_inversion: float
    seconds_edit: float
    inversion_cache_hit: bool
    source_prompt: str
    side_by_side: Path | None = None
    strip: Path | None = None
    stats: EditStats = field(default_factory=EditStats)
    inversion_runtime: dict[str, str] = field(default_factory=dict)  # Backend.identity() it ran on
    reconstruction: dict[str, float | None] | None = None  # inversion.reconstruction_error of the inversion
    # of the edited uint8 frames at the working size (less pad's bars) before any resampling or encoding
    # (reproducibility checks; the same whatever --output-size)
    frames_sha256: str = ""
    # busy seconds of the stages that overlap the edit (p2v_fast.output.FrameSink): VAE decode
    # (device time) and writing (encode + mux, writer thread)
    overlapped: dict[str, float] = field(default_factory=dict)
    variable_rate: bool = False  # the source's frame rate varies: its timestamps were kept
    working_size: tuple[int, int] = (0, 0)  # (W, H) the frames were edited at

    @property
    def seconds_per_frame(self) -> float:
        """The edit loop's seconds per frame (the paper's yardstick: inversion excluded)."""
        return self.seconds_edit / max(self.n_frames, 1)

    @property
    def seconds_per_frame_with_inversion(self) -> float:
        """Seconds per frame of the edit and the inversion (frame selection, caption, encode and
        depth, DDIM inversion and its check; next to nothing on a cache hit)."""
        return (self.seconds_inversion + self.seconds_edit) / max(self.n_frames, 1)

    def to_dict(self) -> dict[str, Any]:
        """Everything, with the guided update's RMS per step (mean over frames) and per step and frame."""
        st = self.stats
        per_frame = {str(k): [float(v) for v in vs] for k, vs in sorted(st.update_rms.items())}
        return {
            "output": str(self.output), "side_by_side": self.side_by_side and str(self.side_by_side),
            "strip": self.strip and str(self.strip), "n_frames": self.n_frames, "fps": self.fps,
            "variable_rate": self.variable_rate, "size": list(self.size),
            "working_size": list(self.working_size), "source_prompt": self.source_prompt,
            "inversion_cache_hit": self.inversion_cache_hit, "inversion_runtime": self.inversion_runtime,
            "reconstruction": self.reconstruction, "seconds_total": self.seconds_total,
            "seconds_inversion": self.seconds_inversion, "seconds_edit": self.seconds_edit,
            "seconds_per_frame": self.seconds_per_frame,
            "seconds_per_frame_with_inversion": self.seconds_per_frame_with_inversion, "overlapped": self.overlapped,
            "unet_calls": st.unet_calls, "unet_backward": st.unet_backward,
            "peak_feature_bytes": st.peak_feature_bytes, "frames_sha256": self.frames_sha256,
            "update_rms_per_step": {str(k): v for k, v in st.mean_update_rms().items()},
            "detached_rms_per_step": {str(k): v for k, v in st.mean_detached_rms().items()},
            "update_rms_per_step_and_frame": per_frame,
        }


def edit_video(
    cfg: EditConfig,
    input_path: str | Path,
    output: str | Path | None = None,
    *,
    overwrite: bool = False,
    preview: bool = False,
    side_by_side: bool = False,
    progress: Progress | None = None,
    runtime: Runtime | None = None,
    json_path: str | Path | None = None,
) -> EditResult:
    """Edit ``input_path`` with ``cfg.prompt``; write a video in the container ``output``'s
    extension names (or, with ``preview``, a PNG of the anchor frame), and with ``json_path``
    the config and :meth:`EditResult.to_dict`. Outputs are written under temporary names and
    renamed into place together at the end (:class:`~p2v_fast.files.OutputSet`): a failed or
    interrupted edit leaves none of them. The input is only read."""
    progress = progress or NullProgress()
    input_path = Path(input_path)
    prompt = check_prompt(cfg.prompt)
    if preview:
        cfg = cfg.replace(max_frames=1)
    info = probe_input(input_path, cfg)  # fail fast on a bad input, before loading models
    select_clip(input_path, cfg, info)  # and on a bad size or frame selection
    check_downloads(cfg.model, cfg.captioner, cfg.source_prompt)  # missing weights: seconds, not an SD2 load
    paths = EditPaths.of(input_path, output, preview=preview, side_by_side=side_by_side, json_path=json_path)
    paths.check(input_path, overwrite)
    if json_path is not None:  # nor over the engine folder's manifest or graphs
        check_not_in_folder(json_path, engines_folder(cfg.engines))
    out = paths.output
    claim = OutputClaim(out).acquire(overwrite)  # a second run writing `out` is refused
    try:
        with torch_threads(cfg.threads), OutputSet() as files:
            result = _edit(cfg, input_path, info, prompt, out, paths.side_by_side, side_paths(out)[1],
                           preview=preview, progress=progress, runtime=runtime, json_path=json_path, files=files)
            files.commit()  # every file of the edit, or none
            return result
    finally:
        claim.release()


def _edit(cfg: EditConfig, input_path: Path, info: reader.VideoInfo, prompt: str, out: Path, sbs_path: Path | None,
          strip: Path, *, preview: bool, progress: Progress, runtime: Runtime | None,
          json_path: str | Path | None, files: OutputSet) -> EditResult:
    """:func:`edit_video` once its options are checked and its output is claimed."""
    t_start = time.perf_counter()
    # 1. Load the models (or take the caller's runtime), seeded
    torch.manual_seed(cfg.seed)
    rt = runtime_matching(runtime, cfg) if runtime is not None else load_runtime(cfg)
    _announce(rt, cfg, prompt, progress)
    # 2. Prepare: select the frames and invert them (or reuse the cached inversion)
    prep = prepare(cfg, input_path, rt, progress, info, output=True)
    sel, inv = prep.selection, prep.inverted
    # 3. Context: the prompts' embeddings (negative, target), the schedule, the feature store, delta
    embeds = torch.cat([encode_prompt(rt.models, cfg.negative_prompt), encode_prompt(rt.models, prompt)])
    schedule = DDIMSchedule(rt.models.scheduler, cfg.steps, cfg.timestep_grid)
    ctx = EditContext(cfg, rt.backend, rt.grad_backend, schedule, embeds, FeatureStore(cfg, sel.n_frames),
                      cfg.effective_delta(sel.latent_hw), EditStats())
    # 4. Edit: the schedule's finished frames, decoded by the sink and written as they come
    calls0 = _unet_calls(rt)
    t_edit = time.perf_counter()
    advance = progress.stage("edit", sel.n_frames * cfg.steps)
    outputs = _EditOutputs(sel, out, sbs_path, preview, files)
    initial = _initial_frames(inv, sel.n_frames, rt.backend.device)
    finished = finite_frames(run_schedule(ctx, initial, on_step=advance), cfg)  # checked before they are written
    with contextlib.ExitStack() as stack:
        outputs.open(stack)
        # entered last, so it is drained (or cancelled) before the writers finish (or abort)
        sink = stack.enter_context(FrameSink(rt.backend, outputs.consume))
        for st in finished:
            sink.submit(st.index, st.latent)
    # 5. The strip: a few source frames above their edits
    strip_path = None if preview else outputs.save_strip(strip)
    t_end = time.perf_counter()
    # 6. Result: the UNet calls this edit made, the update's size, the stages that overlapped it
    stats = ctx.stats
    calls, backward = _unet_calls(rt)
    stats.unet_calls, stats.unet_backward = calls - calls0[0], backward - calls0[1]
    _report_edit(ctx, progress)
    busy = {"decode_busy": sink.seconds["decode"], "encode_busy": sink.seconds["encode"]}
    result = EditResult(out, sel.n_frames, sel.fps, sel.output_size, t_end - t_start, prep.seconds, t_end - t_edit,
                        inv.cache_hit, inv.source_prompt, sbs_path, strip_path, stats, inv.runtime,
                        inv.reconstruction, outputs.raw.hexdigest(), busy, variable_rate=outputs.variable,
                        working_size=sel.size)
    if json_path is not None:
        from p2v_fast.files import write_json_atomic

        write_json_atomic(files.stage(json_path), {"config": dataclasses.asdict(cfg), **result.to_dict()})
    return result


def _announce(rt: Runtime, cfg: EditConfig, prompt: str, progress: Progress) -> None:
    """The backend the edit runs on, and the prompts that CLIP's 77 tokens cut."""
    grad = "" if rt.grad_backend in (None, rt.backend) else f" (guided autograd steps on {rt.grad_backend.name})"
    dtype = str(rt.backend.dtype).removeprefix("torch.")
    progress.log(f"backend: {rt.backend.name} on {rt.backend.device}, {dtype}{grad}")
    warn_if_truncated(rt.models, prompt, "target prompt", progress.log, rt.warned)
    warn_if_truncated(rt.models, cfg.negative_prompt, "negative prompt", progress.log, rt.warned)


def _unet_calls(rt: Runtime) -> tuple[int, int]:
    """UNet calls and differentiable calls the runtime's backends have made so far."""
    backends = [rt.backend] + ([rt.grad_backend] if rt.grad_backend not in (None, rt.backend) else [])
    return sum(b.counter.unet_calls for b in backends), sum(b.counter.unet_backward for b in backends)


def _initial_frames(inv: InvertedClip, n_frames: int, device: torch.device) -> Iterator[FrameState]:
    """Each frame's x_T and depth from the inversion, as the schedule asks for them."""
    for i in range(n_frames):
        d = inv.load(i)  # on the host; pinned and copied without blocking the edit
        yield FrameState(i, _to_device(d["x_T"], device), _to_device(d["depth"], device))


class _EditOutputs:
    """Where the edited frames go, in order, from the sink's writer thread: the video (and the
    side-by-side), or with ``preview`` the anchor frame's PNG; thumbnails of up to 4 frames for
    the strip; the sha256 of the raw frames."""

    def __init__(self, sel: ClipSelection, out: Path, sbs_path: Path | None, preview: bool, files: OutputSet) -> None:
        self.sel, self.out, self.sbs_path, self.preview = sel, out, sbs_path, preview
        self.files = files  # every file under a temporary name, renamed with the others by edit_video
        n = sel.n_frames
        self.thumbs_at = set(np.linspace(0, n - 1, min(4, n)).round().astype(int).tolist())
        self.thumbs: list[tuple[np.ndarray, np.ndarray]] = []
        self.source_frames = sel.output_sources()
        self.writers: list[writer.VideoWriter] = []  # the edit, then the side-by-side
        self.raw = hashlib.sha256()
        self.variable = False

    def open(self, stack: contextlib.ExitStack) -> None:
        """Open the writers (none for a preview) on ``stack``."""
        if self.preview:
            return
        sel = self.sel
        audio = sel.info.path if sel.info.has_audio else None
        size = sel.output_size
        timing = reader.output_timing(sel.info, sel.start, sel.n_frames, sel.stride)  # source times if VFR
        self.variable = timing.variable
        self.writers.append(stack.enter_context(writer.VideoWriter(self.out, timing, size, audio_source=audio,
                                                                  publish=self.files.adopt)))
        if self.sbs_path is not None:
            sbs_size = (size[0] * 2, size[1])
            self.writers.append(stack.enter_context(writer.VideoWriter(self.sbs_path, timing, sbs_size,
                                                                      audio_source=audio, publish=self.files.adopt)))

    def consume(self, index: int, frame: np.ndarray) -> None:
        """Frame ``index`` of the edit, uint8 [H, W, 3] at the working size (in the sink's writer thread)."""
        self.raw.update(self.sel.to_working_output(frame).tobytes())  # --resize pad: bars cut
        frame = self.sel.to_output(frame)  # and at --output-size
        src = next(self.source_frames)
        if index in self.thumbs_at:
            self.thumbs.append((src, frame))
        if self.preview:
            writer.save_png(self.files.stage(self.out), frame)
            return
        self.writers[0].write(frame)
        if len(self.writers) > 1:
            self.writers[1].write(side_by_side(src, frame))

    def save_strip(self, path: Path) -> Path:
        top = np.concatenate([s for s, _ in self.thumbs], axis=1)
        bottom = np.concatenate([e for _, e in self.thumbs], axis=1)
        writer.save_png(self.files.stage(path), np.concatenate([top, bottom], axis=0))
        return path


def _report_edit(ctx: EditContext, progress: Progress) -> None:
    """The guided update's size, and how the memory budget split the UNet calls."""
    random = random_weights(ctx.backend.models.source)
    progress.log(ctx.stats.describe_update(ctx.cfg.latent_update, ctx.cfg.steps, random))
    budget = ctx.budget
    if budget is not None and (budget.splits or budget.ooms):
        progress.log(f"{budget.splits} UNet calls split to fit in memory, {budget.ooms} retried after running out")
