"""Full-size model architectures with random weights, built from configs in code.

Speed does not depend on weight values, so ``p2v bench --arch sd2-depth`` measures what the real
``stabilityai/stable-diffusion-2-depth`` costs without downloading it: every component has the
published shape (UNet 866 M parameters, VAE 84 M, OpenCLIP ViT-H text encoder 340 M, DPT-Hybrid
MiDaS 123 M; the configs are :mod:`p2v_fast.weights.sd2_depth`'s). The tokenizer is the offline
byte-level CLIP tokenizer of :mod:`p2v_fast.weights.tiny` (token ids differ from the real
vocabulary; the text encoder's cost does not).

Construction is cheap: parameters are created on the meta device (buffers stay real, so
position ids and batch-norm statistics are valid) and then materialised once, directly in the
requested dtype, within PyTorch's default bounds: values of U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for
weight matrices and convolution kernels (tiled from one random pool), ones for norm scales, zeros
for biases. That keeps activations
in a sane range (no inf/NaN in fp16 from a careless init) at a fraction of the time of running
every module's own initialiser (~12 s for the UNet alone on 2 CPU cores).
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import torch
from torch import nn

from p2v_fast.weights.sd2_depth import DPT_HYBRID_MIDAS, DPT_IMAGE_SIZE, OPENCLIP_VIT_H_TEXT, SD2_DEPTH_UNET, SD_VAE

ARCHS = ("sd2-depth",)


def _pool(device: torch.device, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """U(-1, 1) values to tile weights from, twice over (so a window of ``_POOL`` values may
    start anywhere in the first copy): drawing 1.4 G fresh random numbers costs ~20 s on 2 CPU
    cores, copying a pool costs ~0.5 s. Its length is prime so rows and kernels do not line up
    with its period."""
    gen = torch.Generator().manual_seed(seed)
    pool = (torch.rand(_POOL, generator=gen) * 2 - 1).to(device=device, dtype=dtype)
    return torch.cat([pool, pool])


_POOL = 1_000_003
_STRIDE = 7_919  # < _POOL, which is prime: the first _POOL tensors all start at different offsets


def _fill(data: torch.Tensor, pool: torch.Tensor, bound: float, offset: int) -> None:
    """Tile ``data`` from ``pool`` starting at ``offset``. Each tensor gets its own offset, so no
    two weights are equal: an exporter that deduplicates equal initializers (ONNX export does)
    would otherwise shrink the model and flatter the speed of every graph backend."""
    flat = data.view(-1)
    for start in range(0, flat.numel(), _POOL):
        chunk = flat[start : start + _POOL]
        chunk.copy_(pool[offset : offset + chunk.numel()])
    flat.mul_(bound)


def materialize(module: nn.Module, device: torch.device, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """Give every meta parameter of ``module`` real storage on ``device`` in ``dtype``
    (integer parameters keep their dtype), filled within PyTorch's default-init bounds; move
    buffers to ``device`` (floating ones to ``dtype``). Returns ``module`` in eval mode with
    gradients off."""
    pool = _pool(device, dtype, seed)
    filled = 0
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is None or not p.is_meta:
                continue
            data = torch.empty(p.shape, device=device, dtype=dtype if p.is_floating_point() else p.dtype)
            if p.ndim >= 2:  # weight matrix / conv kernel / embedding: [out, in, ...]
                _fill(data, pool, 1.0 / math.sqrt(max(1, p[0].numel())), (filled * _STRIDE) % _POOL)
                filled += 1
            elif name.endswith("weight"):  # norm scale
                data.fill_(1.0)
            else:  # bias
                data.zero_()
            sub._parameters[name] = nn.Parameter(data, requires_grad=False)
        for name, b in list(sub._buffers.items()):
            if b is not None:
                sub._buffers[name] = b.to(device=device, dtype=dtype if b.is_floating_point() else b.dtype)
    return module.eval().requires_grad_(False)


def _empty(build):
    """``build()`` with parameters on the meta device and buffers real."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return build()


def build_sd2_depth(device: torch.device, dtype: torch.dtype, seed: int = 0):
    """The SD2-depth model set at full size with random weights, as a :class:`p2v_fast.weights.models.Models`.

    VAE, UNet and text encoder in ``dtype``; the depth estimator in fp32 (as
    :func:`p2v_fast.weights.models.load_models` keeps it: its batch norms).
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, DPTConfig, DPTForDepthEstimation

    from p2v_fast.weights.hub import quiet_loading
    from p2v_fast.weights.models import Models
    from p2v_fast.weights.sd2_depth import SCHEDULER_CONFIG
    from p2v_fast.weights.tiny import build_clip_tokenizer, dpt_image_processor

    with quiet_loading(), tempfile.TemporaryDirectory(prefix="p2v-arch-tok-") as work:
        tokenizer = build_clip_tokenizer(Path(work))
        unet = materialize(_empty(lambda: UNet2DConditionModel(**SD2_DEPTH_UNET)), device, dtype, seed)
        vae = materialize(_empty(lambda: AutoencoderKL(**SD_VAE)), device, dtype, seed + 1)
        text_config = CLIPTextConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **OPENCLIP_VIT_H_TEXT,
        )
        text_encoder = materialize(_empty(lambda: CLIPTextModel(text_config)), device, dtype, seed + 2)
        depth = materialize(_empty(lambda: DPTForDepthEstimation(DPTConfig(**DPT_HYBRID_MIDAS))), device,
                            torch.float32, seed + 3)
    feature_extractor = dpt_image_processor(DPT_IMAGE_SIZE)
    return Models(
        vae=vae,
        unet=unet,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=DDIMScheduler(**SCHEDULER_CONFIG),
        depth_estimator=depth,
        feature_extractor=feature_extractor,
        source="arch:sd2-depth",
        local_dir=None,
        device=device,
        dtype=dtype,
    )


def build_arch(name: str, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """The random-weight model set called ``name`` (one of :data:`ARCHS`)."""
    if name == "sd2-depth":
        return build_sd2_depth(device, dtype, seed)
    from p2v_fast.errors import InputError

    raise InputError(f"--arch must be one of {', '.join(ARCHS)}; got {name!r}")


def parameter_counts(models) -> dict[str, int]:
    """Parameters per network of a model set."""
    return {
        name: sum(p.numel() for p in getattr(models, name).parameters())
        for name in ("unet", "vae", "text_encoder", "depth_estimator")
    }
