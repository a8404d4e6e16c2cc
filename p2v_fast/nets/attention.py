"""Cross-frame self-attention (Pix2Video sec. 3.1) and the UNet wrapper that exposes it.

In the 9 decoder self-attention layers of SD2 (``attn1`` of ``up_blocks.1-3``) frame i's
queries attend to keys and values built from the anchor's and the previous frame's features
at the same step and CFG branch (paper: Q = W^Q f^i, K = W^K [f^a, f^{i-1}], V = W^V [f^a,
f^{i-1}]); the current frame's own tokens are not in K/V. Encoder and mid-block layers are
untouched.

"Features" are the input of ``attn1``: the post-norm, pre-projection hidden states
``[B, N_k, C_k]`` (N_k = tokens at that resolution, C_k = channels).

The wrapper :class:`UNetWithFeatures` takes every tensor explicitly and returns every tensor
explicitly, so the same module is exported to ONNX (one ``unet`` graph for every frame) and
run eagerly: the processors only hold the tensors of the call in flight, set and cleared by
the wrapper's ``forward`` (no state survives a call, so nothing is frozen into a graph).

One call serves the anchor and the cross-frame frames: a per-sample selector ``self_ref`` [B]
(nonzero = attend to its own features) replaces, elementwise, sample b's ``ref_k`` by its own
[h, h]. Attention over [h, h] equals attention over h (each key appears twice, so the softmax
weights halve and the sum is unchanged), so a selected sample gets plain self-attention with no
control flow in the graph.
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from p2v_fast.config import INJECTIONS

# The 9 injected layers in SD2 (3 transformer blocks in each of up_blocks.1, .2, .3).
_INJECTED = re.compile(r"^up_blocks\.[123]\.attentions\.\d+\.transformer_blocks\.\d+\.attn1$")
# Every self-attention layer: encoder, bottleneck and decoder (``--inject all``, the paper's Table 3).
_SELF_ATTENTION = re.compile(r"^(down_blocks\.\d+|mid_block|up_blocks\.\d+)\.attentions\.\d+\.transformer_blocks\.\d+"
                             r"\.attn1$")


def injected_layer_names(unet: nn.Module, inject: str = "decoder") -> list[str]:
    """Module paths of the self-attention layers that get cross-frame attention: the decoder's
    (``inject="decoder"``, the paper's choice and the engines' contract) or all of them (``"all"``)."""
    if inject not in INJECTIONS:
        raise ValueError(f"inject must be one of {', '.join(INJECTIONS)}; got {inject!r}")
    pattern = _INJECTED if inject == "decoder" else _SELF_ATTENTION
    return [name for name, _ in unet.named_modules() if pattern.match(name)]


def _downscale(unet: Any, name: str) -> int:
    """How many times smaller than the latent the layer ``name`` runs: down_blocks.j at 2**j,
    the bottleneck at the last down block's, up_blocks.j at 2**(n_up - 1 - j) (SD2: 3 downsamplings)."""
    part, index = name.split(".")[:2]
    if part == "up_blocks":
        return 2 ** (len(unet.up_blocks) - 1 - int(index))
    if part == "down_blocks":
        return 2 ** int(index)
    return 2 ** (len(unet.down_blocks) - 1)


class _CallSlot:
    """Tensors of the UNet call in flight, shared by the wrapper and its processors."""

    def __init__(self, n_layers: int) -> None:
        self.refs: list[torch.Tensor] | None = None
        self.self_ref: torch.Tensor | None = None  # [B, 1, 1] bool: sample attends to its own features
        self.feats: list[torch.Tensor | None] = [None] * n_layers


class CrossFrameAttnProcessor:
    """Self-attention that records its input and, when given ``ref``, attends to it instead.

    Without a ``ref`` this is exactly diffusers' scaled-dot-product self-attention.
    With ``ref`` [B, M, C] (anchor || previous, M = 2 N), K and V are projected from ``ref``;
    samples the call's ``self_ref`` selects use [h, h] instead (== self-attention).
    """

    def __init__(self, slot: _CallSlot, index: int) -> None:
        self.slot = slot
        self.index = index

    def __call__(
        self,
        attn: Any,  # diffusers.models.attention_processor.Attention
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor:
        # hidden_states: [B, N, C], the post-norm input of attn1 (SD2 has no group/spatial norm here)
        self.slot.feats[self.index] = hidden_states
        refs = self.slot.refs
        if refs is None:
            context = hidden_states
        else:
            context = refs[self.index].to(hidden_states.dtype)  # [B, 2N, C]
            if self.slot.self_ref is not None:  # elementwise select, no control flow (one graph)
                own = torch.cat([hidden_states, hidden_states], dim=1)
                context = torch.where(self.slot.self_ref, own, context)
        batch, _, _ = hidden_states.shape
        heads = attn.heads
        query = attn.to_q(hidden_states)
        key = attn.to_k(context)
        value = attn.to_v(context)
        head_dim = key.shape[-1] // heads
        query = query.view(batch, -1, heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, heads, head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch, -1, heads * head_dim).to(query.dtype)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


class UNetWithFeatures(nn.Module):
    """UNet wrapper: ``forward(sample, timestep, encoder_hidden_states, *refs, self_ref=None)``.

    Inputs:
        sample: [B, 5, h, w] (4 latent channels + 1 depth channel).
        timestep: [B] (per-sample timesteps, so frames at different steps can share a batch).
        encoder_hidden_states: [B, 77, D].
        self_ref: None, or [B] (any dtype; nonzero = the sample attends to its own features, as
            the anchor does, in place of its ``ref_k``). None with refs: every sample uses refs.
        refs: none (every sample: plain self-attention) or 9 tensors ``ref_k`` [B, 2 N_k, C_k]
            (anchor || previous features of the same step and branch; a selected sample's rows
            are ignored and may hold anything finite, e.g. zeros).
    Returns:
        ``(noise_pred [B, 4, h, w], feat_0, ..., feat_8)`` with ``feat_k`` [B, N_k, C_k].
    """

    def __init__(self, unet: Any, inject: str = "decoder") -> None:  # a diffusers UNet2DConditionModel
        super().__init__()
        self.unet = unet
        self.inject = inject
        self.layer_names = injected_layer_names(unet, inject)
        if len(self.layer_names) == 0:
            raise ValueError("the UNet has no decoder self-attention layers (up_blocks.1-3 attn1)")
        self._slot = _CallSlot(len(self.layer_names))
        modules = dict(unet.named_modules())
        self._layers = [modules[name] for name in self.layer_names]  # a plain list: not submodules
        self._processors = [CrossFrameAttnProcessor(self._slot, i) for i in range(len(self._layers))]
        self._install()

    def _install(self) -> None:
        for layer, proc in zip(self._layers, self._processors, strict=True):
            layer.set_processor(proc)
        # a wrapper of another scope (--inject all) may have left its processors on layers that
        # are not this one's: those go back to plain self-attention
        mine = set(self.layer_names)
        for name, module in self.unet.named_modules():
            if (name not in mine and isinstance(getattr(module, "processor", None), CrossFrameAttnProcessor)
                    and _SELF_ATTENTION.match(name)):
                from diffusers.models.attention_processor import AttnProcessor2_0

                module.set_processor(AttnProcessor2_0())

    def _taken_over(self) -> bool:
        """Another wrapper of the same UNet (a second backend, another --inject) installed its processors."""
        if any(layer.processor is not proc for layer, proc in zip(self._layers, self._processors, strict=True)):
            return True
        if self.inject == "all":
            return False
        return any(isinstance(getattr(m, "processor", None), CrossFrameAttnProcessor) and m not in self._layers
                   for m in self._others())

    def _others(self) -> list[Any]:
        if not hasattr(self, "_other_layers"):
            mine = set(self.layer_names)
            modules = dict(self.unet.named_modules())
            self._other_layers = [modules[n] for n in injected_layer_names(self.unet, "all") if n not in mine]
        return self._other_layers

    @property
    def n_layers(self) -> int:
        return len(self.layer_names)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        *refs: torch.Tensor,
        self_ref: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ...]:
        if refs and len(refs) != self.n_layers:
            raise ValueError(f"expected {self.n_layers} ref tensors, got {len(refs)}")
        self._slot.refs = list(refs) if refs else None
        self._slot.self_ref = None if self_ref is None or not refs else (self_ref != 0).view(-1, 1, 1)
        self._slot.feats = [None] * self.n_layers
        if self._taken_over():
            self._install()  # another wrapper of the same UNet (a second backend) took the layers over
        try:
            noise = self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]
            feats = tuple(f for f in self._slot.feats if f is not None)
            if len(feats) != self.n_layers:
                raise RuntimeError("not every injected layer ran; is this an SD2-shaped UNet?")
        finally:
            self._slot.refs = None
            self._slot.self_ref = None
            self._slot.feats = [None] * self.n_layers
        return (noise, *feats)


#: The attention kernels the UNet's calls may use on CUDA, in order of preference. Chosen, not
#: inherited: torch 2.11+ makes cuDNN attention the default on H100/H200, which builds a cuDNN
#: graph on the host for every new shape (the wavefront's calls change batch every tick, and the
#: cross-frame layers' keys are 2N long) and has open reports of NaN gradients on some shapes,
#: and the autograd update backpropagates through these layers. FlashAttention-2 runs fp16/bf16
#: at SD2's head size (64) forward and backward with no per-shape setup; memory-efficient
#: attention covers fp32 (the inversion) and what flash refuses; math is the last resort.
CUDA_ATTENTION_KERNELS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH")


def attention_kernels(device: torch.device) -> Any:
    """A context in which the UNet's attention uses :data:`CUDA_ATTENTION_KERNELS` in that order
    (CUDA), or torch's own choice (CPU: one fused kernel)."""
    import contextlib

    if torch.device(device).type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([getattr(SDPBackend, k) for k in CUDA_ATTENTION_KERNELS], set_priority=True)


def feature_shapes(unet: Any, latent_hw: tuple[int, int], inject: str = "decoder") -> list[tuple[int, int]]:
    """(N_k, C_k) of each injected layer for a latent of size (h, w).

    Each layer runs at latent / :func:`_downscale` (up_blocks.j at 2**(3-j) in SD2), with the
    channel count of its attention block.
    """
    h, w = latent_hw
    shapes = []
    modules = dict(unet.named_modules())
    for name in injected_layer_names(unet, inject):
        scale = _downscale(unet, name)
        channels = modules[name].to_q.in_features
        shapes.append((-(-h // scale) * -(-w // scale), channels))
    return shapes
