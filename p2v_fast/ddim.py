"""DDIM arithmetic (eta = 0), in fp32, for per-sample timesteps.

The sampling step from t to its predecessor p = t - T/steps (paper sec. 3.2):
    x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)
    x_p    = sqrt(abar_p) x0_hat + sqrt(1 - abar_p) eps
and the inversion step is the same map run backwards (x_p -> x_t, with eps predicted at x_p and
timestep t, the usual DDIM-inversion approximation).

Timesteps follow the scheduler's own ``set_timesteps`` (SD2: "leading" spacing, steps_offset 1);
abar of the step before the first timestep is the scheduler's ``final_alpha_cumprod``.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import DDIMScheduler


class DDIMSchedule:
    """Timesteps and abar values of an ``steps``-step DDIM run. Index 0 = noisiest step."""

    def __init__(self, scheduler: Any, steps: int) -> None:  # a DDIMScheduler (or any with its config)
        sched = DDIMScheduler.from_config(scheduler.config)
        sched.set_timesteps(steps)
        self.steps = steps
        self.timesteps = sched.timesteps.clone().long()  # [steps], descending
        abar = sched.alphas_cumprod.to(torch.float64)
        final = float(sched.final_alpha_cumprod)
        stride = sched.config.num_train_timesteps // steps
        prev = self.timesteps - stride
        self.abar = abar[self.timesteps].float()  # abar_t at each step
        final_t = torch.tensor(final, dtype=torch.float64)
        self.abar_prev = torch.where(prev >= 0, abar[prev.clamp(min=0)], final_t).float()  # abar before the step

    def _gather(self, table: torch.Tensor, idx: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return table[idx.cpu()].to(like.device).view(-1, *([1] * (like.ndim - 1)))

    def x0(self, x: torch.Tensor, eps: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """x0_hat from x_t and eps at step indices ``idx`` [B] (x, eps: [B, 4, h, w], fp32)."""
        a = self._gather(self.abar, idx, x)
        return (x - (1 - a).sqrt() * eps) / a.sqrt()

    def step(self, x: torch.Tensor, eps: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One sampling step at step indices ``idx``: returns (x_{t-1}, x0_hat_t)."""
        x0 = self.x0(x, eps, idx)
        a_prev = self._gather(self.abar_prev, idx, x)
        return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps, x0

    def invert_step(self, x: torch.Tensor, eps: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """One inversion step: from the latent at abar_prev[idx] to the latent at abar[idx]."""
        a_from = self._gather(self.abar_prev, idx, x)
        a_to = self._gather(self.abar, idx, x)
        x0 = (x - (1 - a_from).sqrt() * eps) / a_from.sqrt()
        return a_to.sqrt() * x0 + (1 - a_to).sqrt() * eps
