"""DDIM inversion of every frame to x_T (paper Alg. 1 line 1), cached on disk.

Per frame: VAE mean latent x scaling factor (x_0), DPT depth at latent size, then ``steps``
inversion steps with the source prompt at guidance 1 (conditional branch only: batch = frames,
never an unconditional pass), depth-conditioned.

The cache lives under ``<cache>/inversions/<key>/``, one safetensors file per frame (written
atomically, so an interrupted run resumes where it stopped) and ``meta.json`` written last. The
key covers everything the result depends on: the frames' content (after selection and the
``--resize`` framing), the working size and framing, the model, steps, source prompt, depth
normalisation, and the runtime the inversion ran on (:meth:`Backend.identity`: backend, the
dtype it computed in, device, and for graph backends which graphs), so an inversion made on
fp16 graphs is never reused by an fp32 edit. Batch size is not in the key: it changes results
by float reassociation only.

Precision: the inversion runs in ``cfg.invert_dtype`` (fp32 by default): on the edit's backend
when that computes in it, else on PyTorch in it (:func:`inversion_runtime`; a graph backend with
fp16 graphs inverts on PyTorch in fp32, with the same weights). Its quality is measured once,
on the miss that computes it: frame 1 regenerated from its x_T (:func:`reconstruction_error`),
recorded in ``meta.json`` and reported by ``p2v invert``, ``p2v edit`` and ``p2v bench``.

Integrity: ``meta.json`` records each frame file's size and sha256, and an entry is checked
before it is used (frame count, sizes, checksums; a resumed frame's shapes and finite values);
a damaged one is recomputed with a one-line notice, reusing its intact frames. One run at a time
fills an entry (a lock file in it): a second run of the same clip waits, then uses the result.
Non-finite values are never cached, and a full disk is one line with no partial file kept.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save

from p2v_fast import video
from p2v_fast.backends import Backend
from p2v_fast.config import EditConfig
from p2v_fast.ddim import DDIMSchedule
from p2v_fast.depth import DepthEstimator, normalize_per_frame, normalize_with
from p2v_fast.errors import InputError, P2VError
from p2v_fast.memory import CallBudget
from p2v_fast.models import model_identity
from p2v_fast.paths import FileLock, cache_root, write_bytes_atomic
from p2v_fast.progress import NullProgress, Progress
from p2v_fast.prompts import encode_prompt

CACHE_VERSION = 2  # 2: keyed on the runtime (backend, dtype, device, graphs) and the framing


@dataclass(frozen=True)
class ClipSelection:
    """Which frames of which video, at which working size."""

    path: Path
    info: video.VideoInfo
    size: tuple[int, int]  # (W, H) of the working frames, multiples of 64
    start: int
    max_frames: int | None
    stride: int
    n_frames: int
    resize: str = "crop"  # how a source frame becomes a working frame (video.frame_geometry)
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
        return video.read_frames(  # the probed info, so no pass probes (for webm: decodes) again
            self.info, size=self.size, start=self.start, max_frames=self.max_frames, stride=self.stride,
            resize=self.resize,
        )


def select_clip(path: str | Path, cfg: EditConfig, info: video.VideoInfo | None = None) -> ClipSelection:
    """The frames ``cfg`` selects from ``path`` (``info``: its probe, if already done)."""
    info = info or video.probe(path)
    size, box = video.frame_geometry(info.width, info.height, cfg.size, cfg.resize)
    n = video.selected_count(info, cfg.start, cfg.max_frames, cfg.stride)
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
    return (f"'{selection.path}' should give {selection.n_frames} frames here but only {decoded} decode "
            f"(a truncated or damaged file?); pass --max-frames {decoded} to edit the frames it has"
            if decoded else f"no frame of '{selection.path}' decodes (a truncated or damaged file?)")


@dataclass
class InvertedClip:
    """Handle on a cached inversion; frames are loaded one at a time. ``runtime``: the
    :meth:`Backend.identity` it ran on; ``reconstruction``: :func:`reconstruction_error` of it
    (None for an inversion run without the check, e.g. the benchmark's timed runs)."""

    root: Path
    n_frames: int
    latent_hw: tuple[int, int]
    source_prompt: str
    cache_hit: bool
    runtime: dict[str, str] = field(default_factory=dict)
    reconstruction: dict[str, float | None] | None = None

    def load(self, i: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Frame i: ``x_T`` [1,4,h,w], ``depth`` [1,1,h,w] in [-1,1], ``x_0`` [1,4,h,w] (fp32)."""
        path = self.root / f"frame_{i:06d}.safetensors"
        try:
            return load_file(path, device=str(device))
        except Exception as exc:  # deleted or damaged after the entry was checked
            raise P2VError(f"inversion cache file '{path}' became unreadable during the edit ({_why(exc)}); "
                           "run again to recompute it") from None


def images_to_tensor(frames: list[np.ndarray]) -> torch.Tensor:
    """uint8 [H,W,3] frames -> [B,3,H,W] float in [-1, 1]."""
    arr = np.stack(frames).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def raw_depth(models, backend: Backend, frames: list[np.ndarray], latent_hw: tuple[int, int]) -> torch.Tensor:
    """DPT depth of uint8 frames through ``backend``, at latent size: [B, h, w] fp32, unnormalised."""
    depth = DepthEstimator(models, batch_size=len(frames), run=backend.depth).raw(np.stack(frames))
    assert tuple(depth.shape[-2:]) == tuple(latent_hw)
    return depth


def _save_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write one cache file atomically; refuse non-finite values (they would poison every later edit)."""
    bad = [k for k, v in tensors.items() if not bool(torch.isfinite(v).all())]
    if bad:
        raise P2VError(f"the inversion produced non-finite values (NaN or inf) in {', '.join(bad)} for "
                       f"'{path.name}'; nothing was cached for it (in fp16, try --dtype fp32)")
    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()})
    write_bytes_atomic(path, data, "the inversion cache")


def _why(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


#: Tensors of a finished frame file and of a pass-1 ``encoded_*`` file: name -> shape, with
#: "h" and "w" the latent size.
FRAME_TENSORS = {"x_T": (1, 4, "h", "w"), "depth": (1, 1, "h", "w"), "x_0": (1, 4, "h", "w")}
ENCODED_TENSORS = {"x_0": (1, 4, "h", "w"), "depth_raw": (1, "h", "w")}


def file_problem(path: Path, latent_hw: tuple[int, int], spec: dict[str, tuple] | None = None) -> str | None:
    """What is wrong with one cache file (None: it loads, has ``spec``'s tensors and shapes, all finite)."""
    spec = FRAME_TENSORS if spec is None else spec
    if not path.is_file():
        return "missing"
    try:
        tensors = load_file(path)
    except Exception as exc:
        return f"unreadable ({_why(exc)})"
    h, w = latent_hw
    for name, shape in spec.items():
        want = tuple(h if d == "h" else w if d == "w" else d for d in shape)
        t = tensors.get(name)
        if t is None:
            return f"no {name}"
        if tuple(t.shape) != want:
            return f"{name} has shape {list(t.shape)}, expected {list(want)}"
        if not bool(torch.isfinite(t).all()):
            return f"non-finite values in {name}"
    return None


def _file_record(path: Path) -> dict[str, int | str]:
    data = path.read_bytes()
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def entry_problems(root: Path, n: int, latent_hw: tuple[int, int]) -> tuple[str | None, list[Path]]:
    """Check a cache entry: ``(None, [])`` if complete and intact, else a one-line description of
    the first problem ("missing" when there is no entry) and the frame files that are damaged.

    Checked: ``meta.json`` reads and describes ``n`` frames at ``latent_hw``; every frame file has
    the size and sha256 recorded there (entries without records: loads, shapes, finite values).
    """
    meta_path = root / "meta.json"
    if not meta_path.is_file():
        return "missing", []
    try:
        meta = json.loads(meta_path.read_text())
        records = meta.get("files") or {}
        if int(meta["n_frames"]) != n or list(meta["latent_hw"]) != list(latent_hw):
            return (f"it describes {meta['n_frames']} frames at latent size {meta['latent_hw']}, not {n} at "
                    f"{list(latent_hw)}"), []
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"unreadable meta.json ({_why(exc)})", []
    damaged: list[tuple[Path, str]] = []
    for i in range(n):
        path = root / f"frame_{i:06d}.safetensors"
        record = records.get(path.name)
        if record is None:
            why = file_problem(path, latent_hw)
        elif not path.is_file():
            why = "missing"
        else:
            got = _file_record(path)
            why = (None if got == record else f"{got['bytes']} bytes, expected {record['bytes']}"
                   if got["bytes"] != record["bytes"] else "checksum mismatch")
        if why is not None:
            damaged.append((path, f"frame {i}: {why}"))
    if damaged:
        more = f" (and {len(damaged) - 1} more)" if len(damaged) > 1 else ""
        return damaged[0][1] + more, [p for p, _ in damaged]
    return None, []


def claim_entry(root: Path, n: int, latent_hw: tuple[int, int], progress: Progress) -> FileLock | None:
    """None if ``root`` holds a complete, intact inversion (a cache hit). Otherwise the entry's
    lock, held (waiting while another run fills the entry, whose result may then be a hit), with
    a damaged entry's ``meta.json`` and damaged frame files removed (intact frames are reused)."""
    problem, _ = entry_problems(root, n, latent_hw)
    if problem is None:
        return None
    root.mkdir(parents=True, exist_ok=True)
    lock = FileLock(root / ".lock")
    lock.acquire(on_wait=lambda: progress.log("inversion: waiting for another p2v run that is inverting this clip"))
    problem, damaged = entry_problems(root, n, latent_hw)
    if problem is None:
        lock.release()
        return None
    if problem != "missing":
        progress.log(f"inversion: cache entry {root.name} is damaged ({problem}); recomputing it")
        (root / "meta.json").unlink(missing_ok=True)
        for path in damaged:
            path.unlink(missing_ok=True)
    return lock


@dataclass(frozen=True)
class InversionRuntime:
    """The backend an inversion runs on, described before it exists: a backend in another
    dtype (a copy of the weights) is made only on a cache miss."""

    identity: dict[str, str]  # Backend.identity() of the backend make() returns (+ "weights" if cast)
    make: Callable[[], Backend]

    @classmethod
    def of(cls, backend: Backend) -> InversionRuntime:
        return cls(backend.identity(), lambda: backend)

    def describe(self) -> str:
        return describe_runtime(self.identity)


def describe_runtime(identity: dict[str, str]) -> str:
    """A :meth:`Backend.identity` in words: "torch float32 on cpu", "onnxruntime float16 on cpu, graphs ..."."""
    extra = "".join(f", {k} {v}" for k, v in identity.items() if k not in ("backend", "dtype", "device"))
    return f"{identity.get('backend')} {identity.get('dtype')} on {identity.get('device')}{extra}"


def cache_key(cfg: EditConfig, models, digest: str, source_prompt: str, runtime: dict[str, str],
              selection: ClipSelection | None = None) -> str:
    """Key of an inversion: everything that changes the inverted latents."""
    fields = {
        "version": CACHE_VERSION,
        "frames": digest,  # content of the selected working frames, their size and framing
        "framing": None if selection is None else [list(selection.size), selection.resize, selection.box],
        "model": model_identity(models),
        "runtime": runtime,  # backend, dtype computed in, device (+ graphs / provider)
        "steps": cfg.steps,
        "source_prompt": source_prompt,
        "depth_norm": cfg.depth_norm,
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:24]


def invert_clip(
    cfg: EditConfig,
    selection: ClipSelection,
    models,
    backend: Backend | InversionRuntime,
    source_prompt: str,
    *,
    digest: str | None = None,
    batch: int | None = None,
    progress: Progress | None = None,
    budget: CallBudget | None = None,
    check: bool = True,
) -> InvertedClip:
    """Invert every selected frame (or reuse the cache). ``batch`` frames share a UNet call;
    None: up to :data:`MAX_INVERT_BATCH`, as many as fit in memory (``budget``, measured on the
    first frame's calls). Frames are independent here, so batching does not change the result
    beyond float reassociation. ``backend``: the backend to run on, or an
    :class:`InversionRuntime` that makes it on a cache miss. ``check``: on a miss, also measure
    :func:`reconstruction_error` (``steps`` more batch-1 UNet calls) and record it."""
    progress = progress or NullProgress()
    runtime = backend if isinstance(backend, InversionRuntime) else InversionRuntime.of(backend)
    digest = digest or frames_digest(selection)
    key = cache_key(cfg, models, digest, source_prompt, runtime.identity, selection)
    root = Path(cfg.cache_dir or cache_root()) / "inversions" / key
    meta_path = root / "meta.json"
    n, latent_hw = selection.n_frames, selection.latent_hw
    handle = InvertedClip(root, n, latent_hw, source_prompt, cache_hit=True, runtime=runtime.identity)
    # held while this run fills the entry (released on success, error or interrupt; by the kernel if killed)
    lock = claim_entry(root, n, latent_hw, progress)
    if lock is None:
        handle.reconstruction = json.loads(meta_path.read_text()).get("reconstruction")
        progress.log(f"inversion: cache hit ({n} frame{'' if n == 1 else 's'}, {root})")
        return handle
    try:
        handle.cache_hit = False
        progress.log(f"inversion: {runtime.describe()}")
        backend = runtime.make()
        models = backend.models
        root.mkdir(parents=True, exist_ok=True)
        enc_path = lambda i: root / f"encoded_{i:06d}.safetensors"  # noqa: E731
        inv_path = lambda i: root / f"frame_{i:06d}.safetensors"  # noqa: E731

        # Pass 1: VAE latent and raw depth per frame (kept on disk, not in memory).
        advance = progress.stage("encode + depth", n)
        encode_batch = batch or 1  # the VAE encoder's activations at full resolution are large
        depth_estimator = DepthEstimator(models, batch_size=encode_batch, run=backend.depth)
        lo, hi = float("inf"), float("-inf")
        chunk: list[np.ndarray] = []
        index = 0

        def flush() -> None:
            nonlocal index, lo, hi
            done = all(file_problem(enc_path(i), latent_hw, ENCODED_TENSORS) is None
                       for i in range(index, index + len(chunk)))
            if done:  # resuming: this chunk was encoded by an interrupted run
                d = torch.cat([load_file(str(enc_path(i)))["depth_raw"] for i in range(index, index + len(chunk))])
            else:
                x0 = backend.vae_encode(images_to_tensor(chunk).to(backend.device))
                d = depth_estimator.raw(np.stack(chunk))  # [B,h,w], unnormalised
                for j in range(len(chunk)):
                    _save_atomic({"x_0": x0[j : j + 1], "depth_raw": d[j : j + 1]}, enc_path(index + j))
            lo, hi = min(lo, float(d.min())), max(hi, float(d.max()))
            index += len(chunk)
            advance(len(chunk))
            chunk.clear()

        for frame in selection.frames():
            chunk.append(frame)
            if len(chunk) == encode_batch:
                flush()
        if chunk:
            flush()
        if index != n:  # fewer frames decoded than the container promised
            raise InputError(short_clip_message(selection, index))

        # Pass 2: DDIM inversion, conditional branch only.
        schedule = DDIMSchedule(models.scheduler, cfg.steps)
        cond = encode_prompt(models, source_prompt)
        advance = progress.stage("inversion", n * cfg.steps)
        pending = [i for i in range(n) if file_problem(inv_path(i), latent_hw)]  # resuming: intact frames are kept
        advance(cfg.steps * (n - len(pending)))
        if budget is None:  # the user's --invert-batch is taken as given (still retried smaller on OOM)
            budget = CallBudget(backend.device, measurable=False if batch else None)
        schedule.to(backend.device)
        inputs = lambda ids: _inputs(ids, cfg, backend, lo, hi, enc_path)  # noqa: E731
        # A call's frames run every step together, so measure on the first step before choosing
        # how many: one call of 1 frame and one of 2, results discarded (3 of n x steps frame-steps).
        budget.calibrate(INVERT_KIND, lambda k: _first_step(inputs(pending[:k]), backend, schedule, cond, cfg.steps),
                         len(pending))
        budget.run_in_calls(INVERT_KIND, pending, lambda ids: _invert_frames(
            list(ids), inputs(list(ids)), backend, schedule, cond, cfg.steps, inv_path, advance),
            most=batch or MAX_INVERT_BATCH)
        if check:
            handle.reconstruction = reconstruction_error(backend, schedule, cond, handle.load(0, backend.device))
            progress.log(f"inversion: {describe_reconstruction(handle.reconstruction)}")
        meta = {"n_frames": n, "latent_hw": list(latent_hw), "source_prompt": source_prompt, "steps": cfg.steps,
                "model": model_identity(models), "size": list(selection.size), "resize": selection.resize,
                "box": None if selection.box is None else list(selection.box), "depth_norm": cfg.depth_norm,
                "runtime": runtime.identity, "reconstruction": handle.reconstruction}
        meta["files"] = {inv_path(i).name: _file_record(inv_path(i)) for i in range(n)}
        write_bytes_atomic(meta_path, json.dumps(meta, indent=2).encode(), "the inversion cache")
        for i in range(n):
            enc_path(i).unlink(missing_ok=True)
    finally:
        lock.release()
    return handle


#: Most frames per inversion call when ``--invert-batch`` is not given.
MAX_INVERT_BATCH = 16
INVERT_KIND = ("inversion", False)


def _inputs(ids: list[int], cfg: EditConfig, backend: Backend, lo: float, hi: float,
            enc_path) -> tuple[torch.Tensor, torch.Tensor]:
    """x_0 [B,4,h,w] and normalised depth [B,1,h,w] of frames ``ids``, on the backend's device."""
    encs = [load_file(str(enc_path(i))) for i in ids]
    x = torch.cat([e["x_0"] for e in encs]).to(backend.device)
    raw = torch.cat([e["depth_raw"] for e in encs])
    depth = normalize_with(raw, lo, hi) if cfg.depth_norm == "clip" else normalize_per_frame(raw)
    return x, depth.unsqueeze(1).to(backend.device)


def _eps(x: torch.Tensor, depth: torch.Tensor, s: int, backend: Backend, schedule: DDIMSchedule,
         cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The UNet's eps at step ``s`` for every frame of ``x`` (one call), and the step indices."""
    idx = schedule.index([s] * x.shape[0], backend.device)  # on the device: no copy from the host
    eps, _ = backend.unet(torch.cat([x, depth], dim=1), schedule.timesteps_at(idx), cond.expand(x.shape[0], -1, -1))
    return eps, idx


@torch.no_grad()
def _first_step(inputs: tuple[torch.Tensor, torch.Tensor], backend: Backend, schedule: DDIMSchedule,
                cond: torch.Tensor, steps: int) -> None:
    """The inversion's first UNet call for these frames, its result discarded (to measure it)."""
    _eps(*inputs, steps - 1, backend, schedule, cond)


def _invert_frames(ids: list[int], inputs: tuple[torch.Tensor, torch.Tensor], backend: Backend,
                   schedule: DDIMSchedule, cond: torch.Tensor, steps: int, inv_path, advance) -> None:
    """DDIM-invert frames ``ids`` together through every step and save each one."""
    x, depth = inputs
    x_0 = x.clone()
    with torch.no_grad():
        for s in reversed(range(steps)):  # from the cleanest step to the noisiest
            eps, idx = _eps(x, depth, s, backend, schedule, cond)
            x = schedule.invert_step(x, eps, idx)
            advance(len(ids))
    for j, i in enumerate(ids):
        _save_atomic({"x_T": x[j : j + 1], "depth": depth[j : j + 1], "x_0": x_0[j : j + 1]}, inv_path(i))


@torch.no_grad()
def reconstruction_error(backend: Backend, schedule: DDIMSchedule, cond: torch.Tensor,
                         frame: dict[str, torch.Tensor]) -> dict[str, float | None]:
    """How well an inversion inverts: frame 1 regenerated from its x_T by the DDIM sampling
    steps with the source prompt at guidance 1 (conditional branch only, the process the
    inversion ran backwards), on the backend and in the precision the inversion used, against
    the x_0 it was inverted from. Costs ``steps`` batch-1 UNet calls and one VAE decode of 2
    latents: 1/n of the inversion of n frames, so the direct measure is affordable and no
    proxy is needed.

    ``frame``: :meth:`InvertedClip.load` of frame 1. Returns ``latent_rel_rms``:
    RMS(x0_rec - x_0) / RMS(x_0) of the latents; ``psnr_db``: PSNR of the decoded regeneration
    against the decoded x_0 (images in [-1, 1], peak-to-peak 2; the VAE's own round trip is
    left out; None if they are equal).
    """
    device = backend.device
    x, depth, x_0 = (frame[k].to(device) for k in ("x_T", "depth", "x_0"))
    for s in range(schedule.steps):
        eps, idx = _eps(x, depth, s, backend, schedule, cond)
        x, _ = schedule.step(x, eps, idx)
    rel = float((x - x_0).pow(2).mean().sqrt() / x_0.pow(2).mean().sqrt().clamp_min(1e-12))
    images = backend.vae_decode(torch.cat([x, x_0])).clamp(-1, 1)
    mse = float((images[0] - images[1]).pow(2).mean())
    return {"latent_rel_rms": rel, "psnr_db": 10 * math.log10(4.0 / mse) if mse > 0 else None}


def describe_reconstruction(r: dict[str, float | None] | None) -> str:
    """One line for logs and ``p2v invert``."""
    if not r:
        return "reconstruction error not measured"
    psnr = r.get("psnr_db")
    db = "identical images" if psnr is None else f"decoded PSNR {psnr:.1f} dB"
    return f"frame 1 regenerated from x_T: latent error {100 * float(r['latent_rel_rms'] or 0):.2f} % RMS, {db}"
