"""`p2v bench --protocol v2v120`: the yardstick later video editors report, end to end.

FlowVid (Liang et al., 2023) and the papers after it compare editors on one 120-frame clip at
512x512 on one A100, wall-clock for the whole edit: TokenFlow 15.8 min, Rerender-A-Video
10.8 min, FlowVid 1.5 min (StreamV2V: 9 s, with a 4-step LCM, not comparable in quality).
The protocol here runs ``p2v edit``'s own code path (:func:`p2v_fast.pipeline.edit_video`) on a
synthetic clip of that size, once per latent-update mode, each from a cold inversion cache:
depth, VAE encode, DDIM inversion (and its reconstruction check), the edit, VAE decode and H.264
encoding (these two overlap the edit; their busy time is reported beside it). Models are
built or loaded once and one small untimed edit first warms up kernels (and ``--compile``'s
graphs), as a user's second clip would find them.

The protocol fixes frames, size and steps. A run that changes any of them (``--frames``,
``--size``, ``--steps`` beside ``--protocol``: on a CPU the protocol itself takes hours) is
labelled as not the protocol in its table and its JSON (``"faithful": false`` and the
``overrides``), so its numbers are never mistaken for the yardstick's.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from rich.table import Table

from benchmarks.options import BenchRequest
from p2v_fast.config import LATENT_UPDATES, EditConfig
from p2v_fast.errors import InputError
from p2v_fast.nets import memory
from p2v_fast.text import plural

PROTOCOLS: dict[str, dict[str, int]] = {"v2v120": {"frames": 120, "size": 512, "steps": 50}}

#: End-to-end seconds for 120 frames at 512x512 on one A100, as the papers report them.
PEERS: list[dict[str, Any]] = [
    {"method": "TokenFlow", "seconds": 15.8 * 60, "source": "FlowVid (Liang et al., 2023)"},
    {"method": "Rerender-A-Video", "seconds": 10.8 * 60, "source": "FlowVid (Liang et al., 2023)"},
    {"method": "FlowVid", "seconds": 1.5 * 60, "source": "FlowVid (Liang et al., 2023)"},
    {"method": "StreamV2V", "seconds": 9.0, "source": "StreamV2V (Liang et al., 2024)",
     "note": "4-step LCM: not comparable in quality"},
]
SOURCE_PROMPT = "a photo of a ball in a colourful room"
TARGET_PROMPT = "a watercolor painting of a ball in a colourful room"


@dataclass(frozen=True)
class ProtocolOptions:
    name: str = "v2v120"
    model: str | None = None  # "tiny", a hub id or folder; None: --arch
    arch: str | None = None  # "sd2-depth" (default): the real architecture, random weights
    device: str = BenchRequest.device
    dtype: str = BenchRequest.dtype
    backend: str = "torch"
    engines: Path | None = None
    latent_updates: tuple[str, ...] = LATENT_UPDATES
    compile: bool = False
    invert_dtype: str = BenchRequest.invert_dtype  # as `p2v edit --invert-dtype`
    max_memory: int | None = None  # as `p2v edit --max-memory` (bytes)
    overrides: dict[str, int] = field(default_factory=dict)  # frames / size / steps: then not the protocol
    seed: int = 0

    def __post_init__(self) -> None:
        if self.name not in PROTOCOLS:
            raise InputError(f"--protocol must be one of {', '.join(PROTOCOLS)}; got {self.name!r}")
        bad = set(self.overrides) - set(PROTOCOLS[self.name])
        if bad:
            raise InputError(f"--protocol {self.name} fixes frames, size and steps only; cannot override {bad}")
        for v in self.latent_updates:
            if v not in LATENT_UPDATES:
                raise InputError(f"--latent-update must be one of {', '.join(LATENT_UPDATES)}; got {v!r}")
        if self.model is not None and self.arch is not None:
            raise InputError("give --model or --arch, not both")
        if self.workload["frames"] < 1:
            raise InputError(f"--frames must be >= 1; got {self.workload['frames']}")
        self.edit_config("off")  # size, steps, device, dtype, backend, invert dtype
        from p2v_fast.media.framing import working_size

        working_size(self.workload["size"], self.workload["size"], self.workload["size"])  # the 2048-pixel limit

    @property
    def workload(self) -> dict[str, int]:
        """The protocol's frames, size and steps, with any override applied."""
        return {**PROTOCOLS[self.name], **self.overrides}

    @property
    def faithful(self) -> bool:
        return all(PROTOCOLS[self.name][k] == v for k, v in self.overrides.items())

    @property
    def model_label(self) -> str:
        return self.model if self.model is not None else f"arch:{self.arch or 'sd2-depth'}"

    def edit_config(self, mode: str, **kw: Any) -> EditConfig:
        """The edit of one run (``kw`` replaces fields, e.g. the warm-up's frames and steps)."""
        w = self.workload
        return EditConfig(prompt=TARGET_PROMPT, source_prompt=SOURCE_PROMPT, model=self.model_label,
                          device=self.device, dtype=self.dtype, backend=self.backend, engines=self.engines,
                          size=w["size"], max_frames=w["frames"], steps=w["steps"], latent_update=mode,
                          compile=self.compile, invert_dtype=self.invert_dtype, max_memory=self.max_memory,
                          seed=self.seed).replace(**kw)


class StageClock:
    """A :class:`p2v_fast.progress.Progress` that times the pipeline's stages: the wall time
    from each ``stage()`` call to the next (the device synchronised at each boundary, so a
    stage's queued work is charged to it)."""

    def __init__(self, device: torch.device, log: Callable[[str], None]) -> None:
        self.device = device
        self._log = log
        self.marks: list[tuple[str, float]] = []

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def start(self) -> None:
        self.marks = [("setup", self._now())]

    def stage(self, description: str, total: int | None) -> Callable[[int], None]:
        self.marks.append((description, self._now()))

        def advance(n: int = 1) -> None:
            pass

        return advance

    def log(self, message: str) -> None:
        self._log(message)

    def seconds(self, end: float) -> dict[str, float]:
        """Seconds per stage up to ``end`` (a stage seen twice is summed)."""
        out: dict[str, float] = {}
        for (name, t0), (_, t1) in zip(self.marks, [*self.marks[1:], ("end", end)], strict=True):
            out[name] = out.get(name, 0.0) + t1 - t0
        return out


def _models(opts: ProtocolOptions):
    from benchmarks.arch import build_arch
    from p2v_fast.config import resolve_device
    from p2v_fast.nets.runtime import resolve_dtype
    from p2v_fast.weights.models import load_models

    device = resolve_device(opts.device)
    dtype = resolve_dtype(opts.dtype, device)
    if opts.model is not None:
        return load_models(opts.model, device=device, dtype=dtype)
    return build_arch(opts.arch or "sd2-depth", device, dtype, seed=opts.seed)


def warm_up_compiled(rt, latent_hw: tuple[int, int]) -> int:
    """Compile (and record, on CUDA) every batch bucket the protocol's calls use before any clock
    starts: edit ticks of up to the default cap of frames (2 samples each) and inversion calls of
    up to :data:`~p2v_fast.method.inversion.MAX_INVERT_BATCH` frames (1 sample each). The warm-up edit
    alone (2 frames) compiles only the smallest buckets, so the larger ones compiled inside the
    first timed mode. Returns the buckets warmed up."""
    from p2v_fast.method.edit import DEFAULT_WAVEFRONT_FRAMES
    from p2v_fast.method.inversion import MAX_INVERT_BATCH

    frames = max(DEFAULT_WAVEFRONT_FRAMES, -(-MAX_INVERT_BATCH // 2))
    done, seen = 0, set()
    for b in (rt.backend, rt.grad_backend):
        if b is not None and id(b) not in seen and getattr(b, "compiled", False):
            seen.add(id(b))
            done += b.warm_up(latent_hw, frames)
    return done


def run_protocol(opts: ProtocolOptions, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the protocol; the report (written by the caller). ``setup_seconds`` (models, runtime,
    the warm-up edit and compiled buckets) is reported apart from each mode's ``seconds``; peak
    memory is read through :mod:`p2v_fast.nets.memory`'s nested windows (the call budget's own
    measurements reset the device's mark), per mode and over the whole run."""
    from benchmarks.hardware import device_info, machine_info, versions
    from benchmarks.timing import PeakMemory, load_average
    from p2v_fast.config import resolve_device
    from p2v_fast.media.samples import make_sample_clip
    from p2v_fast.nets.runtime import runtime_for
    from p2v_fast.pipeline import edit_video

    w = opts.workload
    whole = PeakMemory(resolve_device(opts.device))
    whole.reset()
    t_setup = time.perf_counter()
    models = _models(opts)
    device = models.device
    rt = runtime_for(opts.edit_config("autograd"), models)  # autograd: a gradient backend where needed
    report: dict[str, Any] = {
        "protocol": opts.name, "faithful": opts.faithful, "overrides": dict(opts.overrides), "workload": w,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine_info(),
        "device": device_info(device, models.dtype), "versions": versions(), "model": opts.model_label,
        "dtype": str(models.dtype).removeprefix("torch."), "backend": rt.backend.name,
        "options": {k: v for k, v in dataclasses.asdict(opts).items() if k != "overrides"},
        "peers": PEERS, "load_average_start": load_average(), "runs": [], "memory_kind": whole.kind,
        "basis": "wall clock of p2v_fast.pipeline.edit_video per latent-update mode, cold inversion cache, "
                 "models loaded and kernels warmed up beforehand (setup_seconds, apart)",
    }
    with tempfile.TemporaryDirectory(prefix="p2v-protocol-") as tmp:
        work = Path(tmp)
        clip = make_sample_clip(work / "clip.mp4", n_frames=w["frames"], size=(w["size"], w["size"]), fps=24.0,
                                with_audio=False)
        log(f"warm-up: a 2-frame, 2-step edit (untimed){' and every compiled bucket' if opts.compile else ''}")
        t0 = time.perf_counter()
        edit_video(opts.edit_config("autograd", cache_dir=work / "warm", max_frames=2, steps=2), clip,
                   work / "warm.mp4", runtime=rt)
        report["compiled_buckets_warmed"] = warm_up_compiled(rt, (w["size"] // 8, w["size"] // 8))
        report["warmup_seconds"] = time.perf_counter() - t0
        report["setup_seconds"] = time.perf_counter() - t_setup
        for mode in opts.latent_updates:
            log(f"{opts.name}: latent update {mode}, {plural(w['frames'], 'frame')} at {w['size']}x{w['size']}, "
                f"{plural(w['steps'], 'step')}, cold inversion cache")
            clock = StageClock(device, log)
            peak = PeakMemory(device)
            peak.reset()
            clock.start()
            t_start = clock.marks[0][1]
            res = edit_video(opts.edit_config(mode, cache_dir=work / f"cache-{mode}"), clip, work / f"{mode}.mp4",
                             runtime=rt, progress=clock)
            t_end = clock._now()
            stages = clock.seconds(t_end)
            total = t_end - t_start
            report["runs"].append({
                "latent_update": mode, "seconds": total, "seconds_per_frame": total / res.n_frames,
                "frames": res.n_frames, "stages": stages, "overlapped_busy": res.overlapped,
                "unet_calls": res.stats.unet_calls, "unet_backward": res.stats.unet_backward,
                "peak_feature_bytes": res.stats.peak_feature_bytes,
                "peak_memory_bytes": peak.peak() if peak.windowed else None,
                "inversion_cache_hit": res.inversion_cache_hit,
            })
            (work / f"{mode}.mp4").unlink(missing_ok=True)
            if peak.window is not None:
                memory.close_window(device, peak.window)
    report["peak_memory_bytes"] = whole.peak() if whole.windowed else None  # setup included
    if whole.window is not None:
        memory.close_window(whole.device, whole.window)
    report["load_average_end"] = load_average()
    return report


def protocol_table(report: dict[str, Any]) -> Table:
    w = report["workload"]
    label = "" if report["faithful"] else (f"  NOT THE PROTOCOL: overridden {report['overrides']} "
                                           f"(the protocol is {PROTOCOLS[report['protocol']]})")
    table = Table(title=f"--protocol {report['protocol']}: {plural(w['frames'], 'frame')}, {w['size']}x{w['size']}, "
                        f"{plural(w['steps'], 'step')}, end to end, {report['model']} {report['dtype']} on "
                        f"{report['device']['name']}{label}")
    names = sorted({k for r in report["runs"] for k in r["stages"]}, key=_stage_order)
    for col in ("method", "total s", "s/frame", *names, "decode busy", "encode busy"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for r in report["runs"]:
        busy = r["overlapped_busy"]
        table.add_row(f"p2v-fast, {r['latent_update']}", f"{r['seconds']:.1f}", f"{r['seconds_per_frame']:.3g}",
                      *[f"{r['stages'].get(n, 0.0):.1f}" for n in names],
                      f"{busy.get('decode_busy', 0.0):.1f}", f"{busy.get('encode_busy', 0.0):.1f}")
    for p in report["peers"]:
        table.add_row(f"{p['method']} (A100, reported)", f"{p['seconds']:.0f}", f"{p['seconds'] / 120:.3g}",
                      *[""] * (len(names) + 2))
    table.caption = ("stages: wall seconds between the pipeline's stage boundaries (device synchronised); "
                     "'edit' includes VAE decode and encoding, which overlap it (their busy seconds at the right). "
                     "Peers: as reported by FlowVid and StreamV2V (StreamV2V: 4-step LCM, not comparable in quality).")
    return table


def _stage_order(name: str) -> int:
    order = ("setup", "encode + depth", "inversion", "edit")
    return order.index(name) if name in order else len(order)
