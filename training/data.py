"""Training data for ``mini``: single frames of random scenes, rendered once and cached as npz.

Training seeds are ``TRAIN_SEED0 + i``; every seed below ``TRAIN_SEED0`` is held out (tests,
evaluation, the demo). One frame per scene, at a random time of a 16-frame clip, so camera and
object positions vary as in a clip.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from p2v_fast.media import scenes as sc

TRAIN_SEED0 = 1_000_000
CLIP_FRAMES = 16


def render_sample(seed: int, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, str]:
    """(uint8 image [H,W,3], float32 inverse depth 1/z [H,W], caption) of one training seed."""
    rng = np.random.default_rng(seed)
    scene = sc.random_scene(rng, CLIP_FRAMES)
    t = float(rng.uniform(0, CLIP_FRAMES - 1))
    # one 2x2-supersampled cast: the image and the inverse depth are both box-filtered (no
    # separate pixel-centre cast: the depth input is resized to 8x8 anyway)
    w, h = size
    rgb, depth, _ = sc._cast(scene, t, size, 2)
    img = np.clip(np.round(rgb.reshape(h, 2, w, 2, 3).mean(axis=(1, 3)) * 255.0), 0, 255).astype(np.uint8)
    inv = (1.0 / depth).reshape(h, 2, w, 2).mean(axis=(1, 3)).astype(np.float32)
    return img, inv, sc.caption_of(scene)


def depth_condition(inv_depth: np.ndarray, latent_hw: tuple[int, int]):
    """Inverse depth [B,H,W] -> the UNet's depth input [B,1,h,w], as inference computes it from
    DPT (p2v_fast.weights.depth): bicubic resize to the latent size, per-frame min-max to [-1, 1]."""
    import torch

    d = torch.as_tensor(inv_depth, dtype=torch.float32)[:, None]
    d = torch.nn.functional.interpolate(d, size=latent_hw, mode="bicubic", align_corners=False)[:, 0]
    lo = d.amin(dim=(-2, -1), keepdim=True)
    hi = d.amax(dim=(-2, -1), keepdim=True)
    span = (hi - lo).clamp_min(1e-8)
    return (2.0 * (d - lo) / span - 1.0)[:, None]


def build_dataset(path: Path, n: int, size: tuple[int, int] = (64, 64), seed0: int = TRAIN_SEED0,
                  log=print) -> dict[str, np.ndarray]:
    """Render (or load from ``path``) ``n`` training samples: images, inverse depth, captions."""
    path = Path(path)
    if path.is_file():
        with np.load(path) as z:
            data = {k: z[k] for k in z.files}
        if len(data["images"]) >= n:
            return {k: v[:n] for k, v in data.items()}
    w, h = size
    images = np.empty((n, h, w, 3), np.uint8)
    inv = np.empty((n, h, w), np.float16)
    caps: list[str] = []
    t0 = time.time()
    for i in range(n):
        img, d, cap = render_sample(seed0 + i, size)
        images[i], inv[i] = img, d
        caps.append(cap)
        if (i + 1) % 2000 == 0:
            log(f"data: {i + 1}/{n} rendered, {time.time() - t0:.0f} s")
    data = {"images": images, "inv_depth": inv, "captions": np.array(caps), "seeds": seed0 + np.arange(n)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **data)
    tmp.replace(path)
    log(f"data: {n} samples in {time.time() - t0:.0f} s -> {path}")
    return data
