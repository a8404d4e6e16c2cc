"""Wavefront schedule == sequential schedule; fewer, larger UNet calls; bounded memory."""

from __future__ import annotations

import copy

import pytest
import torch

from p2v_fast.config import EditConfig
from p2v_fast.method.edit import sequential, wavefront
from tests.helpers import make_context, random_frames


@pytest.fixture(scope="module")
def models64(tiny_dir):
    """The tiny set in float64: float reassociation in batched calls is then ~1e-16, so
    schedule equality is tested exactly rather than through chaotic fp32 noise (random weights
    plus delta-scaled gradients amplify 1e-7 differences across frames)."""
    from p2v_fast.weights.models import load_models

    return load_models("tiny", dtype=torch.float64)


def _run(models, cfg, n, schedule, cap=None):
    ctx = make_context(cfg, models, n)
    frames = copy.deepcopy(random_frames(n))
    if schedule == "sequential":
        out = list(sequential(ctx, iter(frames)))
    else:
        out = list(wavefront(ctx, iter(frames), max_in_flight=cap))
    assert [st.index for st in out] == list(range(n))
    return torch.cat([st.latent for st in out]), ctx


@pytest.mark.parametrize("mode", ["autograd", "detached", "off"])
@pytest.mark.parametrize(("n", "cap"), [(1, None), (4, None), (6, 2)])
def test_wavefront_equals_sequential(models64, mode, n, cap) -> None:
    cfg = EditConfig(prompt="a swan", model="tiny", steps=6, latent_update=mode)
    seq, ctx_s = _run(models64, cfg, n, "sequential")
    wav, ctx_w = _run(models64, cfg, n, "wavefront", cap)
    torch.testing.assert_close(wav, seq, rtol=1e-9, atol=1e-9)
    assert ctx_w.store.feats == {} and ctx_w.store.x0 == {}  # everything but the anchor's was consumed
    assert ctx_s.stats.mean_update_rms() == pytest.approx(ctx_w.stats.mean_update_rms())


def test_wavefront_fp32_matches_without_update(tiny_models) -> None:
    cfg = EditConfig(prompt="a swan", model="tiny", steps=6, latent_update="off")
    seq, _ = _run(tiny_models, cfg, 4, "sequential")
    wav, _ = _run(tiny_models, cfg, 4, "wavefront")
    torch.testing.assert_close(wav, seq, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", ["detached", "autograd"])
def test_unet_calls_drop_to_frames_plus_steps(tiny_models, mode) -> None:
    steps, n = 6, 5
    cfg = EditConfig(prompt="a swan", model="tiny", steps=steps, latent_update=mode)
    _, ctx_s = _run(tiny_models, cfg, n, "sequential")
    _, ctx_w = _run(tiny_models, cfg, n, "wavefront")
    assert ctx_s.backend.counter.unet_calls == n * steps
    ticks = steps + n - 1
    # one call per tick, the anchor's samples included (self_ref); with autograd, ticks that hold
    # both guided and unguided frames make one differentiable call and one plain call.
    calls = ctx_w.backend.counter.unet_calls
    if mode == "detached":
        assert calls == ticks
    else:
        assert ticks < calls <= 2 * ticks
    assert calls < n * steps
    assert ctx_w.backend.counter.unet_samples == ctx_s.backend.counter.unet_samples == 2 * n * steps


def test_wavefront_memory_is_bounded(tiny_models) -> None:
    cfg = EditConfig(prompt="a swan", model="tiny", steps=6, latent_update="detached")
    peaks = []
    for n in (6, 10):
        _, ctx = _run(tiny_models, cfg, n, "wavefront", cap=3)
        peaks.append(ctx.stats.peak_feature_bytes)
    assert peaks[0] == peaks[1]


@pytest.mark.parametrize(("mode", "refs", "n", "cap"), [
    ("detached", "anchor+prev", 7, 3), ("autograd", "anchor+prev", 6, 2), ("off", "prev", 5, None),
    ("autograd", "anchor", 5, 4)])
def test_plan_simulates_the_real_wavefront(tiny_models, mode, refs, n, cap) -> None:
    """p2v_fast.method.plan runs the edit loop's code on shape-only tensors: its ticks, calls and peak
    stored bytes are the real edit's (memory splitting off, as the plan assumes)."""
    from p2v_fast.method.plan import simulate_wavefront
    from p2v_fast.nets.attention import feature_shapes
    from p2v_fast.nets.memory import CallBudget

    cfg = EditConfig(prompt="a swan", model="tiny", steps=6, latent_update=mode, refs=refs, batch_frames=cap)
    ctx = make_context(cfg, tiny_models, n)
    ctx.budget = CallBudget(torch.device("cpu"), measurable=False)
    ticks: list[int] = []
    list(wavefront(ctx, iter(random_frames(n)), on_step=ticks.append, max_in_flight=cap))
    plan = simulate_wavefront(cfg, n, feature_shapes(tiny_models.unet, (8, 8)), tiny_models.dtype, (8, 8))
    assert (plan.ticks, plan.frame_steps) == (len(ticks), sum(ticks))
    assert plan.calls == ctx.backend.counter.unet_calls
    assert plan.peak_feature_bytes == ctx.stats.peak_feature_bytes > 0
    assert plan.largest_call <= (cap or 16)


def test_plan_at_sd2_sizes_is_what_the_docs_state() -> None:
    """docs/performance.md, "The wavefront schedule": a 60-frame, 50-step edit at 512x512 fp16 with the
    default cap of 16 takes 211 ticks (336 calls with autograd), not "n + T", and its stored
    features peak at the anchor's 50 steps plus ~50 frame-steps (2.75 GB), whatever the cap."""
    from benchmarks.plan import plan_report

    report = plan_report(60, 50, 512, "fp16", caps=(4, 16, 50))
    plans = {(p["latent_update"], p["cap"]): p for p in report["plans"]}
    assert plans[("detached", 16)]["ticks"] == plans[("autograd", 16)]["ticks"] == 211
    assert (plans[("detached", 16)]["calls"], plans[("autograd", 16)]["calls"]) == (211, 336)
    assert (plans[("detached", 4)]["ticks"], plans[("detached", 50)]["ticks"]) == (753, 60 + 50 - 1)
    step = plans[("detached", 16)]["feature_step_bytes"]
    assert step == 2 * 2 * 3 * (256 * 1280 + 1024 * 640 + 4096 * 320)  # 27.5 MB: both branches, 9 layers, fp16
    for p in plans.values():
        assert p["anchor_feature_bytes"] == 50 * step
        assert 49 <= p["peak_stored_steps"] <= 51  # ~T frame-steps stored beside the anchor, whatever the cap
        assert abs(p["peak_feature_bytes"] - 2.754e9) < 0.01e9
