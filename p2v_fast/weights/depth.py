"""Depth conditioning: DPT-Hybrid (MiDaS) on RGB frames, at latent resolution, in [-1, 1].

This follows ``StableDiffusionDepth2ImgPipeline.prepare_depth_map``: the model's
``feature_extractor`` preprocesses the frames, DPT predicts relative inverse depth
(larger = nearer), and the prediction is resized with bicubic interpolation to the latent
size ``(H / 8, W / 8)``. Unlike the pipeline, DPT always runs in fp32 (no autocast: its batch
norms), and normalisation is a separate step so a caller can choose per frame (the paper, as
the pipeline does) or per clip (one range for the whole video, which does not flicker).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from p2v_fast.errors import InputError
from p2v_fast.weights.models import Models, first_call


class DepthEstimator:
    """Runs the model set's depth estimator on uint8 RGB frames."""

    def __init__(
        self, models: Models, batch_size: int = 8, run: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> None:
        """``run`` maps DPT pixel values [B,3,S,S] to predicted depth [B,S',S'] (a backend's
        ``depth``); default: the model's own PyTorch module."""
        self.models = models
        self.batch_size = max(1, int(batch_size))
        self.run = run or self._own

    def _own(self, pixel_values: torch.Tensor) -> torch.Tensor:
        with first_call(self.models, "depth_estimator"):
            return self.models.depth_estimator(pixel_values=pixel_values).predicted_depth

    @torch.no_grad()
    def raw(self, frames: np.ndarray) -> torch.Tensor:
        """Unnormalised depth at latent resolution.

        ``frames``: uint8 RGB, ``[B, H, W, 3]`` or one frame ``[H, W, 3]``; H and W are
        multiples of the VAE scale factor (8). Returns float32 ``[B, H/8, W/8]`` on
        ``models.device``: DPT's relative inverse depth (arbitrary scale; larger = nearer),
        bicubically resized, not normalised.
        """
        arr = np.asarray(frames)
        if arr.ndim == 3:
            arr = arr[None]
        if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8 or arr.shape[0] == 0:
            raise InputError(
                f"depth expects uint8 RGB frames [B,H,W,3] or [H,W,3], got {arr.dtype} {tuple(np.shape(frames))}"
            )
        f = self.models.vae_scale_factor
        _, height, width, _ = arr.shape
        if height % f or width % f:
            raise InputError(f"frame size {width}x{height} is not a multiple of {f}")
        size = (height // f, width // f)
        device = self.models.device
        out = []
        for start in range(0, arr.shape[0], self.batch_size):
            chunk = list(arr[start : start + self.batch_size])
            with first_call(self.models, "feature_extractor"):
                pixel_values = self.models.feature_extractor(images=chunk, return_tensors="pt")["pixel_values"]
            pixel_values = pixel_values.to(device=device, dtype=torch.float32)
            pred = self.run(pixel_values).float()
            pred = torch.nn.functional.interpolate(pred.unsqueeze(1), size=size, mode="bicubic", align_corners=False)
            out.append(pred[:, 0])
        return torch.cat(out, dim=0)


def clip_range(depth: torch.Tensor) -> tuple[float, float]:
    """``(min, max)`` of a whole clip's raw depth, for :func:`normalize_with`."""
    return float(depth.min()), float(depth.max())


def normalize_per_frame(depth: torch.Tensor) -> torch.Tensor:
    """Min-max normalise each frame to [-1, 1], as the SD2-depth pipeline does.

    ``depth``: ``[B, h, w]`` (any float dtype). Returns the same shape and dtype, each frame's
    minimum at -1 and maximum at +1. A flat frame (max == min) maps to 0 everywhere instead
    of the pipeline's NaN.
    """
    d = depth.float()
    lo = d.amin(dim=(-2, -1), keepdim=True)
    hi = d.amax(dim=(-2, -1), keepdim=True)
    span = hi - lo
    flat = span <= 0
    out = 2.0 * (d - lo) / torch.where(flat, torch.ones_like(span), span) - 1.0
    out = torch.where(flat, torch.zeros_like(out), out)
    return out.to(depth.dtype)


def normalize_with(depth: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Normalise with one fixed range (per clip): ``lo`` -> -1, ``hi`` -> +1, clamped.

    ``depth``: ``[B, h, w]`` (or any shape). Returns the same shape and dtype, values in
    [-1, 1]. If ``hi <= lo`` (a flat clip) every value maps to 0.
    """
    d = depth.float()
    if not hi > lo:
        return torch.zeros_like(depth)
    out = (2.0 * (d - lo) / (hi - lo) - 1.0).clamp_(-1.0, 1.0)
    return out.to(depth.dtype)
