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

import torch

from p2v_fast.config import EditConfig
from p2v_fast.method.ddim import DDIMSchedule
from p2v_fast.method.latent_update import guided_update
from p2v_fast.method.wavefront import (
    DEFAULT_WAVEFRONT_FRAMES,
    FeatureStore,
    call_groups,
    is_guided,
    wavefront_ticks,
)
from p2v_fast.nets.backends import Backend
from p2v_fast.nets.memory import CallBudget

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
    """What an edit did. Per-step update sizes stay on the device until they are read (one
    copy per table, by :meth:`mean_update_rms` / :meth:`mean_detached_rms`), so the step loop
    never waits for the device."""

    unet_calls: int = 0
    unet_backward: int = 0
    update_rms: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # step -> RMS of delta*grad per frame
    # autograd mode: step -> RMS of the detached form's update (delta * 2 (x0 - x0_prev) / N) at the same
    # latents, per frame: the two forms' strengths compared without their trajectories diverging
    detached_rms: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    peak_feature_bytes: int = 0
    # samples sent through the UNet, by what they cost (benchmarks.flops): in calls with
    # references (the anchor's [h, h] included) and without; samples differentiated
    samples_xframe: int = 0
    samples_plain: int = 0
    samples_backward: int = 0

    def count_call(self, samples: int, xframe: bool, backward: bool) -> None:
        """A UNet call's samples, by what they cost."""
        if xframe:
            self.samples_xframe += samples
        else:
            self.samples_plain += samples
        if backward:
            self.samples_backward += samples

    def mean_update_rms(self) -> dict[int, float]:
        """Mean RMS of the guided update per step (read from the device once)."""
        return _step_means(self.update_rms)

    def mean_detached_rms(self) -> dict[int, float]:
        return _step_means(self.detached_rms)

    def describe_update(self, mode: str, steps: int, random: bool = False) -> str:
        """One line on the guided update's size, for the end of an edit of ``steps`` steps;
        ``random``: the model has random weights (its autograd/detached ratio means nothing)."""
        rms = self.mean_update_rms()
        if not rms:
            return "no guided latent update"
        guided = list(rms)
        line = (f"guided latent update ({mode}, steps {guided[0] + 1}-{guided[-1] + 1} of {steps}): moved the latents "
                f"{rms[guided[0]]:.3g} RMS at the first step, {rms[guided[-1]]:.3g} at the last (latents: RMS ~1)")
        same = self.mean_detached_rms()
        ratio = [rms[s] / same[s] for s in guided if same.get(s)]
        if ratio:
            line += (f"; {ratio[0]:.3g}x and {ratio[-1]:.3g}x the detached form's (the authors' code) at the same "
                     "latents" + (", meaningless with random weights" if random else
                                  " (choosing --update-weight from it: docs/method.md, section 6)"))
        return line


def _step_means(table: dict[int, list[torch.Tensor]]) -> dict[int, float]:
    """step -> mean of its per-frame device scalars, read back in one copy."""
    steps = sorted(table)
    if not steps:
        return {}
    means = torch.stack([torch.stack(table[s]).float().mean() for s in steps])
    return dict(zip(steps, means.cpu().tolist(), strict=True))


def owned(t: torch.Tensor, copy: bool = False) -> torch.Tensor:
    """``t`` detached, holding only its own bytes: a copy when it is a view into a larger storage
    (a row of a batched call's output) or when ``copy`` (the backend reuses its output buffers)."""
    t = t.detach()
    if copy or not t.is_contiguous() or t.untyped_storage().nbytes() != t.numel() * t.element_size():
        return t.clone(memory_format=torch.contiguous_format)
    return t


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
            self.budget = edit_budget(self.cfg, self.backend)
        for b in (self.backend, self.grad_backend):  # the step loop indexes its tables on the device
            if b is not None:
                self.schedule.to(b.device)


def edit_budget(cfg: EditConfig, backend: Backend) -> CallBudget:
    """Frames per UNet call for an edit on ``backend``: what fits within ``cfg.max_memory`` (or
    the device); a compiled backend's calls costed by the buckets its warm-up recorded."""
    budget = CallBudget(backend.device, max_memory=cfg.max_memory)
    recorded = getattr(backend, "bucket_bytes", None)
    if recorded:
        from p2v_fast.nets.backends import compile_bucket

        budget.buckets, budget.bucket_bytes = compile_bucket, dict(recorded)
    return budget


def run_step(frames: list[FrameState], ctx: EditContext) -> None:
    """Advance every frame in ``frames`` by one DDIM step, in as few UNet calls as possible.

    Frames are grouped by whether they need a differentiable call (``autograd`` guided steps);
    each group is one batched call (the anchor shares the other frames' call, see the module
    docstring), split only where memory requires.
    """
    for needs_grad, group in call_groups(frames, ctx.cfg):
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


def per_branch(x: torch.Tensor) -> torch.Tensor:
    """[F, ...] -> [2F, ...], each row twice (uncond, cond): ``repeat_interleave(2, 0)`` as a
    broadcast, so no repeat count is ever copied to the device."""
    return x.unsqueeze(1).expand(x.shape[0], 2, *x.shape[1:]).reshape(2 * x.shape[0], *x.shape[1:])


def _references(frames: list[FrameState], store: FeatureStore,
                device: torch.device) -> tuple[list[torch.Tensor] | None, torch.Tensor | None]:
    """The call's ``refs`` (9 x [2F, 2N_k, C_k]) and ``self_ref`` [2F] (1 = attends to itself:
    the anchor, whose rows of ``refs`` are zeros); (None, None) when no frame has references."""
    per_frame = [store.refs_for(st.index, st.step) for st in frames]
    template = next((r for r in per_frame if r is not None), None)
    if template is None:
        return None, None
    self_ref = None
    if any(r is None for r in per_frame):
        zeros = [torch.zeros_like(t) for t in template]
        self_ref = torch.zeros(2 * len(frames), device=device)
        for i, r in enumerate(per_frame):
            if r is None:
                self_ref[2 * i : 2 * i + 2].fill_(1.0)  # a fill on the device, not a copy from the host
        per_frame = [zeros if r is None else r for r in per_frame]
    return [torch.cat([r[k] for r in per_frame]) for k in range(len(template))], self_ref  # type: ignore[index]


def _step_call(frames: list[FrameState], ctx: EditContext, backend: Backend, needs_grad: bool) -> None:
    """One UNet call for ``frames`` and their DDIM step (and guided update). Nothing here reads
    a value back from the device or copies one to it (tests/test_edit_cuda.py checks on CUDA)."""
    sched, cfg, store, device = ctx.schedule, ctx.cfg, ctx.store, backend.device
    # 1. Inputs: x_t [F,4,h,w] fp32 (the leaf of a differentiable call), step indices made on the device
    idx = sched.index([st.step for st in frames], device)  # [F]
    x = torch.cat([st.latent for st in frames]).to(device)
    if needs_grad:
        x = x.detach().requires_grad_(True)
    refs, self_ref = _references(frames, store, device)
    with torch.set_grad_enabled(needs_grad):
        # 2. UNet: both CFG branches of every frame in one call
        eps_all, feats = _unet(frames, ctx, backend, x, idx, refs, self_ref, needs_grad)
        # 3. Guidance: CFG, fp32
        eps_u, eps_c = eps_all[0::2], eps_all[1::2]
        eps = eps_u + cfg.guidance_scale * (eps_c - eps_u)
        # 4. DDIM step: x_{t-1} and x0-hat
        x_prev, x0 = sched.step(x, eps, idx)
        # 5. Guided update (eq. 1) of the frames i > 1 within the first update steps
        guided = [is_guided(cfg, st) for st in frames]
        if any(guided):
            half = needs_grad and backend.dtype == torch.float16  # its backward pass needs g scaled
            update = guided_update(x, x0, _previous_x0(frames, guided, x0, store, device), x_prev, ctx.delta,
                                   through_unet=needs_grad, half=half, guidance_scale=cfg.guidance_scale,
                                   abar=sched.abar_at(idx) if half else None)
            update.record([st.step for st in frames], guided, ctx.stats.update_rms, ctx.stats.detached_rms)
            x_prev = update.x_prev
    # 6. Commit: features, x0-hat and x_{t-1} into the store and the frames
    ctx.stats.count_call(2 * len(frames), xframe=refs is not None, backward=needs_grad)
    commit(frames, store, feats, x0.detach(), x_prev.detach(), clone=backend.transient_outputs)
    ctx.stats.peak_feature_bytes = store.peak_bytes


def _unet(frames: list[FrameState], ctx: EditContext, backend: Backend, x: torch.Tensor, idx: torch.Tensor,
          refs: Features | None, self_ref: torch.Tensor | None,
          needs_grad: bool) -> tuple[torch.Tensor, Sequence[torch.Tensor]]:
    """The call's 2F samples [uncond_1, cond_1, ...] through the UNet: eps [2F,4,h,w] fp32 and the
    9 decoder features; differentiable (through ``unet_forward``) when ``needs_grad``."""
    depth = torch.cat([st.depth for st in frames]).to(backend.device)
    sample = per_branch(torch.cat([x, depth], dim=1))  # [2F,5,h,w]
    t = per_branch(ctx.schedule.timesteps_at(idx))  # [2F]
    ehs = ctx.embeddings.repeat(len(frames), 1, 1)  # [2F,77,D]
    if not needs_grad:
        return backend.unet(sample, t, ehs, refs, self_ref)
    out = backend.unet_forward(sample, t, ehs, refs, self_ref)  # type: ignore[attr-defined]
    backend.counter.unet_backward += 1
    return out[0].float(), list(out[1:])


def _previous_x0(frames: list[FrameState], guided: list[bool], x0: torch.Tensor, store: FeatureStore,
                 device: torch.device) -> torch.Tensor:
    """What each frame's x0-hat is compared with [F,4,h,w]: its predecessor's at the same step.
    Every row is updated; an unguided row compares x0 with itself: zero gradient, so the batch
    needs no row gather (whose indices would be a copy from the host)."""
    return torch.cat([store.x0_prev(st.index, st.step).to(device) if g else x0[i : i + 1].detach()
                      for i, (st, g) in enumerate(zip(frames, guided, strict=True))])


def commit(frames: list[FrameState], store: FeatureStore, feats: Sequence[torch.Tensor], x0: torch.Tensor,
           x_prev: torch.Tensor, clone: bool = False) -> None:
    """A call's results into the frames and the store, in frame order: ``feats`` 9 x [2F, N_k,
    C_k], ``x0`` and ``x_prev`` [F, 4, h, w]. What is kept is copied out of the batched outputs
    (:func:`owned`): a row kept as a view would keep the whole batch tensor alive, every layer's
    features of every frame of the call, for as long as the row is stored. ``clone``: the backend
    reuses its output buffers (CUDA graphs), so even a call's only row is copied out of them."""
    for i, st in enumerate(frames):
        own: Features = []
        if store.wants_features(st.index):
            own = [owned(f[2 * i : 2 * i + 2], copy=clone) for f in feats]
        store.used(st.index, st.step)
        store.put(st.index, st.step, own, owned(x0[i : i + 1]))
        st.latent = owned(x_prev[i : i + 1])
        st.step += 1


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


def wavefront(
    ctx: EditContext, initial: Iterator[FrameState], on_step=None, max_in_flight: int | None = None
) -> Iterator[FrameState]:
    """Exact wavefront schedule: frame i at step s needs only (i-1, s) and (i, s-1), so every
    tick advances each ready frame one step, all in one batched UNet call (two when the
    ``autograd`` update needs a differentiable one). Frames finish, and are yielded, in order;
    at most ``max_in_flight`` frames hold state at once. The result equals :func:`sequential`
    up to float reassociation."""

    def tick(ready: list[FrameState]) -> None:
        run_step(ready, ctx)
        if on_step is not None:
            on_step(len(ready))

    return wavefront_ticks(initial, ctx.schedule.steps, max_in_flight or DEFAULT_WAVEFRONT_FRAMES, tick)


def run_schedule(ctx: EditContext, initial: Iterator[FrameState], on_step=None) -> Iterator[FrameState]:
    """The edit loop that ``ctx.cfg.schedule`` names; yields finished frames in order."""
    if ctx.cfg.schedule == "wavefront":
        return wavefront(ctx, initial, on_step=on_step, max_in_flight=ctx.cfg.batch_frames)
    return sequential(ctx, initial, on_step=on_step)
