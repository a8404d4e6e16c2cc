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


def autograd_gradient(x_t: torch.Tensor, x0: torch.Tensor, x0_prev: torch.Tensor) -> torch.Tensor:
    """dg/dx_t through whatever produced ``x0`` from the leaf ``x_t`` (the UNet included)."""
    g = consistency_energy(x0, x0_prev.detach()).sum()
    (grad,) = torch.autograd.grad(g, x_t)
    return grad


def apply_update(x_prev: torch.Tensor, grad: torch.Tensor, delta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x_{t-1} - delta * grad, and the RMS of the update per frame [F] (for logs and benchmarks)."""
    update = delta * grad
    return x_prev - update, update.pow(2).flatten(1).mean(1).sqrt()
