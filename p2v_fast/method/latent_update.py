"""Guided latent update (Pix2Video sec. 3.2, eq. 1).

After the DDIM step of frame i > 1 at step t (one of the first ``update_steps``):

    g = mean((x0_hat_t^i - x0_hat_t^{i-1})^2),   x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)
    x_{t-1}^i <- x_{t-1}^i - delta * grad

with eps the CFG-combined noise prediction and ``grad``:
  - ``autograd``: dg/dx_t through the UNet (paper eq. 1); needs a differentiable UNet call.
  - ``detached``: dg/dx0_hat with eps held fixed, 2 (x0_hat^i - x0_hat^{i-1}) / N, as the authors'
    public code does. It lacks the 1/sqrt(abar_t) factor and the UNet Jacobian of the autograd
    form, so the two differ in scale for the same delta.
  - ``off``: no update (the paper's "w/o update" ablation).
g is a mean per frame: in a batch of frames, grad_F sum_f g_f gives each frame its own gradient.

Half precision: through an fp16 UNet the gradient of g reaches the UNet's output at ~1e-3 and
less inside it, near fp16's subnormal range (6e-8..6e-5), where it loses its digits or flushes
to zero. :func:`loss_scale` picks, per frame and on the device (no host sync), the power of two
that brings the gradient at the UNet's output to ~1; :func:`autograd_gradient` multiplies g by
it and divides the gradient by it in fp32, both exact (powers of two).

:func:`guided_update` is the update of one batched call, from the DDIM step's x0-hat to the
updated x_{t-1} and the per-frame sizes that :meth:`Update.record` keeps for logs and benchmarks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


def consistency_energy(x0: torch.Tensor, x0_prev: torch.Tensor) -> torch.Tensor:
    """g per frame: mean squared difference over all but the batch axis. [F,4,h,w] -> [F]."""
    return (x0 - x0_prev).pow(2).flatten(1).mean(1)


def detached_gradient(x0: torch.Tensor, x0_prev: torch.Tensor) -> torch.Tensor:
    """dg/dx0_hat with eps fixed: 2 (x0 - x0_prev) / N, N = elements per frame."""
    n = x0[0].numel()
    return 2.0 * (x0 - x0_prev) / n


#: Largest |gradient| wanted at the UNet's output after scaling: far above fp16's subnormals
#: (6e-5) and far below its largest value (65504), with room for growth inside the UNet.
SCALED_OUTPUT_GRAD = 1.0


def loss_scale(x0: torch.Tensor, x0_prev: torch.Tensor, deps_gain: torch.Tensor) -> torch.Tensor:
    """Per-frame power-of-two factors [F] for g, so that the largest gradient at the UNet's
    output (eps) becomes ~:data:`SCALED_OUTPUT_GRAD`.

    That gradient is ``deps_gain x 2 |x0 - x0_prev| / N`` at most, with ``deps_gain`` [F] the
    largest |d x0 / d eps_branch| (sqrt(1 - abar) / sqrt(abar) times the larger CFG weight).
    Frames whose x0 equals x0_prev get 1. Computed on the device: nothing is read back.
    """
    n = x0[0].numel()
    top = (x0.detach() - x0_prev.detach()).abs().flatten(1).amax(1).float() * 2.0 / n * deps_gain.float()
    exponent = torch.floor(torch.log2(SCALED_OUTPUT_GRAD / top.clamp_min(1e-30))).clamp(-60.0, 60.0)
    return torch.where(top > 0, torch.exp2(exponent), torch.ones_like(top))


def autograd_gradient(x_t: torch.Tensor, x0: torch.Tensor, x0_prev: torch.Tensor,
                      scale: torch.Tensor | None = None) -> torch.Tensor:
    """dg/dx_t through whatever produced ``x0`` from the leaf ``x_t`` (the UNet included).
    ``scale`` [F] (see :func:`loss_scale`): backpropagate scale x g and divide the result by
    it, so a half-precision backward pass keeps its digits; the result is unchanged."""
    g = consistency_energy(x0, x0_prev.detach())
    if scale is None:
        (grad,) = torch.autograd.grad(g.sum(), x_t)
        return grad
    (grad,) = torch.autograd.grad((g * scale).sum(), x_t)
    return grad / scale.view(-1, *([1] * (grad.ndim - 1)))


def apply_update(x_prev: torch.Tensor, grad: torch.Tensor, delta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x_{t-1} - delta * grad, and the RMS of the update per frame [F] (for logs and benchmarks)."""
    update = delta * grad
    return x_prev - update, update.pow(2).flatten(1).mean(1).sqrt()


@dataclass
class Update:
    """A call's guided update: ``x_prev`` the updated x_{t-1} [F,4,h,w]; ``rms`` the RMS of
    delta x grad per frame [F]; ``detached_rms`` (autograd only) the RMS of the detached form's
    update at the same latents [F], so the two forms' strengths compare without their
    trajectories diverging. All stay on the device."""

    x_prev: torch.Tensor
    rms: torch.Tensor
    detached_rms: torch.Tensor | None = None

    def record(self, steps: Sequence[int], guided: Sequence[bool], update_rms: dict[int, list[torch.Tensor]],
               detached_rms: dict[int, list[torch.Tensor]]) -> None:
        """Each guided frame's sizes into the per-step tables (step -> one device scalar per frame)."""
        for i, (step, g) in enumerate(zip(steps, guided, strict=True)):
            if g:
                if self.detached_rms is not None:
                    detached_rms.setdefault(step, []).append(self.detached_rms[i])
                update_rms.setdefault(step, []).append(self.rms[i])


def guided_update(x_t: torch.Tensor, x0: torch.Tensor, x0_prev: torch.Tensor, x_prev: torch.Tensor, delta: float,
                  *, through_unet: bool, half: bool = False, guidance_scale: float = 1.0,
                  abar: torch.Tensor | None = None) -> Update:
    """Eq. 1 for a call's frames: x_{t-1} - delta x grad, ``grad`` :func:`autograd_gradient`
    (``through_unet``: ``x0`` was computed from the leaf ``x_t`` through the UNet) or
    :func:`detached_gradient`. ``x0``, ``x0_prev`` [F,4,h,w]: a row whose ``x0_prev`` is its own
    x0 gets a zero gradient. ``half``: the UNet ran in fp16, so g is scaled by :func:`loss_scale`,
    with ``abar`` [F] the frames' alpha-bar and ``guidance_scale`` the CFG weight (they bound
    d x0 / d eps)."""
    if not through_unet:
        return Update(*apply_update(x_prev, detached_gradient(x0, x0_prev), delta))
    scale = None
    if half:  # keep the backward pass out of fp16's subnormals
        assert abar is not None
        gain = max(guidance_scale, abs(1.0 - guidance_scale))
        scale = loss_scale(x0, x0_prev, gain * ((1 - abar) / abar).sqrt())
    grad = autograd_gradient(x_t, x0, x0_prev, scale)
    same = delta * detached_gradient(x0.detach(), x0_prev)
    return Update(*apply_update(x_prev, grad, delta), same.pow(2).flatten(1).mean(1).sqrt())
