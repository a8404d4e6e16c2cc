"""DDIM inversion of every frame to x_T (paper Alg. 1 line 1), cached on disk.

Per frame: VAE mean latent x scaling factor (x_0), DPT depth at latent size, then ``steps``
inversion steps with the source prompt at guidance 1 (conditional branch only: batch = frames,
never an unconditional pass), depth-conditioned.

The result is cached (:mod:`p2v_fast.method.inversion_cache`: the key, the entry's files, its lock
and ``meta.json``), so every later edit of the same clip reuses it; the full edit after a preview
reuses the preview's frame 1 (and its reconstruction error).

Precision: the inversion runs in ``cfg.invert_dtype`` (fp32 by default): on the edit's backend
when that computes in it, else on PyTorch in it (:func:`inversion_runtime`; a graph backend with
fp16 graphs inverts on PyTorch in fp32, with the same weights). Its quality is measured once,
on the miss that computes it: frame 1 regenerated from its x_T (:func:`reconstruction_error`),
recorded in ``meta.json`` and reported by ``p2v invert``, ``p2v edit`` and ``p2v bench``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from p2v_fast.config import MAX_INVERT_BATCH, EditConfig
from p2v_fast.errors import InputError
from p2v_fast.files import cache_root
from p2v_fast.media.clip_selection import ClipSelection, frames_digest, short_clip_message
from p2v_fast.method.ddim import DDIMSchedule
from p2v_fast.method.inversion_cache import (
    ENCODED_TENSORS,
    InvertedClip,
    cache_key,
    claim_entry,
    encoded_file,
    file_problem,
    frame_file,
    record_entry,
    recorded_reconstruction,
    reuse_preview_frame,
    save_frame_file,
)
from p2v_fast.nets.backends import Backend
from p2v_fast.nets.memory import CallBudget
from p2v_fast.nets.runtime import InversionRuntime
from p2v_fast.progress import NullProgress, Progress
from p2v_fast.text import plural
from p2v_fast.weights.depth import DepthEstimator, normalize_per_frame, normalize_with
from p2v_fast.weights.prompts import encode_prompt


def images_to_tensor(frames: list[np.ndarray]) -> torch.Tensor:
    """uint8 [H,W,3] frames -> [B,3,H,W] float in [-1, 1]."""
    arr = np.stack(frames).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def raw_depth(models, backend: Backend, frames: list[np.ndarray], latent_hw: tuple[int, int]) -> torch.Tensor:
    """DPT depth of uint8 frames through ``backend``, at latent size: [B, h, w] fp32, unnormalised."""
    depth = DepthEstimator(models, batch_size=len(frames), run=backend.depth).raw(np.stack(frames))
    assert tuple(depth.shape[-2:]) == tuple(latent_hw)
    return depth


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
    """Invert every selected frame (or reuse the cache). ``batch`` frames share a UNet call; None: up to
    :data:`MAX_INVERT_BATCH`, as many as fit in memory (``budget``, measured on the first frame's calls).
    Frames are independent here, so batching does not change the result beyond float reassociation.
    ``backend``: the backend to run on, or an :class:`InversionRuntime` that makes it on a cache miss.
    ``check``: on a miss, also measure :func:`reconstruction_error` (``steps`` more batch-1 UNet calls)."""
    progress = progress or NullProgress()
    runtime = backend if isinstance(backend, InversionRuntime) else InversionRuntime.of(backend)
    # 1. Hit: the entry of everything that changes the inverted latents, used as it is when whole
    key = cache_key(cfg, models, digest or frames_digest(selection), source_prompt, runtime.identity, selection)
    root = Path(cfg.cache_dir or cache_root()) / "inversions" / key
    n, latent_hw = selection.n_frames, selection.latent_hw
    handle = InvertedClip(root, n, latent_hw, source_prompt, cache_hit=True, runtime=runtime.identity)
    # 2. Lock: held while this run fills the entry (released on success, error or interrupt; by the kernel if killed)
    lock = claim_entry(root, n, latent_hw, progress)
    if lock is None:
        handle.reconstruction = recorded_reconstruction(root)
        progress.log(f"inversion: cache hit ({plural(n, 'frame')}, {root})")
        return handle
    try:
        handle.cache_hit = False
        progress.log(f"inversion: {runtime.describe()}")
        # 3. Reuse: frame 1 from a preview's entry of this clip (its reconstruction error with it)
        reuse_preview_frame(cfg, models, selection, handle, progress)
        backend = runtime.make()
        # 4. Encode and depth: each frame's VAE latent and raw depth, kept on disk (not in memory)
        lo, hi = _encode_frames(selection, backend, root, batch, progress)
        # 5. Invert: DDIM, conditional branch only, frames batched as memory allows (all but a reused frame 1)
        schedule, cond = _invert_pending(cfg, backend, root, n, latent_hw, (lo, hi), source_prompt,
                                         batch, budget, progress)
        # 6. Check: frame 1 regenerated from its x_T, unless a reused preview's was (each report shows it once)
        if check and handle.reconstruction is None:
            handle.reconstruction = reconstruction_error(backend, schedule, cond, handle.load(0, backend.device))
        # 7. Record: meta.json last, so the entry is whole only once every frame is
        record_entry(handle, cfg, backend.models, selection)
    finally:
        lock.release()
    return handle


INVERT_KIND = ("inversion", False)


def _chunks(frames: Iterator[np.ndarray], size: int) -> Iterator[list[np.ndarray]]:
    """``frames`` in lists of ``size`` (the last one shorter), read lazily."""
    chunk: list[np.ndarray] = []
    for frame in frames:
        chunk.append(frame)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _encode_frames(selection: ClipSelection, backend: Backend, root: Path, batch: int | None,
                   progress: Progress) -> tuple[float, float]:
    """Pass 1: each frame's VAE latent and raw depth into its ``encoded_*`` file; returns the
    clip's raw depth range. Chunks an interrupted run encoded are read back, not recomputed."""
    n, latent_hw = selection.n_frames, selection.latent_hw
    root.mkdir(parents=True, exist_ok=True)
    advance = progress.stage("encode + depth", n)
    size = batch or 1  # the VAE encoder's activations at full resolution are large
    depth_estimator = DepthEstimator(backend.models, batch_size=size, run=backend.depth)
    lo, hi, index = float("inf"), float("-inf"), 0
    for chunk in _chunks(selection.frames(), size):
        ids = range(index, index + len(chunk))
        if all(file_problem(encoded_file(root, i), latent_hw, ENCODED_TENSORS) is None for i in ids):
            d = torch.cat([load_file(str(encoded_file(root, i)))["depth_raw"] for i in ids])  # resuming
        else:
            x0 = backend.vae_encode(images_to_tensor(chunk).to(backend.device))
            d = depth_estimator.raw(np.stack(chunk))  # [B,h,w], unnormalised
            for j, i in enumerate(ids):
                save_frame_file({"x_0": x0[j : j + 1], "depth_raw": d[j : j + 1]}, encoded_file(root, i))
        lo, hi = min(lo, float(d.min())), max(hi, float(d.max()))
        index += len(chunk)
        advance(len(chunk))
    if index != n:  # fewer frames decoded than the container promised
        raise InputError(short_clip_message(selection, index))
    return lo, hi


def _invert_pending(cfg: EditConfig, backend: Backend, root: Path, n: int, latent_hw: tuple[int, int],
                    depth_range: tuple[float, float], source_prompt: str, batch: int | None,
                    budget: CallBudget | None, progress: Progress) -> tuple[DDIMSchedule, torch.Tensor]:
    """Pass 2: DDIM-invert the frames without an intact file (resuming: intact frames are kept),
    ``batch`` or as many as ``budget`` lets share a call; returns the schedule and the source
    prompt's embedding, for the check."""
    schedule = DDIMSchedule(backend.models.scheduler, cfg.steps, cfg.timestep_grid)
    cond = encode_prompt(backend.models, source_prompt)
    advance = progress.stage("inversion", n * cfg.steps)
    pending = [i for i in range(n) if file_problem(frame_file(root, i), latent_hw)]
    advance(cfg.steps * (n - len(pending)))
    if budget is None:  # the user's --invert-batch is taken as given (still retried smaller on OOM)
        budget = CallBudget(backend.device, measurable=False if batch else None, max_memory=cfg.max_memory)
    schedule.to(backend.device)
    inputs = lambda ids: _inputs(ids, cfg, backend, *depth_range, root)  # noqa: E731
    # A call's frames run every step together, so measure on the first step before choosing
    # how many: one call of 1 frame and one of 2, results discarded (3 of n x steps frame-steps).
    budget.calibrate(INVERT_KIND, lambda k: _first_step(inputs(pending[:k]), backend, schedule, cond, cfg.steps),
                     len(pending))
    budget.run_in_calls(INVERT_KIND, pending, lambda ids: _invert_frames(
        list(ids), inputs(list(ids)), backend, schedule, cond, cfg.steps, root, advance),
        most=batch or MAX_INVERT_BATCH)
    return schedule, cond


def _inputs(ids: list[int], cfg: EditConfig, backend: Backend, lo: float, hi: float,
            root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """x_0 [B,4,h,w] and normalised depth [B,1,h,w] of frames ``ids``, on the backend's device."""
    encs = [load_file(str(encoded_file(root, i))) for i in ids]
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
                   schedule: DDIMSchedule, cond: torch.Tensor, steps: int, root: Path, advance) -> None:
    """DDIM-invert frames ``ids`` together through every step and save each one."""
    x, depth = inputs
    x_0 = x.clone()
    with torch.no_grad():
        for s in reversed(range(steps)):  # from the cleanest step to the noisiest
            eps, idx = _eps(x, depth, s, backend, schedule, cond)
            x = schedule.invert_step(x, eps, idx)
            advance(len(ids))
    for j, i in enumerate(ids):
        save_frame_file({"x_T": x[j : j + 1], "depth": depth[j : j + 1], "x_0": x_0[j : j + 1]}, frame_file(root, i))


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


#: The reconstruction error (RMS, relative to the latent) above which a trained model's inversion
#: is flagged: the shipped mini model's is 3-4 % at 50 steps (64x64 and 512x512), as a trained
#: SD2's is a few %; a random-weight model's is hundreds of % by design.
RECONSTRUCTION_WARN = 0.20


def describe_reconstruction(r: dict[str, float | None] | None, model: str | None = None) -> str:
    """One line for a command's report: what the number is and, given the ``model`` (a source,
    see :func:`~p2v_fast.weights.models.random_weights`), whether it is as expected."""
    from p2v_fast.weights.models import random_weights

    if not r:
        return "reconstruction error not measured"
    psnr = r.get("psnr_db")
    db = "identical images" if psnr is None else f"PSNR {psnr:.1f} dB decoded"
    rel = float(r["latent_rel_rms"] or 0)
    text = (f"frame 1 regenerated from its inverted noise is {100 * rel:.2f} % RMS off its latent ({db}; "
            "0 % would be an exact inversion)")
    if model is None:
        return text
    if random_weights(model):
        return text + ": expected with random weights (a trained model's is a few %)"
    if rel > RECONSTRUCTION_WARN:
        return (text + f": warning: high for a trained model (under {100 * RECONSTRUCTION_WARN:.0f} % "
                "is usual); more --steps usually lower it")
    return text + ": as expected for a trained model"
