"""Runtimes of the networks behind one interface, chosen once per run.

The edit loop calls a :class:`Backend` and never asks which one it is. Names and layouts are
those of the engine contract (``unet``, ``vae_encoder``, ``vae_decoder``, ``depth``), so a
graph exported from the torch path binds by the same names.

Guided latent updates in ``autograd`` mode need gradients through the UNet; only
:class:`TorchBackend` provides them (``supports_grad``), so those steps always run in PyTorch.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from p2v_fast.nets.attention import UNetWithFeatures, attention_kernels, feature_shapes
from p2v_fast.weights.models import first_call

#: Batch sizes (samples; a frame is 2) the compiled UNet is specialised for. Every compiled call
#: is padded up to one of them, and above the last to a multiple of it, so the wavefront's
#: changing tick sizes and the inversion's batches reuse five graphs instead of recompiling
#: (``dynamic=False``) until dynamo's recompile limit silently falls back to eager.
COMPILE_BUCKETS = (2, 4, 8, 16, 32)


def compile_bucket(batch: int) -> int:
    """The padded batch of a compiled call of ``batch`` samples."""
    for size in COMPILE_BUCKETS:
        if batch <= size:
            return size
    return -(-batch // COMPILE_BUCKETS[-1]) * COMPILE_BUCKETS[-1]


@dataclass
class CallCounter:
    """How much work a backend did: UNet calls, samples through the UNet, backward passes."""

    unet_calls: int = 0
    unet_samples: int = 0
    unet_backward: int = 0
    vae_encode: int = 0
    vae_decode: int = 0
    depth: int = 0

    def reset(self) -> None:
        for field in self.__dataclass_fields__:
            setattr(self, field, 0)


class Backend(ABC):
    """One runtime for the edit's networks. Tensors are torch tensors on ``self.device``."""

    name: str = "abstract"
    supports_grad: bool = False
    models: Any  # the p2v_fast.weights.models.Models whose networks this backend runs (text encoder, scheduler)
    #: The UNet's outputs live in buffers that the next call overwrites (CUDA graphs): a caller
    #: that keeps them past the next call must copy them.
    transient_outputs: bool = False

    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        self.device = device
        self.dtype = dtype
        self.counter = CallCounter()

    def identity(self) -> dict[str, str]:
        """What decides this backend's numbers beyond the model: runtime, precision, device (and,
        for graph backends, which graphs). Cache keys of computed results (the inversion) use it."""
        return runtime_identity(self.name, self.dtype, self.device)

    def check_frame_size(self, width: int, height: int) -> None:
        """Refuse a working size this backend cannot run (exported graphs have a size range)."""
        return None

    @abstractmethod
    def unet(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        refs: Sequence[torch.Tensor] | None = None,
        self_ref: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """sample [B,5,h,w], timestep [B], ehs [B,77,D], refs 9 x [B,2N_k,C_k] or None (every
        sample attends to itself), self_ref [B] or None (nonzero: that sample attends to its own
        features, as the anchor does, and its rows of ``refs`` are ignored).

        Returns eps [B,4,h,w] (fp32) and the 9 decoder features [B,N_k,C_k].
        """

    @abstractmethod
    def vae_encode(self, images: torch.Tensor) -> torch.Tensor:
        """images [B,3,H,W] in [-1,1] -> mean latents x scaling factor [B,4,H/8,W/8], fp32."""

    @abstractmethod
    def vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents [B,4,h,w] (scaled) -> images [B,3,8h,8w] in [-1,1], fp32."""

    @abstractmethod
    def depth(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """DPT input [B,3,S,S] (its processor's normalisation) -> predicted depth [B,S',S'] fp32."""


def self_attention_refs(shapes: Sequence[tuple[int, int]], batch: int, dtype: torch.dtype,
                        device: torch.device) -> tuple[list[torch.Tensor], torch.Tensor]:
    """``refs`` and ``self_ref`` for a call in which every sample attends to its own features
    (inversion, an anchor-only call) through a graph that always takes references: zeros
    [B, 2 N_k, C_k] for ``shapes`` [(N_k, C_k)], all selected away (``self_ref`` 1, made on
    ``device``: no copy from the host)."""
    refs = [torch.zeros(batch, 2 * n, c, dtype=dtype, device=device) for n, c in shapes]
    return refs, torch.ones(batch, dtype=torch.float32, device=device)


def runtime_identity(name: str, dtype: torch.dtype, device: torch.device) -> dict[str, str]:
    """:meth:`Backend.identity` of a backend not made yet (e.g. a PyTorch backend in another dtype)."""
    return {"backend": name, "dtype": str(dtype).removeprefix("torch."), "device": torch.device(device).type}


@contextlib.contextmanager
def tf32_math(enabled: bool) -> Iterator[None]:
    """TF32 tensor-core math for fp32 matmuls and cuDNN convolutions while the block runs (when
    ``enabled``); torch's settings are restored after. Outside it torch's defaults hold (fp32
    matmuls; cuDNN may use TF32 for convolutions, ``torch.backends.cudnn.allow_tf32``)."""
    if not enabled:
        yield
        return
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


class TorchBackend(Backend):
    """Eager PyTorch: the reference, and the only backend with gradients."""

    name = "torch"
    supports_grad = True

    def __init__(self, models, inject: str = "decoder") -> None:  # models: p2v_fast.weights.models.Models
        super().__init__(models.device, models.dtype)
        self.models = models
        self.inject = inject  # which self-attention layers take references (config.INJECTIONS)
        self.unet_module = UNetWithFeatures(models.unet, inject)
        self.unet_call: Callable[..., tuple[torch.Tensor, ...]] = self.unet_module  # eager, or compiled
        # Calls with gradients run eager even when compiled: on torch 2.13 (CPU) inductor's
        # gradient of the UNet differs from eager's by ~5 % of its largest value while eager
        # fp32 matches fp64 to 1e-6 (`p2v bench --speedups compile`; aot_eager is exact).
        self.compile_grad = False
        self.compiled = False
        self.bucket_bytes: dict[int, int] = {}  # compiled: padded batch -> peak bytes of its first calls (warm_up)
        self.tf32 = False  # fp32 on CUDA: TF32 matmuls and convolutions (--invert-dtype tf32)
        self.cuda_graphs = False
        self._shapes: dict[tuple[int, int], list[tuple[int, int]]] = {}
        self.scaling_factor = float(models.vae.config.scaling_factor)

    def optimize(self, compile: bool = False, channels_last: bool = False) -> None:
        """Speed-ups that keep results (up to float reassociation): channels-last UNet weights and
        activations, and ``torch.compile`` of the UNet wrapper (mode ``reduce-overhead`` on CUDA:
        CUDA graphs, whose outputs the next call overwrites, hence ``transient_outputs``).
        Compiled calls all take one signature (references always, see :meth:`_compiled`) and a
        few padded batch sizes (:data:`COMPILE_BUCKETS`); :meth:`warm_up` compiles them before
        anything is timed. Only calls without gradients use the compiled module (``compile_grad``)."""
        if channels_last:
            self.models.unet.to(memory_format=torch.channels_last)
        if compile:
            self.cuda_graphs = self.device.type == "cuda"
            mode = "reduce-overhead" if self.cuda_graphs else "default"
            self.unet_call = torch.compile(self.unet_module, mode=mode, dynamic=False)
            self.compiled = True
            self.transient_outputs = self.cuda_graphs

    def identity(self) -> dict[str, str]:
        ident = super().identity()
        return {**ident, "math": "tf32"} if self.tf32 else ident

    def unet(self, sample, timestep, encoder_hidden_states, refs=None, self_ref=None):
        with tf32_math(self.tf32):
            out = self.unet_forward(sample, timestep, encoder_hidden_states, refs, self_ref)
        return out[0].float(), list(out[1:])

    def _attention(self):
        return attention_kernels(self.device)

    def unet_forward(self, sample, timestep, encoder_hidden_states, refs=None,
                     self_ref=None) -> tuple[torch.Tensor, ...]:
        """The raw wrapper call (differentiable when grad is enabled): (eps, *feats)."""
        self.counter.unet_calls += 1
        self.counter.unet_samples += sample.shape[0]
        dtype = self.dtype
        sample, encoder_hidden_states = sample.to(dtype), encoder_hidden_states.to(dtype)
        refs = None if refs is None else [r.to(dtype) for r in refs]
        with self._attention():  # the kernel chosen (p2v_fast.nets.attention.CUDA_ATTENTION_KERNELS), traced and run
            if self.compiled and (self.compile_grad or not torch.is_grad_enabled()):
                return self._compiled(sample, timestep, encoder_hidden_states, refs, self_ref)
            with first_call(self.models, "unet"):  # a malformed model folder: one line, not a traceback
                return self.unet_module(sample, timestep, encoder_hidden_states, *(refs or []), self_ref=self_ref)

    def _compiled(self, sample, timestep, ehs, refs, self_ref) -> tuple[torch.Tensor, ...]:
        """The compiled call in its one signature: references always (a sample without any
        attends to itself: zeros and ``self_ref`` 1, [h, h] attention == attention over h), the
        batch padded to its bucket with samples that attend to themselves; outputs cut back."""
        b = sample.shape[0]
        if refs is None:
            hw = (int(sample.shape[-2]), int(sample.shape[-1]))
            if hw not in self._shapes:
                self._shapes[hw] = feature_shapes(self.models.unet, hw, self.inject)
            refs, self_ref = self_attention_refs(self._shapes[hw], b, sample.dtype, sample.device)
        elif self_ref is None:
            self_ref = sample.new_zeros(b, dtype=torch.float32)
        # contiguous, as the graphs were traced: dynamo guards on strides, and a one-frame batch
        # made by broadcasting (edit.per_branch) has stride 0 on its batch axis
        sample, timestep, ehs = sample.contiguous(), timestep.contiguous(), ehs.contiguous()
        refs = [r.contiguous() for r in refs]
        self_ref = self_ref.to(torch.float32).contiguous()
        pad = compile_bucket(b) - b
        if pad:
            def padded(x: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
                return torch.cat([x, x.new_full((pad, *x.shape[1:]), fill)])

            sample, ehs, self_ref = padded(sample), padded(ehs), padded(self_ref, 1.0)
            timestep = torch.cat([timestep, timestep[:1].expand(pad)])
            refs = [padded(r) for r in refs]
        if self.cuda_graphs:  # a new step: the previous call's output buffers may be reused
            torch.compiler.cudagraph_mark_step_begin()
        out = self.unet_call(sample, timestep, ehs, *refs, self_ref=self_ref)
        return tuple(o[:b] for o in out) if pad else tuple(out)

    @torch.no_grad()
    def warm_up(self, latent_hw: tuple[int, int], frames: int, text_dim: int | None = None) -> int:
        """Compile (and, on CUDA, record the graphs of) every bucket a call of up to ``frames``
        frames uses, before anything is timed; returns the number of buckets. No-op unless
        compiled."""
        if not self.compiled:
            return 0
        unet = self.models.unet
        h, w = latent_hw
        dim = int(text_dim or unet.config.cross_attention_dim)
        buckets = [b for b in COMPILE_BUCKETS if b < compile_bucket(2 * frames)] + [compile_bucket(2 * frames)]
        from p2v_fast.nets.memory import close_window, in_use, open_window, peaks_measurable

        for b in buckets:
            sample = torch.zeros(b, int(unet.config.in_channels), h, w, device=self.device, dtype=self.dtype)
            t = torch.ones(b, dtype=torch.long, device=self.device)
            ehs = torch.zeros(b, 77, dim, device=self.device, dtype=self.dtype)
            # A recorded graph's memory is its pool's from then on (later calls of the bucket
            # measure ~0 bytes), so its cost is read here, while it is being recorded.
            measure = peaks_measurable(self.device) and b not in self.bucket_bytes
            before = in_use(self.device) if measure else 0
            handle = open_window(self.device) if measure else None
            with self._attention():
                for _ in range(3):  # CUDA graph trees: warm-up run, recording, first replay
                    self._compiled(sample, t, ehs, None, None)
            if handle is not None:
                self.bucket_bytes[b] = max(0, close_window(self.device, handle) - before)
        return len(buckets)

    @torch.no_grad()
    def vae_encode(self, images):
        self.counter.vae_encode += images.shape[0]
        vae = self.models.vae
        with tf32_math(self.tf32), first_call(self.models, "vae", vae.encoder):
            dist = vae.encode(images.to(self.device, self.dtype)).latent_dist
        return dist.mean.float() * self.scaling_factor

    @torch.no_grad()
    def vae_decode(self, latents):
        self.counter.vae_decode += latents.shape[0]
        vae = self.models.vae
        with tf32_math(self.tf32), first_call(self.models, "vae", vae.decoder):
            return vae.decode((latents / self.scaling_factor).to(self.device, self.dtype)).sample.float()

    @torch.no_grad()
    def depth(self, pixel_values):
        self.counter.depth += pixel_values.shape[0]
        est = self.models.depth_estimator  # fp32 always (batch norms)
        with first_call(self.models, "depth_estimator"):
            return est(pixel_values=pixel_values.to(self.device, torch.float32)).predicted_depth.float()


