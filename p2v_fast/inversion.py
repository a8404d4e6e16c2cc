"""DDIM inversion of every frame to x_T (paper Alg. 1 line 1), cached on disk.

Per frame: VAE mean latent x scaling factor (x_0), DPT depth at latent size, then ``steps``
inversion steps with the source prompt at guidance 1 (conditional branch only: batch = frames,
never an unconditional pass), depth-conditioned.

The cache lives under ``<cache>/inversions/<key>/``, one safetensors file per frame (written
atomically, so an interrupted run resumes where it stopped) and ``meta.json`` written last. The
key covers everything the result depends on: the frames' content (after resizing and frame
selection), the model, the working size, steps, source prompt, depth normalisation and dtype.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from p2v_fast import video
from p2v_fast.backends import Backend
from p2v_fast.config import EditConfig
from p2v_fast.ddim import DDIMSchedule
from p2v_fast.depth import DepthEstimator, normalize_per_frame, normalize_with
from p2v_fast.memory import CallBudget
from p2v_fast.models import model_identity
from p2v_fast.paths import cache_root
from p2v_fast.progress import NullProgress, Progress
from p2v_fast.prompts import encode_prompt

CACHE_VERSION = 1


@dataclass(frozen=True)
class ClipSelection:
    """Which frames of which video, at which working size."""

    path: Path
    info: video.VideoInfo
    size: tuple[int, int]  # (W, H), multiples of 64
    start: int
    max_frames: int | None
    stride: int
    n_frames: int

    @property
    def fps(self) -> float:
        """Output frame rate: the source rate, divided by the stride (duration is kept)."""
        return self.info.fps / self.stride

    @property
    def latent_hw(self) -> tuple[int, int]:
        return self.size[1] // 8, self.size[0] // 8

    def frames(self) -> Iterator[np.ndarray]:
        """Stream the selected frames, uint8 [H, W, 3]."""
        return video.read_frames(  # the probed info, so no pass probes (for webm: decodes) again
            self.info, size=self.size, start=self.start, max_frames=self.max_frames, stride=self.stride
        )


def select_clip(path: str | Path, cfg: EditConfig, info: video.VideoInfo | None = None) -> ClipSelection:
    """The frames ``cfg`` selects from ``path`` (``info``: its probe, if already done)."""
    info = info or video.probe(path)
    size = video.working_size(info.width, info.height, cfg.size)
    n = video.selected_count(info, cfg.start, cfg.max_frames, cfg.stride)
    return ClipSelection(Path(path), info, size, cfg.start, cfg.max_frames, cfg.stride, n)


def frames_digest(selection: ClipSelection) -> str:
    """sha256 of the selected, resized frames (one decode pass, nothing kept)."""
    h = hashlib.sha256()
    for frame in selection.frames():
        h.update(np.ascontiguousarray(frame).tobytes())
    h.update(repr(selection.size).encode())
    return h.hexdigest()


@dataclass
class InvertedClip:
    """Handle on a cached inversion; frames are loaded one at a time."""

    root: Path
    n_frames: int
    latent_hw: tuple[int, int]
    source_prompt: str
    cache_hit: bool

    def load(self, i: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Frame i: ``x_T`` [1,4,h,w], ``depth`` [1,1,h,w] in [-1,1], ``x_0`` [1,4,h,w] (fp32)."""
        return load_file(self.root / f"frame_{i:06d}.safetensors", device=str(device))


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
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def cache_key(cfg: EditConfig, models, digest: str, source_prompt: str) -> str:
    fields = {
        "version": CACHE_VERSION,
        "frames": digest,
        "model": model_identity(models),
        "dtype": str(models.dtype),
        "steps": cfg.steps,
        "source_prompt": source_prompt,
        "depth_norm": cfg.depth_norm,
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:24]


def invert_clip(
    cfg: EditConfig,
    selection: ClipSelection,
    models,
    backend: Backend,
    source_prompt: str,
    *,
    digest: str | None = None,
    batch: int | None = None,
    progress: Progress | None = None,
    budget: CallBudget | None = None,
) -> InvertedClip:
    """Invert every selected frame (or reuse the cache). ``batch`` frames share a UNet call;
    None: up to :data:`MAX_INVERT_BATCH`, as many as fit in memory (``budget``, measured on the
    first frame's calls). Frames are independent here, so batching does not change the result
    beyond float reassociation."""
    progress = progress or NullProgress()
    digest = digest or frames_digest(selection)
    key = cache_key(cfg, models, digest, source_prompt)
    root = Path(cfg.cache_dir or cache_root()) / "inversions" / key
    meta_path = root / "meta.json"
    n, latent_hw = selection.n_frames, selection.latent_hw
    handle = InvertedClip(root, n, latent_hw, source_prompt, cache_hit=True)
    if meta_path.exists():
        progress.log(f"inversion: cache hit ({n} frames, {root})")
        return handle
    handle.cache_hit = False
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
        done = all(enc_path(i).exists() for i in range(index, index + len(chunk)))
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

    # Pass 2: DDIM inversion, conditional branch only.
    schedule = DDIMSchedule(models.scheduler, cfg.steps)
    cond = encode_prompt(models, source_prompt)
    advance = progress.stage("inversion", n * cfg.steps)
    pending = [i for i in range(n) if not inv_path(i).exists()]  # resuming: finished frames are kept
    advance(cfg.steps * (n - len(pending)))
    if budget is None:  # the user's --invert-batch is taken as given (still retried smaller on OOM)
        budget = CallBudget(backend.device, measurable=False if batch else None)
    budget.run_in_calls(INVERT_KIND, pending, lambda ids: _invert_frames(
        list(ids), cfg, backend, schedule, cond, lo, hi, enc_path, inv_path, budget, advance),
        most=batch or MAX_INVERT_BATCH)
    meta = {"n_frames": n, "latent_hw": list(latent_hw), "source_prompt": source_prompt, "steps": cfg.steps,
            "model": model_identity(models), "size": list(selection.size), "depth_norm": cfg.depth_norm}
    tmp = meta_path.with_name(".meta.json.tmp")
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, meta_path)
    for i in range(n):
        enc_path(i).unlink(missing_ok=True)
    return handle


#: Most frames per inversion call when ``--invert-batch`` is not given.
MAX_INVERT_BATCH = 16
INVERT_KIND = ("inversion", False)


def _invert_frames(ids: list[int], cfg: EditConfig, backend: Backend, schedule: DDIMSchedule, cond: torch.Tensor,
                   lo: float, hi: float, enc_path, inv_path, budget: CallBudget, advance) -> None:
    """DDIM-invert frames ``ids`` together through every step and save each one."""
    encs = [load_file(str(enc_path(i))) for i in ids]
    x = torch.cat([e["x_0"] for e in encs]).to(backend.device)
    raw = torch.cat([e["depth_raw"] for e in encs])
    depth = normalize_with(raw, lo, hi) if cfg.depth_norm == "clip" else normalize_per_frame(raw)
    depth = depth.unsqueeze(1).to(backend.device)  # [B,1,h,w]
    ehs = cond.expand(len(ids), -1, -1)
    x_0 = x.clone()
    with torch.no_grad():
        for s in reversed(range(cfg.steps)):  # from the cleanest step to the noisiest
            idx = torch.full((len(ids),), s, dtype=torch.long)
            t = schedule.timesteps[idx].to(backend.device)
            with budget.measure(INVERT_KIND, len(ids), backend.device):
                eps, _ = backend.unet(torch.cat([x, depth], dim=1), t, ehs)
            x = schedule.invert_step(x, eps, idx)
            advance(len(ids))
    for j, i in enumerate(ids):
        _save_atomic({"x_T": x[j : j + 1], "depth": depth[j : j + 1], "x_0": x_0[j : j + 1]}, inv_path(i))
