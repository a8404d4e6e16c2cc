"""Guided latent update (eq. 1): autograd vs finite differences, detached closed form, off."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel

from p2v_fast.config import EditConfig
from p2v_fast.method.ddim import DDIMSchedule
from p2v_fast.method.edit import EditContext, EditStats, FeatureStore, FrameState, run_step
from p2v_fast.method.latent_update import autograd_gradient, consistency_energy, detached_gradient
from p2v_fast.nets.attention import UNetWithFeatures
from p2v_fast.nets.backends import TorchBackend
from p2v_fast.weights.tiny import SCHEDULER_CONFIG, TEXT_HIDDEN, UNET_CONFIG

H, W = 8, 8


@pytest.fixture(scope="module")
def unet64() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(**UNET_CONFIG).eval().double().requires_grad_(False)


@pytest.fixture(scope="module")
def schedule() -> DDIMSchedule:
    return DDIMSchedule(DDIMScheduler(**SCHEDULER_CONFIG), 10)


def _ehs(dtype=torch.float64) -> torch.Tensor:
    return torch.randn(2, 77, TEXT_HIDDEN, generator=torch.Generator().manual_seed(3), dtype=dtype)


def test_autograd_gradient_matches_finite_differences(unet64, schedule) -> None:
    wrapper = UNetWithFeatures(unet64)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, H, W, generator=g, dtype=torch.float64)
    depth = torch.rand(1, 1, H, W, generator=g, dtype=torch.float64) * 2 - 1
    x0_prev = torch.randn(1, 4, H, W, generator=g, dtype=torch.float64)
    ehs = _ehs()
    _, *feats = wrapper(torch.cat([x, depth], 1).repeat(2, 1, 1, 1), torch.tensor([500, 500]), ehs)
    refs = [torch.cat([f, f.flip(1)], 1) for f in feats]  # fixed, detached references
    idx = torch.tensor([2])

    def energy(x_t: torch.Tensor) -> torch.Tensor:
        sample = torch.cat([x_t, depth], 1).repeat(2, 1, 1, 1)
        eps_all = wrapper(sample, schedule.timesteps[idx].repeat(2), ehs, *refs)[0]
        eps = eps_all[0:1] + 7.5 * (eps_all[1:2] - eps_all[0:1])
        return schedule.x0(x_t, eps, idx), eps

    leaf = x.clone().requires_grad_(True)
    x0, _ = energy(leaf)
    grad = autograd_gradient(leaf, x0, x0_prev)
    for k in range(3):
        v = torch.randn(x.shape, generator=torch.Generator().manual_seed(10 + k), dtype=torch.float64)
        h = 1e-5
        gp = consistency_energy(energy(x + h * v)[0], x0_prev)
        gm = consistency_energy(energy(x - h * v)[0], x0_prev)
        fd = float((gp - gm) / (2 * h))
        assert fd == pytest.approx(float((grad * v).sum()), rel=1e-5, abs=1e-9)
    # The Jacobian of the UNet and the 1/sqrt(abar) factor make it differ from the detached form.
    assert not torch.allclose(grad, detached_gradient(x0.detach(), x0_prev))


def test_detached_gradient_is_the_closed_form() -> None:
    x0 = torch.randn(2, 4, H, W, dtype=torch.float64, requires_grad=True)
    x0_prev = torch.randn(2, 4, H, W, dtype=torch.float64)
    (auto,) = torch.autograd.grad(consistency_energy(x0, x0_prev).sum(), x0)
    torch.testing.assert_close(detached_gradient(x0.detach(), x0_prev), auto)
    torch.testing.assert_close(detached_gradient(x0.detach(), x0_prev), 2 * (x0.detach() - x0_prev) / (4 * H * W))


def _context(mode: str, schedule: DDIMSchedule, dtype: torch.dtype = torch.float32) -> EditContext:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**UNET_CONFIG).eval().requires_grad_(False).to(dtype)
    models = SimpleNamespace(unet=unet, device=torch.device("cpu"), dtype=dtype,
                             vae=SimpleNamespace(config=SimpleNamespace(scaling_factor=0.18215)))
    backend = TorchBackend(models)
    cfg = EditConfig(steps=schedule.steps, update_steps=5, latent_update=mode, refs="anchor+prev")
    return EditContext(cfg, backend, backend, schedule, _ehs(dtype), FeatureStore(cfg, 3), 100.0, EditStats())


@pytest.mark.parametrize("mode", ["off", "detached", "autograd"])
def test_run_step_applies_the_update_of_each_mode(mode, schedule) -> None:
    ctx = _context(mode, schedule)
    g = torch.Generator().manual_seed(5)
    x_anchor, x_1 = torch.randn(1, 4, H, W, generator=g), torch.randn(1, 4, H, W, generator=g)
    depth = torch.rand(1, 1, H, W, generator=g) * 2 - 1
    anchor = FrameState(0, x_anchor, depth)
    run_step([anchor], ctx)  # stores the anchor's features and x0 for step 0
    if mode == "off":
        assert ctx.store.x0 == {}  # nothing kept for an update that never happens
    else:
        x0_anchor = ctx.store.x0[(0, 0)].clone()
    refs = ctx.store.refs_for(1, 0)  # prev of frame 1 is the anchor: nothing popped

    # Expected: plain DDIM step with the same references, then the mode's update.
    sample = torch.cat([x_1, depth], 1).repeat(2, 1, 1, 1)
    with torch.no_grad():
        eps_all, _ = ctx.backend.unet(sample, schedule.timesteps[:1].repeat(2), ctx.embeddings, refs)
    eps = eps_all[0:1] + 7.5 * (eps_all[1:2] - eps_all[0:1])
    plain, x0 = schedule.step(x_1, eps, torch.tensor([0]))

    frame = FrameState(1, x_1.clone(), depth)
    run_step([frame], ctx)
    if mode == "off":
        torch.testing.assert_close(frame.latent, plain)
    elif mode == "detached":
        torch.testing.assert_close(frame.latent, plain - 100.0 * 2 * (x0 - x0_anchor) / x0.numel())
    else:
        assert not torch.allclose(frame.latent, plain)
        assert ctx.backend.counter.unet_backward == 1
        assert ctx.stats.update_rms[0][0] > 0
    assert frame.step == 1
    assert (0, 0) not in ctx.store.x0  # consumed


def test_no_update_after_update_steps(schedule) -> None:
    ctx = _context("detached", schedule)
    ctx = EditContext(ctx.cfg.replace(update_steps=0), ctx.backend, ctx.grad_backend, schedule, ctx.embeddings,
                      FeatureStore(ctx.cfg.replace(update_steps=0), 3), 100.0, EditStats())
    depth = torch.zeros(1, 1, H, W)
    run_step([FrameState(0, torch.randn(1, 4, H, W), depth)], ctx)
    run_step([FrameState(1, torch.randn(1, 4, H, W), depth)], ctx)
    assert ctx.stats.update_rms == {}


def _tiny_gradient(models, schedule, step: int, diff: float, scaled: bool) -> torch.Tensor:
    """dg/dx_t at ``step`` for 2 frames of the tiny model in ``models``' dtype, with x0_prev =
    x0 + ``diff`` x noise (the size of g's gradient follows ``diff``)."""
    from p2v_fast.method.edit import per_branch
    from p2v_fast.method.latent_update import loss_scale

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, H, W, generator=g).requires_grad_(True)
    depth = torch.rand(2, 1, H, W, generator=g) * 2 - 1
    idx = schedule.index([step, step], "cpu")
    out = TorchBackend(models).unet_forward(per_branch(torch.cat([x, depth], 1)),
                                            per_branch(schedule.timesteps_at(idx)), _ehs(torch.float32).repeat(2, 1, 1))
    eps_all = out[0].float()
    eps = eps_all[0::2] + 7.5 * (eps_all[1::2] - eps_all[0::2])
    _, x0 = schedule.step(x, eps, idx)
    x0_prev = x0.detach() + diff * torch.randn(x0.shape, generator=g)
    scale = None
    if scaled:
        abar = schedule.abar_at(idx)
        scale = loss_scale(x0, x0_prev, 7.5 * ((1 - abar) / abar).sqrt())
    return autograd_gradient(x, x0, x0_prev, scale)


@pytest.mark.parametrize("diff", [1.0, 1e-4])
def test_fp16_gradient_matches_fp32_with_loss_scaling(tiny_dir, diff) -> None:
    """The autograd update's gradient through the fp16 UNet against fp32's, on the tiny model
    (fp16 weights = the fp32 ones, cast). Small differences between frames (diff 1e-4 here; at
    512x512, with 64x more latent elements, 1e-2 is as small) put the unscaled fp16 gradient in
    fp16's subnormals: ~20 % off. Scaled by a power of two, it stays at fp16's own ~0.6 %."""
    from p2v_fast.weights.models import load_models

    schedule = DDIMSchedule(load_models("tiny").scheduler, 50)
    ref = _tiny_gradient(load_models("tiny"), schedule, 10, diff, scaled=False)
    half = load_models("tiny", dtype=torch.float16)
    err = lambda g: float((g - ref).norm() / ref.norm())  # noqa: E731
    scaled = err(_tiny_gradient(half, schedule, 10, diff, scaled=True))
    assert scaled < 2e-2
    if diff < 1e-2:
        assert err(_tiny_gradient(half, schedule, 10, diff, scaled=False)) > 5e-2  # what the scaling fixes


def test_the_fp16_edit_scales_its_gradient(tiny_dir, monkeypatch) -> None:
    """An autograd step through an fp16 backend takes the scaled path (and an fp32 one does not)."""
    from p2v_fast.method import edit as edit_module
    from p2v_fast.method import latent_update
    from p2v_fast.weights.models import load_models
    from tests.helpers import make_context, random_frames

    used: list[torch.dtype] = []
    real = latent_update.loss_scale
    monkeypatch.setattr(latent_update, "loss_scale", lambda *a: used.append(a[0].dtype) or real(*a))
    cfg = EditConfig(prompt="a swan", model="tiny", steps=2, latent_update="autograd")
    for dtype in (torch.float32, torch.float16):
        ctx = make_context(cfg, load_models("tiny", dtype=dtype), 2)
        out = list(edit_module.sequential(ctx, iter(random_frames(2))))
        assert bool(torch.isfinite(out[1].latent).all())
    assert used == [torch.float32]  # once: the fp16 edit's one guided step (x0 is fp32 either way)


def test_alpha_bar_is_read_for_the_fp16_loss_scale_only(tiny_dir, monkeypatch) -> None:
    """The guided update reads alpha-bar (an extra gather on the device) only where the fp16 loss
    scale needs it: an fp32 autograd edit's steps read none, an fp16 one's guided step does."""
    from p2v_fast.method import edit as edit_module
    from p2v_fast.weights.models import load_models
    from tests.helpers import make_context, random_frames

    reads: list[torch.dtype] = []
    real = DDIMSchedule.abar_at
    monkeypatch.setattr(DDIMSchedule, "abar_at", lambda self, idx: reads.append(dtype) or real(self, idx))
    cfg = EditConfig(prompt="a swan", model="tiny", steps=2, latent_update="autograd")
    for dtype in (torch.float32, torch.float16):
        ctx = make_context(cfg, load_models("tiny", dtype=dtype), 2)
        list(edit_module.sequential(ctx, iter(random_frames(2))))
    assert reads and set(reads) == {torch.float16}


def test_the_autograd_step_follows_the_finite_difference_gradient_through_the_unet(schedule) -> None:
    """The edit's autograd step (run_step, fp64 tiny UNet) moves x_{t-1} by delta x dg/dx_t with
    g taken through the UNet: checked against central differences of g along random directions.
    The detached form (what a mode mix-up would apply) is far from it."""
    ctx = _context("autograd", schedule, torch.float64)
    g = torch.Generator().manual_seed(5)
    x_anchor, x_1 = (torch.randn(1, 4, H, W, generator=g, dtype=torch.float64) for _ in range(2))
    depth = torch.rand(1, 1, H, W, generator=g, dtype=torch.float64) * 2 - 1
    run_step([FrameState(0, x_anchor, depth)], ctx)
    x0_anchor = ctx.store.x0[(0, 0)].clone()
    refs = ctx.store.refs_for(1, 0)
    idx = torch.tensor([0])

    def x0_of(x_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sample = torch.cat([x_t, depth], 1).repeat(2, 1, 1, 1)
        with torch.no_grad():
            eps_all, _ = ctx.backend.unet(sample, schedule.timesteps[:1].repeat(2), ctx.embeddings, refs)
        eps = eps_all[0:1] + 7.5 * (eps_all[1:2] - eps_all[0:1])
        return schedule.step(x_t, eps, idx)

    plain, x0 = x0_of(x_1)
    frame = FrameState(1, x_1.clone(), depth)
    run_step([frame], ctx)
    grad = (plain - frame.latent) / ctx.delta  # what the step applied, as a gradient
    for k in range(3):
        v = torch.randn(x_1.shape, generator=torch.Generator().manual_seed(10 + k), dtype=torch.float64)
        h = 1e-3  # the backend returns eps in fp32: a smaller step would difference its rounding
        fd = (consistency_energy(x0_of(x_1 + h * v)[1], x0_anchor) -
              consistency_energy(x0_of(x_1 - h * v)[1], x0_anchor)) / (2 * h)
        assert float(fd) == pytest.approx(float((grad * v).sum()), rel=1e-3)
    detached = detached_gradient(x0, x0_anchor)
    assert float((grad - detached).norm()) > 0.5 * float(detached.norm())


@pytest.mark.parametrize("mode", ["detached", "autograd"])
def test_the_third_frame_is_guided_toward_the_previous_frames_x0_not_the_anchors(mode, schedule) -> None:
    """Frame 3's update compares its x0-hat with frame 2's (its predecessor), not the anchor's.
    detached: its latent is the closed form against frame 2's x0-hat; autograd: the detached
    form recorded beside it at the same latents (``detached_rms``) is against frame 2's."""
    ctx = _context(mode, schedule, torch.float64)
    g = torch.Generator().manual_seed(7)
    xs = [torch.randn(1, 4, H, W, generator=g, dtype=torch.float64) for _ in range(3)]
    depth = torch.rand(1, 1, H, W, generator=g, dtype=torch.float64) * 2 - 1
    run_step([FrameState(0, xs[0], depth)], ctx)
    x0_anchor = ctx.store.x0[(0, 0)].clone()
    run_step([FrameState(1, xs[1], depth)], ctx)
    x0_prev = ctx.store.x0[(1, 0)].clone()
    assert float((x0_prev - x0_anchor).abs().max()) > 1e-2  # the two targets differ
    refs = ctx.store.refs_for(2, 0)
    sample = torch.cat([xs[2], depth], 1).repeat(2, 1, 1, 1)
    with torch.no_grad():
        eps_all, _ = ctx.backend.unet(sample, schedule.timesteps[:1].repeat(2), ctx.embeddings, refs)
    eps = eps_all[0:1] + 7.5 * (eps_all[1:2] - eps_all[0:1])
    plain, x0 = schedule.step(xs[2], eps, torch.tensor([0]))
    frame = FrameState(2, xs[2].clone(), depth)
    run_step([frame], ctx)
    toward = {name: ctx.delta * detached_gradient(x0, target) for name, target in
              (("prev", x0_prev), ("anchor", x0_anchor))}
    rms = {name: float(u.pow(2).mean().sqrt()) for name, u in toward.items()}
    assert abs(rms["prev"] - rms["anchor"]) > 1e-3 * rms["prev"]
    if mode == "detached":
        torch.testing.assert_close(frame.latent, plain - toward["prev"])
        assert float(ctx.stats.update_rms[0][-1]) == pytest.approx(rms["prev"], rel=1e-9)
    else:
        assert float(ctx.stats.detached_rms[0][-1]) == pytest.approx(rms["prev"], rel=1e-9)


def test_guided_update_is_a_calls_whole_update() -> None:
    """latent_update.guided_update holds which gradient, the fp16 loss scale and the record:
    detached, x_{t-1} - delta 2 (x0 - x0_prev) / N; autograd, the gradient through what made x0
    from x_t (here x0 = 2 x_t: twice the detached one), with the detached form's RMS beside it,
    unchanged by the loss scale; the record keeps the guided frames only, per step."""
    from p2v_fast.method.latent_update import guided_update

    g = torch.Generator().manual_seed(3)
    x_t = torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    x0_prev, x_prev = (torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64) for _ in range(2))
    x0 = 2 * x_t
    closed = detached_gradient(x0.detach(), x0_prev)
    plain = guided_update(x_t, x0.detach(), x0_prev, x_prev, 10.0, through_unet=False)
    torch.testing.assert_close(plain.x_prev, x_prev - 10.0 * closed)
    assert plain.detached_rms is None
    rms = (10.0 * closed).pow(2).flatten(1).mean(1).sqrt()
    abar = torch.tensor([0.9, 0.5], dtype=torch.float64)
    for half in (False, True):
        up = guided_update(x_t, 2 * x_t, x0_prev, x_prev, 10.0, through_unet=True, half=half, guidance_scale=7.5,
                           abar=abar)
        torch.testing.assert_close(up.x_prev, x_prev - 10.0 * 2 * closed)
        torch.testing.assert_close(up.rms, 2 * rms)
        assert up.detached_rms is not None
        torch.testing.assert_close(up.detached_rms, rms)
    update_rms: dict[int, list[torch.Tensor]] = {}
    detached_rms: dict[int, list[torch.Tensor]] = {}
    up.record([4, 4], [False, True], update_rms, detached_rms)
    assert list(update_rms) == [4] and len(update_rms[4]) == 1 and float(update_rms[4][0]) == float(2 * rms[1])
    assert list(detached_rms) == [4] and float(detached_rms[4][0]) == float(rms[1])
