"""DDIM arithmetic (eta = 0), in fp32, for per-sample timesteps.

The sampling step from t to its predecessor p = t - T/steps (paper sec. 3.2):
    x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)
    x_p    = sqrt(abar_p) x0_hat + sqrt(1 - abar_p) eps
and the inversion step is the same map run backwards (x_p -> x_t, with eps predicted at x_p and
timestep t, the usual DDIM-inversion approximation).

Timesteps follow the scheduler's own ``set_timesteps`` (SD2: "leading" spacing, steps_offset 1:
981, 961, ..., 1 at 50 steps), or with ``grid="authors"`` the grid of the authors' code, whose
DDIMScheduler is built with steps_offset 0 ("leading", 980, 960, ..., 0); abar of the step before
the first timestep is the scheduler's ``final_alpha_cumprod``.

The tables live on every device that uses them (copied once, by :meth:`DDIMSchedule.to`), and
step indices are built there (:meth:`DDIMSchedule.index`), so a step makes no host-device copy.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import DDIMScheduler


def _canonical(device: torch.device | str) -> torch.device:
    """``cuda`` and ``cuda:0`` (the current device) are one key."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


class DDIMSchedule:
    """Timesteps and abar values of an ``steps``-step DDIM run. Index 0 = noisiest step."""

    def __init__(self, scheduler: Any, steps: int, grid: str = "model") -> None:  # a DDIMScheduler (or its like)
        authors = {"steps_offset": 0, "timestep_spacing": "leading", "set_alpha_to_one": False}
        sched = DDIMScheduler.from_config(scheduler.config, **(authors if grid == "authors" else {}))
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
        self._tables: dict[torch.device, dict[str, torch.Tensor]] = {}

    def to(self, device: torch.device | str) -> DDIMSchedule:
        """Copy the tables to ``device`` once (a blocking copy: call it before the step loop)."""
        device = _canonical(device)
        if device not in self._tables:
            names = {"timesteps": self.timesteps, "abar": self.abar, "abar_prev": self.abar_prev,
                     "ascending": torch.arange(self.steps), "descending": torch.arange(self.steps - 1, -1, -1)}
            self._tables[device] = {k: v.to(device) for k, v in names.items()}
        return self

    def _table(self, name: str, device: torch.device) -> torch.Tensor:
        device = _canonical(device)
        return self.to(device)._tables[device][name]  # not prepared: one blocking copy now

    def index(self, steps: list[int], device: torch.device | str) -> torch.Tensor:
        """Step indices ``steps`` as a long tensor [len(steps)] on ``device``, made there: a view
        of a table when the steps are all equal or consecutive (descending, as in a wavefront
        tick), else one gather of views; never a copy from the host."""
        device = torch.device(device)
        if len(set(steps)) == 1:
            return self._table("ascending", device)[steps[0]].expand(len(steps))
        if steps == list(range(steps[0], steps[0] - len(steps), -1)):
            start = self.steps - 1 - steps[0]
            return self._table("descending", device)[start : start + len(steps)]
        ascending = self._table("ascending", device)
        return torch.stack([ascending[s] for s in steps])

    def timesteps_at(self, idx: torch.Tensor) -> torch.Tensor:
        """Timesteps at step indices ``idx`` [B], on ``idx``'s device."""
        return self._table("timesteps", idx.device)[idx]

    def abar_at(self, idx: torch.Tensor) -> torch.Tensor:
        """abar_t at step indices ``idx`` [B], on ``idx``'s device."""
        return self._table("abar", idx.device)[idx]

    def _gather(self, table: str, idx: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return self._table(table, idx.device)[idx].to(like.device).view(-1, *([1] * (like.ndim - 1)))

    def x0(self, x: torch.Tensor, eps: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """x0_hat from x_t and eps at step indices ``idx`` [B] (x, eps: [B, 4, h, w], fp32)."""
        a = self._gather("abar", idx, x)
        return (x - (1 - a).sqrt() * eps) / a.sqrt()

    def step(self, x: torch.Tensor, eps: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One sampling step at step indices ``idx``: returns (x_{t-1}, x0_hat_t)."""
        x0 = self.x0(x, eps, idx)
        a_prev = self._gather("abar_prev", idx, x)
        return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps, x0

    def invert_step(self, x: torch.Tensor, eps: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """One inversion step: from the latent at abar_prev[idx] to the latent at abar[idx]."""
        a_from = self._gather("abar_prev", idx, x)
        a_to = self._gather("abar", idx, x)
        x0 = (x - (1 - a_from).sqrt() * eps) / a_from.sqrt()
        return a_to.sqrt() * x0 + (1 - a_to).sqrt() * eps
