"""The edit loop (Pix2Video Algorithm 1), written once for every backend and schedule.

A frame's state (latent, step index) is explicit data (:class:`FrameState`); the features and
x0-hat estimates that later frames need live in a :class:`FeatureStore`. :func:`run_step`
advances any set of frames by one step in one batch, so the sequential schedule (one frame at a
time) and a wavefront schedule (every ready frame at once) share it.

Batch layout of a UNet call for F frames: 2F samples ordered [uncond_1, cond_1, uncond_2, ...],
so a frame's two CFG branches are adjacent and its reference features are gathered per sample.
The anchor shares calls with the other frames: its samples are marked ``self_ref`` (attend to
their own features) and its ``ref_k`` rows are zeros, so a wavefront tick is one UNet call
(two when some frames need a differentiable call for the ``autograd`` update).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from p2v_fast.backends import Backend
from p2v_fast.config import EditConfig
from p2v_fast.ddim import DDIMSchedule
from p2v_fast.latent_update import apply_update, autograd_gradient, detached_gradient
from p2v_fast.memory import CallBudget

Features = list[torch.Tensor]  # 9 tensors [2, N_k, C_k]: (uncond, cond) of one frame at one step


@dataclass
class FrameState:
    """One frame in flight: ``latent`` is x_t [1,4,h,w] fp32 before step ``step``."""

    index: int
    latent: torch.Tensor
    depth: torch.Tensor  # [1,1,h,w] in [-1, 1]
    step: int = 0


@dataclass
class EditStats:
    unet_calls: int = 0
    unet_backward: int = 0
    update_rms: dict[int, list[float]] = field(default_factory=dict)  # step -> RMS of delta*grad per frame
    # autograd mode: step -> RMS of the detached form's update (delta * 2 (x0 - x0_prev) / N) at the same
    # latents, per frame: the two forms' strengths compared without their trajectories diverging
    detached_rms: dict[int, list[float]] = field(default_factory=dict)
    peak_feature_bytes: int = 0

    def mean_update_rms(self) -> dict[int, float]:
        return {s: float(np.mean(v)) for s, v in sorted(self.update_rms.items())}

    def mean_detached_rms(self) -> dict[int, float]:
        return {s: float(np.mean(v)) for s, v in sorted(self.detached_rms.items())}

    def describe_update(self, mode: str) -> str:
        """One line on the guided update's size, for the end of an edit."""
        rms = self.mean_update_rms()
        if not rms:
            return "no guided latent update"
        steps = list(rms)
        line = (f"guided update RMS ({mode}, steps {steps[0]}-{steps[-1]}): first {rms[steps[0]]:.3g}, "
                f"last {rms[steps[-1]]:.3g}, mean {np.mean(list(rms.values())):.3g}")
        same = self.mean_detached_rms()
        if same:
            ratio = [rms[s] / same[s] for s in steps if same.get(s)]
            line += (f"; the detached form at the same latents: mean {np.mean(list(same.values())):.3g}, "
                     f"autograd/detached {ratio[0]:.3g} at the first step, {ratio[-1]:.3g} at the last"
                     if ratio else "")
        return line


class FeatureStore:
    """Anchor features for every step; other frames' features and x0-hat until the next frame
    has used them (popped on read), so memory is constant in the length of the clip."""

    def __init__(self, cfg: EditConfig, n_frames: int) -> None:
        self.refs = cfg.refs
        self.n_frames = n_frames
        self.keep_anchor = cfg.refs in ("anchor+prev", "anchor") and n_frames > 1
        self.keep_prev = cfg.refs in ("anchor+prev", "prev")
        self.x0_steps = cfg.guided_steps
        self.anchor: dict[int, Features] = {}
        self.feats: dict[tuple[int, int], Features] = {}
        self.x0: dict[tuple[int, int], torch.Tensor] = {}
        self.peak_bytes = 0

    def wants_features(self, frame: int) -> bool:
        return (frame == 0 and self.keep_anchor) or (self.keep_prev and frame + 1 < self.n_frames)

    def put(self, frame: int, step: int, feats: Features, x0: torch.Tensor) -> None:
        if frame == 0 and self.keep_anchor:
            self.anchor[step] = feats
        elif self.keep_prev and frame + 1 < self.n_frames:
            self.feats[(frame, step)] = feats
        if step < self.x0_steps and frame + 1 < self.n_frames:
            self.x0[(frame, step)] = x0
        self.peak_bytes = max(self.peak_bytes, self.nbytes())

    def refs_for(self, frame: int, step: int) -> Features | None:
        """ref_k [2, 2N_k, C_k] for frame > 0: anchor || previous (or a mode's stand-in).
        Reading keeps the entries; :meth:`used` drops them once the step is done."""
        if frame == 0 or self.refs == "none":
            return None
        prev: Features | None = None
        if self.keep_prev:
            if frame == 1 and self.keep_anchor:
                prev = self.anchor[step]
            else:
                prev = self.feats[(frame - 1, step)]
        anchor = self.anchor[step] if self.keep_anchor else prev
        prev = anchor if prev is None else prev
        assert anchor is not None and prev is not None
        # Attention over [a, a] equals attention over a, so the single-reference ablations keep
        # the engine's 2N-token layout.
        return [torch.cat([a, p], dim=1) for a, p in zip(anchor, prev, strict=True)]

    def x0_prev(self, frame: int, step: int) -> torch.Tensor:
        return self.x0[(frame - 1, step)]

    def used(self, frame: int, step: int) -> None:
        """``frame`` has finished ``step``: the previous frame's entries of that step are not
        needed again."""
        self.feats.pop((frame - 1, step), None)
        self.x0.pop((frame - 1, step), None)

    def nbytes(self) -> int:
        total = sum(t.numel() * t.element_size() for fs in self.anchor.values() for t in fs)
        total += sum(t.numel() * t.element_size() for fs in self.feats.values() for t in fs)
        return total + sum(t.numel() * t.element_size() for t in self.x0.values())


@dataclass
class EditContext:
    """Everything a step needs besides the frames' own state."""

    cfg: EditConfig
    backend: Backend
    grad_backend: Backend | None  # torch backend for autograd steps (may be ``backend`` itself)
    schedule: DDIMSchedule
    embeddings: torch.Tensor  # [2, 77, D]: (negative/empty, target prompt)
    store: FeatureStore
    delta: float
    stats: EditStats
    budget: CallBudget | None = None  # frames per UNet call; None: what fits on the backend's device

    def __post_init__(self) -> None:
        if self.budget is None:
            self.budget = CallBudget(self.backend.device)


def _guided(ctx: EditContext, st: FrameState) -> bool:
    c = ctx.cfg
    return st.index > 0 and st.step < c.guided_steps


def run_step(frames: list[FrameState], ctx: EditContext) -> None:
    """Advance every frame in ``frames`` by one DDIM step, in as few UNet calls as possible.

    Frames are grouped by whether they need a differentiable call (``autograd`` guided steps);
    each group is one batched call (the anchor shares the other frames' call, see the module
    docstring), split only where memory requires.
    """
    groups: dict[bool, list[FrameState]] = {}
    for st in frames:
        needs_grad = _guided(ctx, st) and ctx.cfg.latent_update == "autograd"
        groups.setdefault(needs_grad, []).append(st)
    for needs_grad, group in groups.items():
        _step_group(group, ctx, needs_grad)


def _step_group(frames: list[FrameState], ctx: EditContext, needs_grad: bool) -> None:
    """``frames`` (all ready, independent of each other) in calls of as many frames as the
    budget allows; a call that runs out of memory is retried smaller (a call changes no state
    until it has returned)."""
    budget, kind = ctx.budget, ("edit", needs_grad)
    assert budget is not None
    backend = ctx.grad_backend if needs_grad else ctx.backend
    assert backend is not None

    def run(chunk: Sequence[FrameState]) -> None:
        with budget.measure(kind, len(chunk), backend.device):
            _step_call(list(chunk), ctx, backend, needs_grad)

    budget.run_in_calls(kind, frames, run)


def _step_call(frames: list[FrameState], ctx: EditContext, backend: Backend, needs_grad: bool) -> None:
    sched, cfg = ctx.schedule, ctx.cfg
    device = backend.device
    idx = torch.tensor([st.step for st in frames], dtype=torch.long)
    x = torch.cat([st.latent for st in frames]).to(device)  # [F,4,h,w] fp32
    if needs_grad:
        x = x.detach().requires_grad_(True)
    depth = torch.cat([st.depth for st in frames]).to(device)
    sample = torch.cat([x, depth], dim=1).repeat_interleave(2, dim=0)  # [2F,5,h,w]
    t = sched.timesteps[idx].repeat_interleave(2).to(device)  # [2F]
    ehs = ctx.embeddings.repeat(len(frames), 1, 1)  # [2F,77,D]
    refs, self_ref = None, None
    per_frame = [ctx.store.refs_for(st.index, st.step) for st in frames]  # None: attends to itself
    template = next((r for r in per_frame if r is not None), None)
    if template is not None:
        if any(r is None for r in per_frame):  # the anchor in a cross-frame call: zeros, selected away
            zeros = [torch.zeros_like(t) for t in template]
            per_frame = [zeros if r is None else r for r in per_frame]
            is_anchor = torch.tensor([st.index == 0 for st in frames], dtype=torch.float32)
            self_ref = is_anchor.repeat_interleave(2).to(device)  # [2F]
        refs = [torch.cat([r[k] for r in per_frame]) for k in range(len(template))]  # type: ignore[index]

    with torch.set_grad_enabled(needs_grad):
        if needs_grad:
            out = backend.unet_forward(sample, t, ehs, refs, self_ref)  # type: ignore[attr-defined]
            eps_all, feats = out[0].float(), list(out[1:])
            backend.counter.unet_backward += 1
        else:
            eps_all, feats = backend.unet(sample, t, ehs, refs, self_ref)
        eps_u, eps_c = eps_all[0::2], eps_all[1::2]
        eps = eps_u + cfg.guidance_scale * (eps_c - eps_u)  # CFG, fp32
        x_prev, x0 = sched.step(x, eps, idx)
        guided = [i for i, st in enumerate(frames) if _guided(ctx, st)]
        if guided:
            x0_prev = torch.cat([ctx.store.x0_prev(frames[i].index, frames[i].step) for i in guided]).to(device)
            rows = torch.tensor(guided, device=device)
            if needs_grad:
                grad = autograd_gradient(x, x0[rows], x0_prev)[rows]
                same = ctx.delta * detached_gradient(x0[rows].detach(), x0_prev)
                for i, r in zip(guided, same.pow(2).flatten(1).mean(1).sqrt().tolist(), strict=True):
                    ctx.stats.detached_rms.setdefault(frames[i].step, []).append(r)
            else:
                grad = detached_gradient(x0[rows], x0_prev)
            x_prev = x_prev.detach().clone()
            x_prev[rows], rms = apply_update(x_prev[rows], grad, ctx.delta)
            for i, r in zip(guided, rms.tolist(), strict=True):
                ctx.stats.update_rms.setdefault(frames[i].step, []).append(r)

    x_prev, x0 = x_prev.detach(), x0.detach()
    for i, st in enumerate(frames):
        own = [f[2 * i : 2 * i + 2].detach() for f in feats] if ctx.store.wants_features(st.index) else []
        ctx.store.used(st.index, st.step)
        ctx.store.put(st.index, st.step, own, x0[i : i + 1])
        st.latent = x_prev[i : i + 1]
        st.step += 1
    ctx.stats.peak_feature_bytes = ctx.store.peak_bytes


def sequential(
    ctx: EditContext, initial: Iterator[FrameState], on_step=None
) -> Iterator[FrameState]:
    """Algorithm 1 as written: each frame through all steps, in order. Yields finished frames."""
    for st in initial:
        while st.step < ctx.schedule.steps:
            run_step([st], ctx)
            if on_step is not None:
                on_step(1)
        yield st


DEFAULT_WAVEFRONT_FRAMES = 16  # frames in flight when --batch-frames is not given


def wavefront(
    ctx: EditContext, initial: Iterator[FrameState], on_step=None, max_in_flight: int | None = None
) -> Iterator[FrameState]:
    """Exact wavefront schedule (DESIGN.md sec. 3): frame i at step s needs only (i-1, s) and
    (i, s-1), so every tick advances each ready frame one step, all in one batched call per
    network variant. Frames finish, and are yielded, in order; at most ``max_in_flight`` frames
    hold state at once. The result equals :func:`sequential` up to float reassociation."""
    steps = ctx.schedule.steps
    cap = max_in_flight or DEFAULT_WAVEFRONT_FRAMES
    pending = iter(initial)
    in_flight: list[FrameState] = []
    exhausted = False
    while True:
        # Admit the next frame once its predecessor has finished step 0.
        while not exhausted and len(in_flight) < cap and (not in_flight or in_flight[-1].step >= 1):
            nxt = next(pending, None)
            if nxt is None:
                exhausted = True
            else:
                in_flight.append(nxt)
        if not in_flight:
            return
        # Ready: the predecessor has done this step (in_flight[0]'s predecessor has finished).
        ready = [st for k, st in enumerate(in_flight) if k == 0 or in_flight[k - 1].step > st.step]
        run_step(ready, ctx)
        if on_step is not None:
            on_step(len(ready))
        while in_flight and in_flight[0].step >= steps:
            yield in_flight.pop(0)


def run_schedule(ctx: EditContext, initial: Iterator[FrameState], on_step=None) -> Iterator[FrameState]:
    """The edit loop that ``ctx.cfg.schedule`` names; yields finished frames in order."""
    if ctx.cfg.schedule == "wavefront":
        return wavefront(ctx, initial, on_step=on_step, max_in_flight=ctx.cfg.batch_frames)
    return sequential(ctx, initial, on_step=on_step)
