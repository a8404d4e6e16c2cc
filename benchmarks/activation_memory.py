"""The activation memory of SD2-depth's UNet calls, counted on the meta device: the constants of
`p2v edit --dry-run`'s memory model (:data:`p2v_fast.method.estimate.ACTIVATION_BYTES`).

The full-size UNet (:data:`p2v_fast.weights.sd2_depth.SD2_DEPTH_UNET`) runs through the project's
cross-frame wrapper on the meta device (shapes only: no arithmetic, no memory, seconds), and a
dispatch mode counts the bytes of every storage an op allocates while a tensor still refers to
it: the live bytes and their peak, as a caching allocator would hold them without fragmentation.
Scaled-dot-product attention is counted as the fused kernels the GPU runs (flash or
memory-efficient: the output and a float32 log-sum-exp row per query, kept for the backward
pass; never the N x N matrix the meta device's math fallback would build). Kernels' workspaces
(cuDNN, cuBLAS) are not tensors and are not counted.

Per call: ``inference`` is the peak of a call without gradients above its inputs; ``backward``
the peak of a differentiable call, its backward pass included, above its inputs. Both for one
frame (two CFG samples) and two, so the per-sample figure is their difference over two samples
(and what a 1-frame call holds beyond its two samples is ``overhead``). ``decode_1``: the VAE
decoding one frame (the frame sink decodes one at a time).

    python -m benchmarks.activation_memory [--size 512] [--dtype fp16]
"""

from __future__ import annotations

import argparse
import json
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages that ops allocate while some tensor refers to them, and their peak.
    Storages in ``existing`` (the weights, the inputs) are not counted when an op returns a view of
    them (a transposed weight)."""

    def __init__(self, existing: set[int]) -> None:
        super().__init__()
        self._existing = existing
        self.live = 0
        self.peak = 0
        self._holders: dict[int, int] = {}  # storage -> tensors referring to it
        self._tracked: weakref.WeakSet[torch.Tensor] = weakref.WeakSet()

    def _release(self, key: int, nbytes: int) -> None:
        self._holders[key] -= 1
        if self._holders[key] == 0:
            del self._holders[key]
            self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t in self._tracked:
                continue
            self._tracked.add(t)
            storage = t.untyped_storage()
            key, nbytes = storage._cdata, storage.nbytes()
            if key in self._existing:
                continue
            if key not in self._holders:
                self._holders[key] = 0
                self.live += nbytes
                self.peak = max(self.peak, self.live)
            self._holders[key] += 1
            weakref.finalize(t, self._release, key, nbytes)
        return out


class _FusedAttention(torch.autograd.Function):
    """What a fused attention kernel allocates: its output and a float32 log-sum-exp per query
    (kept for the backward pass), then the three input gradients."""

    @staticmethod
    def forward(ctx, q, k, v):  # type: ignore[override]
        out = q.new_empty((*q.shape[:-1], v.shape[-1]))
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _fused(q, k, v, *args: Any, **kwargs: Any) -> torch.Tensor:
    return _FusedAttention.apply(q, k, v)


def _peak_above_inputs(run: Callable[[], object], existing: list[torch.Tensor]) -> int:
    mode = LiveBytes({t.untyped_storage()._cdata for t in existing})
    with mode:
        run()
    return mode.peak


def _unet_peaks(wrapper: Any, frames: int, shapes: list[tuple[int, int]], h: int, w: int,
                dtype: torch.dtype) -> tuple[int, int]:
    """Peak bytes above the inputs of a ``frames``-frame call (2 CFG samples each) without
    gradients, and of a differentiable one with its backward pass."""
    meta, b = torch.device("meta"), 2 * frames
    refs = [torch.empty(b, 2 * n, c, device=meta, dtype=dtype) for n, c in shapes]
    ehs = torch.empty(b, 77, 1024, device=meta, dtype=dtype)
    t = torch.zeros(b, device=meta, dtype=torch.long)
    existing = [*wrapper.unet.parameters(), *wrapper.unet.buffers(), *refs, ehs, t]

    def inference() -> None:
        with torch.no_grad():
            wrapper(torch.empty(b, 5, h, w, device=meta, dtype=dtype), t, ehs, *refs)

    def backward() -> None:
        x = torch.empty(b, 5, h, w, device=meta, dtype=dtype, requires_grad=True)
        eps = wrapper(x, t, ehs, *refs)[0]
        eps.float().sum().backward()

    return _peak_above_inputs(inference, existing), _peak_above_inputs(backward, existing)


def measure(size: int = 512, dtype: torch.dtype = torch.float16) -> dict[str, Any]:
    """Peak bytes above the inputs of 1- and 2-frame calls (2 and 4 samples) at ``size`` x ``size``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from p2v_fast.nets.attention import UNetWithFeatures, feature_shapes
    from p2v_fast.weights.hub import quiet_loading
    from p2v_fast.weights.sd2_depth import SD2_DEPTH_UNET, SD_VAE

    meta = torch.device("meta")
    with meta, quiet_loading():
        unet: Any = UNet2DConditionModel(**SD2_DEPTH_UNET)
    unet = unet.to(dtype).requires_grad_(False)  # as load_models leaves it
    wrapper = UNetWithFeatures(unet)
    h = w = size // 8
    shapes = feature_shapes(unet, (h, w))
    result: dict[str, Any] = {"size": size, "dtype": str(dtype).removeprefix("torch."), "latent_cells": h * w}
    original = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = _fused  # type: ignore[assignment]
    try:
        for frames in (1, 2):
            result[f"inference_{frames}"], result[f"backward_{frames}"] = _unet_peaks(wrapper, frames, shapes, h, w,
                                                                                      dtype)
        with meta, quiet_loading():
            vae: Any = AutoencoderKL(**SD_VAE)
        vae = vae.to(dtype).requires_grad_(False)
        latent = torch.empty(1, 4, h, w, device=meta, dtype=dtype)

        def decode() -> None:
            with torch.no_grad():
                vae.decode(latent)

        result["decode_1"] = _peak_above_inputs(decode, [*vae.parameters(), *vae.buffers(), latent])
    finally:
        torch.nn.functional.scaled_dot_product_attention = original  # type: ignore[assignment]
    for kind in ("inference", "backward"):
        per_sample = (result[f"{kind}_2"] - result[f"{kind}_1"]) / 2
        result[f"{kind}_per_sample"] = int(per_sample)
        result[f"{kind}_overhead"] = int(result[f"{kind}_1"] - 2 * per_sample)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--dtype", choices=("fp16", "fp32"), default="fp16")
    args = p.parse_args(argv)
    dtype = {"fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    print(json.dumps(measure(args.size, dtype), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
