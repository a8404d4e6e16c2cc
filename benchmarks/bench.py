"""`p2v bench`: seconds per frame of every stage, per backend, schedule and latent-update mode.

Stages (all in seconds per frame, frames processed one at a time unless a schedule batches them):
  depth       DPT depth of one frame (preprocessing, network, resize to latent size)
  vae_encode  VAE mean latent of one frame
  inversion   :func:`p2v_fast.method.inversion.invert_clip` on a cold cache, per frame: frame decoding,
              encode, depth, ``steps`` DDIM-inversion UNet calls (batch 1, conditional branch) and
              the cache writes -- what a first edit of a clip pays once
  edit        the edit loop over the clip, per frame (Algorithm 1; ``anchor`` = frame 1 and
              ``propagated`` = the mean of frames 2..n, split for the sequential schedule only,
              since the wavefront schedule runs frames together)
  vae_decode  VAE decode of one latent

Every stage runs ``warmup`` times untimed, then ``repeats`` times; the device is synchronised
before each clock mark (CUDA events on a GPU). Each row reports every repeat, the median, min/max
and IQR, and the peak memory of the stage. UNet calls are counted from the backends' counters;
UNet FLOPs per call come from :mod:`benchmarks.flops`. All backends run in one process on the
same model set, built once.
"""

from __future__ import annotations

import dataclasses
import itertools
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from benchmarks.arch import ARCHS, build_arch, parameter_counts
from benchmarks.flops import UNetFlops, count_unet_flops
from benchmarks.hardware import device_info, machine_info, versions
from benchmarks.options import BenchRequest
from benchmarks.timing import Clock, PeakMemory, load_average, summarize
from p2v_fast.config import BACKENDS, DTYPES, LATENT_UPDATES, SCHEDULES, EditConfig, check_threads, resolve_device
from p2v_fast.errors import InputError, P2VError
from p2v_fast.files import write_json_atomic
from p2v_fast.media.clip_selection import frames_digest, select_clip
from p2v_fast.media.paths import check_json_path
from p2v_fast.media.samples import make_sample_clip
from p2v_fast.method.ddim import DDIMSchedule
from p2v_fast.method.edit import (
    DEFAULT_WAVEFRONT_FRAMES,
    EditContext,
    EditStats,
    FeatureStore,
    FrameState,
    run_schedule,
)
from p2v_fast.method.inversion import images_to_tensor, invert_clip, raw_depth, reconstruction_error
from p2v_fast.method.plan import simulate_wavefront
from p2v_fast.nets.attention import feature_shapes
from p2v_fast.nets.backends import Backend, CallCounter, TorchBackend
from p2v_fast.nets.runtime import (
    InversionRuntime,
    inversion_runtime,
    invert_precision,
    make_backend,
    resolve_dtype,
)
from p2v_fast.progress import NullProgress, Progress
from p2v_fast.text import plural
from p2v_fast.weights.prompts import encode_prompt

SCHEMA = "p2v-bench/1"
SOURCE_PROMPT = "a photo of a ball in a colourful room"
TARGET_PROMPT = "a watercolor painting of a ball in a colourful room"
#: Pix2Video's reported speed (paper sec. 4): 5 s per frame on an A100 once frames are inverted,
#: 512x512, 50 DDIM steps, SD2-depth.
PAPER = {"seconds_per_frame": 5.0, "device": "NVIDIA A100", "size": 512, "steps": 50,
         "basis": "edit + VAE decode per frame, inversion excluded"}


@dataclass(frozen=True)
class BenchOptions:
    """What to benchmark. ``model`` and ``arch`` are exclusive; with neither, ``arch`` is
    ``sd2-depth`` (the real architecture with random weights: honest speed, no download)."""

    # --- model ---
    model: str | None = None  # hub id, local diffusers folder, or "tiny"
    arch: str | None = None  # "sd2-depth": full-size, random weights, built in code
    dtype: str = BenchRequest.dtype
    invert_dtype: str = BenchRequest.invert_dtype  # the inversion's precision, as `p2v edit --invert-dtype`
    device: str = BenchRequest.device
    engines: Path | None = None  # exported graphs / engines for non-torch backends; None: export them

    # --- workload (paper: 512x512, 50 steps) ---
    size: int = 512
    steps: int = 50
    frames: int = 4
    update_steps: int | None = None  # guided steps; None: steps // 2

    # --- what to compare, all in one run ---
    backends: tuple[str, ...] = ("torch",)
    latent_updates: tuple[str, ...] = LATENT_UPDATES
    schedules: tuple[str, ...] = SCHEDULES
    batch_frames: int | None = None  # wavefront: frames in flight
    speedups: tuple[str, ...] = ()  # PyTorch speed-ups to time on their own (benchmarks.speedups)
    compile: bool = False  # torch.compile the torch backend's gradient-free UNet calls (warmed up untimed)
    invert_batch: int | None = None  # None: what fits (p2v_fast.nets.memory.CallBudget)
    max_memory: int | None = None  # --max-memory: bytes UNet calls are split to stay under

    # --- timing ---
    repeats: int = BenchRequest.repeats
    warmup: int = BenchRequest.warmup
    threads: int | None = None  # CPU intra-op threads for the run (None: torch's default)
    seed: int = 0
    json_path: Path | None = None  # also write the report here (atomically)

    def __post_init__(self) -> None:
        _verify(self)

    @property
    def model_label(self) -> str:
        return self.model if self.model is not None else f"arch:{self.arch or ARCHS[0]}"

    def edit_config(self) -> EditConfig:
        """The edit options every run starts from (validated by EditConfig itself)."""
        return EditConfig(
            prompt=TARGET_PROMPT, source_prompt=SOURCE_PROMPT, model=self.model_label, device=self.device,
            dtype=self.dtype, backend=(self.backends or ("torch",))[0], engines=self.engines, size=self.size,
            max_frames=self.frames, steps=self.steps, seed=self.seed, schedule=self.schedules[0],
            latent_update=self.latent_updates[0], update_steps=self.update_steps, batch_frames=self.batch_frames,
            invert_batch=self.invert_batch, invert_dtype=self.invert_dtype, max_memory=self.max_memory,
        )


def _verify(o: BenchOptions) -> None:
    def choices(flag: str, values: tuple[str, ...], allowed: tuple[str, ...]) -> None:
        if not values:
            raise InputError(f"--{flag} needs at least one value")
        for v in values:
            if v not in allowed:
                raise InputError(f"--{flag} must be one of {', '.join(allowed)}; got {v!r}")
        if len(set(values)) != len(values):
            raise InputError(f"--{flag} lists a value twice: {', '.join(values)}")

    if o.model is not None and o.arch is not None:
        raise InputError(f"give --model or --arch, not both (got --model {o.model!r} --arch {o.arch!r})")
    if o.arch is not None and o.arch not in ARCHS:
        raise InputError(f"--arch must be one of {', '.join(ARCHS)}; got {o.arch!r}")
    if o.backends or not o.speedups:
        choices("backend", o.backends, BACKENDS)
    if o.speedups:
        from benchmarks.speedups import check_speedups

        check_speedups(o.speedups)
    choices("latent-update", o.latent_updates, LATENT_UPDATES)
    choices("schedule", o.schedules, SCHEDULES)
    if o.dtype != "auto" and o.dtype not in DTYPES:
        raise InputError(f"--dtype must be auto or one of {', '.join(DTYPES)}; got {o.dtype!r}")
    exported = [b for b in o.backends if b in GRAPH_BACKENDS] if o.engines is None else []
    if exported and o.dtype == "bf16":
        raise InputError(f"--backend {exported[0]} exports fp16 or fp32 graphs; use --dtype fp16 or fp32, not bf16")
    if o.frames < 1:
        raise InputError(f"--frames must be >= 1; got {o.frames}")
    if o.repeats < 1:
        raise InputError(f"--repeats must be >= 1; got {o.repeats}")
    if o.warmup < 0:
        raise InputError(f"--warmup must be >= 0; got {o.warmup}")
    check_threads(o.threads)
    o.edit_config()  # size, steps, update_steps, batch sizes
    from p2v_fast.media.framing import working_size

    working_size(o.size, o.size, o.size)  # the working size's limit (--size over 2048 is refused)
    if o.json_path is not None:
        check_json_path(Path(o.json_path))  # before the run, not after it


# ------------------------------------------------------------------------------------------
# helpers


def _distinct(backends: list[Backend | None]) -> list[Backend]:
    out: list[Backend] = []
    for b in backends:
        if b is not None and all(b is not o for o in out):
            out.append(b)
    return out


def _snapshot(backends: list[Backend]) -> dict[str, int]:
    """Summed counters of ``backends`` (a separate torch grad backend does the autograd steps)."""
    total = CallCounter()
    for b in backends:
        for name in total.__dataclass_fields__:
            setattr(total, name, getattr(total, name) + getattr(b.counter, name))
    return dataclasses.asdict(total)


def _diff(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    return {k: b[k] - a[k] for k in a}


def _per_frame(counts: dict[str, int], n: int) -> dict[str, float]:
    return {k: v / n for k, v in counts.items()}


def _reset(backends: list[Backend]) -> None:
    for b in backends:
        b.counter.reset()


def _load_models(opts: BenchOptions, device: torch.device, dtype: torch.dtype):
    if opts.model is not None:
        from p2v_fast.weights.models import load_models

        return load_models(opts.model, device=device, dtype=dtype)
    return build_arch(opts.arch or ARCHS[0], device, dtype, seed=opts.seed)


@dataclass
class _Bench:
    """State shared by the measurements of one backend."""

    opts: BenchOptions
    models: Any
    backends: list[Backend]  # whose counters are summed
    clock: Clock
    memory: PeakMemory
    advance: Callable[[int], None]

    def measure(self, fn: Callable[[], object], n_frames: int) -> dict[str, Any]:
        """``fn`` (one pass over ``n_frames`` frames) warm-up times untimed, then timed ``repeats``
        times. Seconds per frame, peak memory, and the counters of the last repeat per frame."""
        for _ in range(self.opts.warmup):
            fn()
            self.advance(1)
        self.memory.reset()
        samples = []
        counts: dict[str, int] = {}
        for _ in range(self.opts.repeats):
            _reset(self.backends)
            a = self.clock.mark()
            fn()
            b = self.clock.mark()
            samples.append(self.clock.seconds(a, b) / n_frames)
            counts = _snapshot(self.backends)
            self.advance(1)
        return {"seconds_per_frame": summarize(samples), "peak_memory_bytes": self.memory.peak(),
                "counters_per_frame": _per_frame(counts, n_frames)}


# ------------------------------------------------------------------------------------------
# the edit


def expected_unet_per_frame(cfg: EditConfig) -> dict[str, dict[str, int]]:
    """UNet work of Algorithm 1 per frame: the anchor and each propagated frame run ``steps``
    calls of 2 samples (the two CFG branches); a propagated frame adds one backward pass per
    guided step in ``autograd`` mode."""
    backward = cfg.guided_steps if cfg.latent_update == "autograd" else 0
    return {
        "anchor": {"unet_calls": cfg.steps, "unet_samples": 2 * cfg.steps, "unet_backward": 0},
        "propagated": {"unet_calls": cfg.steps, "unet_samples": 2 * cfg.steps, "unet_backward": backward},
    }


def edit_flops(cfg: EditConfig, flops: UNetFlops, n_frames: int, stats: EditStats | None = None) -> dict[str, float]:
    """UNet FLOPs per frame. ``anchor`` and ``propagated``: Algorithm 1 run sequentially (see
    :func:`expected_unet_per_frame`; the anchor alone, in plain self-attention). ``mean``: the
    work that ran, from the samples the edit sent (``stats``), each at its cost: a sample in a
    call with references costs a cross-frame sample (the anchor's too, when it shares the
    wavefront's call and attends to [h, h]), one in a call without costs a plain one, and a
    differentiated sample adds a backward pass. FLOPs are linear in the batch (batch-2 counts
    halved). Without ``stats``: the sequential expectation."""
    calls = expected_unet_per_frame(cfg)
    xframe = cfg.refs != "none"
    fwd = flops.xframe_call if xframe else flops.anchor_call
    bwd = flops.xframe_backward if xframe else flops.anchor_backward
    anchor = calls["anchor"]["unet_calls"] * flops.anchor_call
    propagated = calls["propagated"]["unet_calls"] * fwd + calls["propagated"]["unet_backward"] * bwd
    mean = (anchor + (n_frames - 1) * propagated) / n_frames
    if stats is not None:
        mean = (stats.samples_plain * flops.anchor_call + stats.samples_xframe * flops.xframe_call
                + stats.samples_backward * bwd) / 2 / n_frames
    return {"anchor": float(anchor), "propagated": float(propagated), "mean": float(mean)}


def attention_kernels_used(models, latent_hw: tuple[int, int]) -> dict[str, Any]:
    """Which attention kernels a cross-frame UNet call and its backward run on ``models``'
    device (one frame, both branches, through the torch backend; read from the profiler's aten
    ops), and the preference the backend sets (:data:`p2v_fast.nets.attention.CUDA_ATTENTION_KERNELS`)."""
    from torch.profiler import ProfilerActivity, profile

    from p2v_fast.nets.attention import CUDA_ATTENTION_KERNELS

    backend = TorchBackend(models)
    h, w = latent_hw
    dev, dt = models.device, models.dtype
    shapes = feature_shapes(models.unet, latent_hw)
    refs = [torch.randn(2, 2 * n, c, device=dev, dtype=dt) for n, c in shapes]
    sample = torch.randn(2, int(models.unet.config.in_channels), h, w, device=dev, dtype=dt, requires_grad=True)
    ehs = torch.zeros(2, 77, int(models.unet.config.cross_attention_dim), device=dev, dtype=dt)
    t = torch.full((2,), 500, device=dev, dtype=torch.long)
    seen: dict[str, list[str]] = {}
    for phase in ("forward", "backward"):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            if phase == "forward":
                with torch.no_grad():
                    backend.unet_forward(sample, t, ehs, refs)
            else:
                out = backend.unet_forward(sample, t, ehs, refs)
                out[0].float().sum().backward()
        seen[phase] = sorted({e.key.removeprefix("aten::") for e in prof.key_averages()
                              if "scaled_dot_product" in e.key and e.key != "aten::scaled_dot_product_attention"})
    return {**seen, "preference": list(CUDA_ATTENTION_KERNELS) if dev.type == "cuda" else "torch's own (CPU)"}


def _edit_once(cfg: EditConfig, bench: _Bench, runtime: tuple[Backend, Backend | None], schedule: DDIMSchedule,
               embeds: torch.Tensor, inverted: list[dict[str, torch.Tensor]], latent_hw: tuple[int, int]):
    """One edit of the clip: clock marks and counter snapshots at the start and after each
    finished frame, and the run's context (stats, feature store, call budget)."""
    backend, grad = runtime
    n = len(inverted)
    stats = EditStats()
    ctx = EditContext(cfg, backend, grad, schedule, embeds, FeatureStore(cfg, n), cfg.effective_delta(latent_hw),
                      stats)
    initial = (FrameState(i, d["x_T"].clone(), d["depth"]) for i, d in enumerate(inverted))
    _reset(bench.backends)
    marks, counts = [bench.clock.mark()], [_snapshot(bench.backends)]
    for _ in run_schedule(ctx, initial):
        marks.append(bench.clock.mark())
        counts.append(_snapshot(bench.backends))
    return marks, counts, ctx


def _bench_edit(cfg: EditConfig, bench: _Bench, runtime: tuple[Backend, Backend | None], embeds: torch.Tensor,
                inverted: list[dict[str, torch.Tensor]], latent_hw: tuple[int, int],
                flops: UNetFlops) -> dict[str, Any]:
    n = len(inverted)
    schedule = DDIMSchedule(bench.models.scheduler, cfg.steps)
    for _ in range(bench.opts.warmup):
        _edit_once(cfg, bench, runtime, schedule, embeds, inverted, latent_hw)
        bench.advance(1)
    bench.memory.reset()
    edit, anchor, propagated = [], [], []
    marks: list = []
    counts: list[dict[str, int]] = []
    ctx: EditContext | None = None
    for _ in range(bench.opts.repeats):
        marks, counts, ctx = _edit_once(cfg, bench, runtime, schedule, embeds, inverted, latent_hw)
        secs = [bench.clock.seconds(a, b) for a, b in itertools.pairwise(marks)]
        edit.append(sum(secs) / n)
        if cfg.schedule == "sequential":
            anchor.append(secs[0])
            if n > 1:
                propagated.append(sum(secs[1:]) / (n - 1))
        bench.advance(1)
    peak = bench.memory.peak()
    assert ctx is not None and ctx.budget is not None
    stats, budget = ctx.stats, ctx.budget

    total = _diff(counts[0], counts[-1])
    per_frame = [_diff(a, b) for a, b in itertools.pairwise(counts)]
    expected = expected_unet_per_frame(cfg)
    unet: dict[str, Any] = {"mean": _per_frame(total, n), "total": total, "expected": expected}
    keys = ("unet_calls", "unet_samples", "unet_backward")
    if cfg.schedule == "sequential":
        unet["frames"] = per_frame
        unet["anchor"] = {k: per_frame[0][k] for k in keys}
        unet["propagated"] = {k: sum(f[k] for f in per_frame[1:]) / (n - 1) for k in keys} if n > 1 else None
        match = unet["anchor"] == expected["anchor"] and all(
            {k: f[k] for k in keys} == expected["propagated"] for f in per_frame[1:])
    else:  # batched: fewer, larger calls; the samples and backward frame-steps are the same work
        unet["anchor"] = unet["propagated"] = None
        # the calls the simulation of this wavefront predicts (p2v_fast.method.plan), plus those that
        # memory added (measuring calls of 1 and 2 frames, splits, retries after running out)
        plan = simulate_wavefront(cfg, n, feature_shapes(bench.models.unet, latent_hw), bench.models.dtype, latent_hw)
        unet["plan"] = plan.as_dict()
        unet["calls_added_by_memory"] = {"splits": budget.splits, "out_of_memory_retries": budget.ooms}
        unet["feature_bytes_match_plan"] = stats.peak_feature_bytes == plan.peak_feature_bytes
        match = (total["unet_samples"] == 2 * cfg.steps * n
                 and total["unet_calls"] == plan.calls + budget.splits + budget.ooms)
    unet["counts_match_algorithm"] = bool(match)

    return {
        "schedule": cfg.schedule,
        "latent_update": cfg.latent_update,
        "refs": cfg.refs,
        "guided_steps": cfg.guided_steps,
        "delta": cfg.effective_delta(latent_hw),
        "batch_frames": cfg.batch_frames if cfg.schedule == "wavefront" else None,
        "seconds_per_frame": {
            "edit": summarize(edit),
            "anchor": summarize(anchor) if anchor else None,
            "propagated": summarize(propagated) if propagated else None,
        },
        "peak_memory_bytes": peak,
        "peak_feature_bytes": stats.peak_feature_bytes,
        "unet_per_frame": unet,
        "update_rms_per_step": {str(k): v for k, v in stats.mean_update_rms().items()},
        "detached_rms_at_same_latents_per_step": {str(k): v for k, v in stats.mean_detached_rms().items()},
        "unet_flops_per_frame": edit_flops(cfg, flops, n, stats),
    }


# ------------------------------------------------------------------------------------------
# one backend


GRAPH_BACKENDS = {"onnxruntime": "onnx", "tensorrt": "tensorrt"}  # backend -> export format


#: Samples in one inversion call when ``--invert-batch`` is not given, as the bench counts its calls.
INVERT_BATCH = 16


def most_frames(opts: BenchOptions, n: int) -> int:
    """Most frames one UNet call of the bench's work over ``n`` frames takes: the wavefront's frames
    in flight (``--batch-frames``, default :data:`DEFAULT_WAVEFRONT_FRAMES`), or half an inversion
    call's samples (one CFG branch)."""
    inversion = -(-min(n, opts.invert_batch or INVERT_BATCH) // 2)
    return max(min(n, opts.batch_frames or DEFAULT_WAVEFRONT_FRAMES), inversion)


def export_options(opts: BenchOptions, name: str, dtype: torch.dtype, folder: Path):
    """How the bench exports its own model for graph backend ``name`` when no ``--engines`` is
    given: for the bench's work only, one size (``--size``, square, as its clip) and a batch
    profile up to the most samples one call takes (:func:`most_frames` x 2 CFG branches: 32 by
    default, whatever ``--frames`` is), so no call is split and no engine is built, or checked,
    for sizes and batches the bench never runs."""
    from export import ExportOptions

    return ExportOptions(model=opts.model_label, out=folder, format=GRAPH_BACKENDS[name],
                         precision="fp16" if dtype == torch.float16 else "fp32", height=opts.size, width=opts.size,
                         max_size=opts.size, max_batch=2 * most_frames(opts, opts.frames), device=opts.device)


def _engines_for(name: str, opts: BenchOptions, models, work: Path, progress: Progress) -> tuple[Path | None, Any]:
    """The engine folder for backend ``name``: ``--engines``, or (for a graph backend without
    it) the bench's own model exported into the run's temporary folder. Also the export's
    summary for the report (None when nothing was exported)."""
    if name not in GRAPH_BACKENDS or opts.engines is not None:
        return opts.engines, None
    from export import export_engines

    options = export_options(opts, name, models.dtype, work / "engines")
    progress.log(f"{name}: exporting {opts.model_label} ({options.precision}, {options.profile().describe()})")
    report = export_engines(options, progress, models=models)
    return options.out, {
        "format": options.format, "precision": options.precision, "profile": options.profile().describe(),
        "seconds": report.seconds,
        "networks": {f"{r.network}/{r.stage}": {"seconds": r.seconds, "bytes": r.bytes, "status": r.status,
                                                "max_rel_err": r.detail} for r in report.rows},
    }


def _bench_backend(name: str, opts: BenchOptions, base: EditConfig, models, selection, frames, flops: UNetFlops,
                   peak_tflops: object, work: Path, progress: Progress) -> dict[str, Any]:
    exported = None
    try:
        engines, exported = _engines_for(name, opts, models, work, progress)
        backend = make_backend(name, models, engines)
    except P2VError as exc:
        progress.log(f"{name}: skipped ({exc})")
        return {"backend": name, "error": str(exc), "export": exported}
    grad = backend if backend.supports_grad else (
        TorchBackend(models) if "autograd" in opts.latent_updates else None)
    n, latent_hw, device = len(frames), selection.latent_hw, backend.device
    compiled = None
    if opts.compile and isinstance(backend, TorchBackend):
        backend.optimize(compile=True)
        t0 = time.perf_counter()
        most = most_frames(opts, n)
        buckets = backend.warm_up(latent_hw, most)
        compiled = {"buckets": buckets, "warm_up_seconds": time.perf_counter() - t0,
                    "mode": "reduce-overhead (CUDA graphs)" if backend.cuda_graphs else "default (inductor)"}
        progress.log(f"{name}: compiled the UNet for {buckets} batch sizes in {compiled['warm_up_seconds']:.1f} s")
    edits = [(s, m) for s in opts.schedules for m in opts.latent_updates]
    runs = (opts.warmup + opts.repeats) * (4 + len(edits))
    bench = _Bench(opts, models, _distinct([backend, grad]), Clock(device), PeakMemory(device),
                   progress.stage(f"bench {name}", runs))
    cfg = base.replace(backend=name)
    result: dict[str, Any] = {"backend": name, "runs_as": backend.name,
                              "grad_backend": None if grad is None else grad.name,
                              "engines": "exported for this run" if exported else (str(engines) if engines else None),
                              "export": exported, "compiled": compiled,
                              "clock": bench.clock.kind, "memory": bench.memory.kind, "stages": {}, "edits": []}
    stages = result["stages"]

    progress.log(f"{name}: depth")
    stages["depth"] = bench.measure(lambda: [raw_depth(models, backend, [f], latent_hw) for f in frames], n)

    progress.log(f"{name}: VAE encode")
    images = [images_to_tensor([f]).to(device) for f in frames]
    stages["vae_encode"] = bench.measure(lambda: [backend.vae_encode(im) for im in images], n)

    # The inversion runs where an edit's would (--invert-dtype: fp32 by default, on PyTorch when the
    # backend computes in another precision); a backend made for it is made once, in the warm-up.
    where = inversion_runtime(models, backend, grad, *invert_precision(opts.invert_dtype, device))
    made: list[Backend] = []

    def inverter() -> Backend:
        if not made:
            made.append(where.make())
            bench.backends[:] = _distinct([*bench.backends, made[0]])  # its UNet calls are counted too
        return made[0]

    runtime = InversionRuntime(where.identity, inverter)
    progress.log(f"{name}: inversion ({plural(opts.steps, 'step')}, cold cache) on {runtime.describe()}")
    digest = frames_digest(selection)
    handles: list[tuple[Path, Any]] = []  # (cache folder, InvertedClip)

    def invert() -> None:
        root = work / f"inversion-{name}-{len(handles)}"
        if handles:  # keep only the latest cache on disk
            shutil.rmtree(handles[-1][0], ignore_errors=True)
        handle = invert_clip(cfg.replace(cache_dir=root), selection, models, runtime, SOURCE_PROMPT, digest=digest,
                             batch=cfg.invert_batch, check=False)
        handles.append((root, handle))

    stages["inversion"] = bench.measure(invert, n)
    inv_backend = runtime.make()
    stages["inversion"]["runs_on"] = where.identity
    stages["inversion"]["reconstruction"] = reconstruction_error(  # untimed: measured once, after the repeats
        inv_backend, DDIMSchedule(models.scheduler, cfg.steps), encode_prompt(inv_backend.models, SOURCE_PROMPT),
        handles[-1][1].load(0))
    inverted = [handles[-1][1].load(i, device) for i in range(n)]

    embeds = torch.cat([encode_prompt(models, cfg.negative_prompt), encode_prompt(models, cfg.prompt)])
    for schedule, mode in edits:
        progress.log(f"{name}: edit, {schedule} schedule, latent update {mode}")
        result["edits"].append(_bench_edit(cfg.replace(schedule=schedule, latent_update=mode), bench,
                                           (backend, grad), embeds, inverted, latent_hw, flops))

    result["update_rms"] = update_rms_table(result["edits"], DDIMSchedule(models.scheduler, cfg.steps))

    progress.log(f"{name}: VAE decode")
    latents = [d["x_0"] for d in inverted]
    stages["vae_decode"] = bench.measure(lambda: [backend.vae_decode(x) for x in latents], n)
    _add_throughput(result, flops, base, peak_tflops)
    return result


def update_rms_table(edits: list[dict[str, Any]], schedule: DDIMSchedule) -> dict[str, Any] | None:
    """Per guided step, the RMS size of the update x_{t-1} -= delta * grad in each mode, from the
    run's first edit of each mode (both schedules give the same numbers), and the autograd
    update against the detached form's at the same latents (no diverging trajectories). For an
    ideal denoiser of unit-variance Gaussian latents dx0_hat/dx_t = sqrt(abar_t) I, so that ratio
    would be sqrt(abar_t): ~0.07 at the first of 50 steps, ~0.5 at the 25th; a trained UNet's
    Jacobian sets the real one. None when no guided mode ran."""
    first: dict[str, dict[str, Any]] = {}
    for e in edits:
        first.setdefault(e["latent_update"], e)
    auto, det = first.get("autograd"), first.get("detached")
    if auto is None and det is None:
        return None
    steps = sorted({int(k) for e in (auto, det) if e is not None for k in e["update_rms_per_step"]})

    def column(e: dict[str, Any] | None, key: str) -> list[float | None]:
        return [None if e is None else e[key].get(str(s)) for s in steps]

    same = column(auto, "detached_rms_at_same_latents_per_step")
    autograd = column(auto, "update_rms_per_step")
    return {
        "delta": (auto or det)["delta"],  # type: ignore[index]
        "steps": steps,
        "timesteps": [int(schedule.timesteps[s]) for s in steps],
        "sqrt_abar": [float(schedule.abar[s].sqrt()) for s in steps],
        "autograd": autograd,
        "detached": column(det, "update_rms_per_step"),
        "detached_at_autograd_latents": same,
        "autograd_over_detached_same_latents": [a / d if a is not None and d else None
                                                for a, d in zip(autograd, same, strict=True)],
    }


def _add_throughput(result: dict[str, Any], flops: UNetFlops, base: EditConfig, peak: object) -> None:
    """Achieved UNet TFLOP/s, the fraction of the device's peak (``peak`` TFLOP/s, or
    ``"unknown"``), and the ratio to the paper's 5 s/frame."""
    inv = result["stages"]["inversion"]
    inv["unet_flops_per_frame"] = float(base.steps * flops.inversion_call)
    decode = result["stages"]["vae_decode"]["seconds_per_frame"]["median"]
    for e in [inv, *result["edits"]]:
        secs = (e["seconds_per_frame"]["median"] if e is inv else e["seconds_per_frame"]["edit"]["median"])
        per_frame = e["unet_flops_per_frame"] if e is inv else e["unet_flops_per_frame"]["mean"]
        achieved = per_frame / secs / 1e12 if secs > 0 else None
        e["achieved_unet_tflops"] = achieved
        e["fraction_of_peak"] = (achieved / peak if isinstance(peak, float) and achieved is not None else "unknown")
    for e in result["edits"]:
        seconds = e["seconds_per_frame"]["edit"]["median"] + decode
        e["seconds_per_frame_with_decode"] = seconds
        e["paper_ratio"] = seconds / PAPER["seconds_per_frame"]


# ------------------------------------------------------------------------------------------
# entry point


def run_bench(opts: BenchOptions, progress: Progress | None = None) -> dict[str, Any]:
    """Run the benchmark described by ``opts``; returns the report (and writes it to
    ``opts.json_path`` if set). A backend that cannot run here is reported with its error and
    the others still run; if none can, :class:`~p2v_fast.errors.BackendUnavailableError`.
    ``opts.threads`` applies for the run only; torch's thread count is restored afterwards."""
    threads = torch.get_num_threads()
    if opts.threads is not None:
        torch.set_num_threads(opts.threads)
    try:
        return _run(opts, progress or NullProgress())
    finally:
        torch.set_num_threads(threads)


def _run(opts: BenchOptions, progress: Progress) -> dict[str, Any]:
    from p2v_fast.errors import BackendUnavailableError

    base = opts.edit_config()
    device = resolve_device(opts.device)
    dtype = resolve_dtype(opts.dtype, device)
    torch.manual_seed(opts.seed)
    dev_info = device_info(device, dtype)
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "load_average_start": load_average(),
        "device": dev_info,
        "versions": versions(),
        "options": dataclasses.asdict(opts),
        "config": dataclasses.asdict(base),
        "dtype": str(dtype).removeprefix("torch."),
        "paper": PAPER,
        "timing": {"warmup": opts.warmup, "repeats": opts.repeats, "unit": "seconds per frame",
                   "spread": "min/max and IQR over repeats"},
    }
    with tempfile.TemporaryDirectory(prefix="p2v-bench-") as tmp:
        work = Path(tmp)
        progress.log(f"building/loading {opts.model_label} ({report['dtype']} on {device})")
        t0 = time.perf_counter()
        models = _load_models(opts, device, dtype)
        report["model"] = {"name": opts.model_label, "load_seconds": time.perf_counter() - t0,
                           "parameters": parameter_counts(models)}
        clip = make_sample_clip(work / "clip.mp4", n_frames=opts.frames, size=(opts.size, opts.size),
                                with_audio=False)
        selection = select_clip(clip, base)
        frames = list(selection.frames())
        report["clip"] = {"frames": len(frames), "size": list(selection.size), "latent_hw": list(selection.latent_hw),
                          "source": "synthetic (p2v_fast.media.samples.make_sample_clip)"}
        report["attention"] = attention_kernels_used(models, selection.latent_hw)
        flops = count_unet_flops(models.unet, selection.latent_hw)
        report["unet_flops"] = flops.as_dict()
        report["runs"] = []
        if opts.speedups:
            from benchmarks.speedups import run_speedups

            report["speedups"] = run_speedups(models, selection.latent_hw, opts.speedups,
                                              frames=opts.batch_frames or 1, warmup=opts.warmup,
                                              repeats=opts.repeats, seed=opts.seed, log=progress.log)
        for name in opts.backends:
            report["runs"].append(_bench_backend(name, opts, base, models, selection, frames, flops,
                                                 dev_info["peak_tflops"], work, progress))
    report["load_average_end"] = load_average()
    if opts.json_path is not None:
        write_json_atomic(opts.json_path, report)
    if report["runs"] and all("error" in r for r in report["runs"]):
        raise BackendUnavailableError("no requested backend can run here: " + "; ".join(
            f"{r['backend']}: {r['error']}" for r in report["runs"]))
    return report
