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
"""

from __future__ import annotations

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
