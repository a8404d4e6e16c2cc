"""UNet work in FLOPs, counted by ``torch.utils.flop_counter.FlopCounterMode``.

The count runs a copy of the UNet built from its config on the meta device: shapes only, no
arithmetic and no memory, so even the full-size SD2 UNet is counted in a fraction of a second.
It covers matmuls, convolutions and attention (2 FLOPs per multiply-add); elementwise work
(norms, activations) is not counted, as is usual for FLOP/s figures.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from p2v_fast.nets.attention import UNetWithFeatures, feature_shapes


@dataclass(frozen=True)
class UNetFlops:
    """FLOPs of one UNet call at one latent size, per variant and batch (see the engine contract)."""

    latent_hw: tuple[int, int]
    inversion_call: int  # self-attention only (no refs), batch 1 (conditional branch only)
    anchor_call: int  # self-attention only (no refs), batch 2 (CFG)
    xframe_call: int  # cross-frame (K/V over anchor || previous), batch 2
    xframe_backward: int  # gradient w.r.t. the input of one xframe call, batch 2 (autograd update)
    anchor_backward: int  # the same for the anchor variant (refs = "none")

    def as_dict(self) -> dict[str, object]:
        return {
            "latent_hw": list(self.latent_hw),
            "per_call": {
                "inversion (self-attention, batch 1)": self.inversion_call,
                "anchor (self-attention, batch 2)": self.anchor_call,
                "propagated (cross-frame, batch 2)": self.xframe_call,
                "autograd backward (cross-frame, batch 2)": self.xframe_backward,
            },
            "method": "torch.utils.flop_counter.FlopCounterMode on a meta-device copy of the UNet",
        }


def _meta_wrapper(unet: Any) -> UNetWithFeatures:
    with torch.device("meta"):
        copy = type(unet).from_config(unet.config)
    copy.requires_grad_(False)
    return UNetWithFeatures(copy)


def _count(fn) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


def count_unet_flops(unet: Any, latent_hw: tuple[int, int]) -> UNetFlops:
    """FLOPs of the calls the edit makes at ``latent_hw`` (h, w) with ``unet``'s architecture."""
    wrapper = _meta_wrapper(unet)
    h, w = latent_hw
    dim = int(unet.config.cross_attention_dim)
    in_ch = int(unet.config.in_channels)
    meta = torch.device("meta")
    shapes = feature_shapes(wrapper.unet, latent_hw)

    def inputs(batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (torch.empty(batch, in_ch, h, w, device=meta), torch.zeros(batch, dtype=torch.long, device=meta),
                torch.empty(batch, 77, dim, device=meta))

    def refs(batch: int) -> list[torch.Tensor]:
        return [torch.empty(batch, 2 * n, c, device=meta) for n, c in shapes]

    def forward(batch: int, xframe: bool) -> int:
        return _count(lambda: wrapper(*inputs(batch), *(refs(batch) if xframe else [])))

    def backward(batch: int, xframe: bool) -> int:
        sample, t, ehs = inputs(batch)
        x = sample.requires_grad_(True)
        out: list[torch.Tensor] = []

        def fwd() -> None:
            with torch.enable_grad():
                out.append(wrapper(x, t, ehs, *(refs(batch) if xframe else []))[0])

        fwd()  # outside the counter: only the backward pass is counted below
        return _count(lambda: torch.autograd.grad(out[0].sum(), x))

    return UNetFlops(
        latent_hw=(h, w),
        inversion_call=forward(1, False),
        anchor_call=forward(2, False),
        xframe_call=forward(2, True),
        xframe_backward=backward(2, True),
        anchor_backward=backward(2, False),
    )
