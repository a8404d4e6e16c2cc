"""DDIM inversion: reconstruction, the on-disk cache, batched == per-frame."""

from __future__ import annotations

import pytest
import torch

from p2v_fast.config import EditConfig
from p2v_fast.media.clip_selection import select_clip
from p2v_fast.method.ddim import DDIMSchedule
from p2v_fast.method.inversion import invert_clip
from p2v_fast.nets.backends import TorchBackend
from p2v_fast.progress import NullProgress
from p2v_fast.weights.prompts import encode_prompt
from tests.helpers import sample_clip


def _invert(models, clip, cache, steps=20, batch=1, check=False, **kw):
    cfg = EditConfig(model="tiny", size=64, steps=steps, source_prompt="a clip", cache_dir=cache, **kw)
    backend = TorchBackend(models)
    sel = select_clip(clip, cfg)
    return invert_clip(cfg, sel, models, backend, "a clip", batch=batch, check=check), backend, cfg


def _round_trip_error(models, clip, cache, steps) -> float:
    inv, backend, _ = _invert(models, clip, cache, steps=steps)
    schedule = DDIMSchedule(models.scheduler, steps)
    cond = encode_prompt(models, "a clip")
    d = inv.load(0)
    x = d["x_T"]
    with torch.no_grad():
        for s in range(steps):
            idx = torch.tensor([s])
            eps, _ = backend.unet(torch.cat([x, d["depth"]], 1), schedule.timesteps[idx], cond)
            x, _ = schedule.step(x, eps, idx)
    # error relative to how far inversion moved the latent
    return float((x - d["x_0"]).norm() / (d["x_T"] - d["x_0"]).norm())


def test_reconstruction_from_the_inverted_latent(tiny_models, tmp_path) -> None:
    """Denoising x_T with the source prompt (guidance 1) gives back x_0.

    DDIM inversion uses eps(x_t) in place of eps(x_{t+1}), so it is exact only as the step size
    goes to 0: a first-order error. A trained UNet is smooth and SD round trips at 50 steps are
    close; the random tiny UNet is rough (large Lipschitz constant), so its round trip error is
    0.716 of the distance travelled at 50 steps, 0.488 at 100, 0.249 at 200 and 0.019 at 400
    (fp32 and fp64 alike: the discretisation, not rounding). The test checks what makes the
    implementation right: the error falls at least like a first-order method (4x the steps,
    < 1/2.5 the error) and is well under the distance travelled at 200 steps. (The bound there
    was 0.25, 0.4 % above the error itself, so any change of the clip or the model failed it.)
    """
    clip = sample_clip(tmp_path, n_frames=1)
    err50 = _round_trip_error(tiny_models, clip, tmp_path / "cache", 50)
    err200 = _round_trip_error(tiny_models, clip, tmp_path / "cache", 200)
    assert err200 < err50 / 2.5, (err50, err200)
    assert err200 < 0.4, err200


@pytest.mark.slow
def test_reconstruction_converges_with_more_steps(tiny_models, tmp_path) -> None:
    """At 400 steps the tiny model's round trip is within 10 % of the distance travelled
    (measured 0.019, see above)."""
    clip = sample_clip(tmp_path, n_frames=1)
    assert _round_trip_error(tiny_models, clip, tmp_path / "cache", 400) < 0.1


def test_cache_hit_does_no_unet_work(tiny_models, tmp_path) -> None:
    clip = sample_clip(tmp_path, n_frames=3)
    first, backend, _ = _invert(tiny_models, clip, tmp_path / "cache", steps=5)
    assert not first.cache_hit
    assert backend.counter.unet_calls == 3 * 5
    assert backend.counter.unet_samples == 3 * 5  # conditional branch only
    again, backend2, _ = _invert(tiny_models, clip, tmp_path / "cache", steps=5)
    assert again.cache_hit and again.root == first.root
    assert backend2.counter.unet_calls == 0 and backend2.counter.vae_encode == 0
    # anything the result depends on gives another key
    other, _, _ = _invert(tiny_models, clip, tmp_path / "cache", steps=4)
    assert other.root != first.root


def test_batched_inversion_equals_per_frame(tiny_models, tmp_path) -> None:
    clip = sample_clip(tmp_path, n_frames=3)
    one, _, _ = _invert(tiny_models, clip, tmp_path / "c1", steps=5, batch=1)
    three, backend, _ = _invert(tiny_models, clip, tmp_path / "c3", steps=5, batch=3)
    assert backend.counter.unet_calls == 5
    for i in range(3):
        torch.testing.assert_close(three.load(i)["x_T"], one.load(i)["x_T"], rtol=1e-4, atol=1e-4)


def test_default_inversion_measures_one_frame_then_batches_what_fits(tiny_models, tmp_path) -> None:
    """No --invert-batch: one call of 1 frame and one of 2 at the first step are measured (and
    discarded), then every frame runs together (the tiny model fits many times over); same
    latents as per-frame."""
    clip = sample_clip(tmp_path, n_frames=3)
    one, _, _ = _invert(tiny_models, clip, tmp_path / "c1", steps=5, batch=1)
    auto, backend, _ = _invert(tiny_models, clip, tmp_path / "ca", steps=5, batch=None)
    assert backend.counter.unet_calls == 2 + 5 and backend.counter.unet_samples == 1 + 2 + 3 * 5
    for i in range(3):
        torch.testing.assert_close(auto.load(i)["x_T"], one.load(i)["x_T"], rtol=1e-4, atol=1e-4)


class _OneFrameDevice(TorchBackend):
    """Runs out of memory on any call of more than one sample."""

    refused = 0

    def unet(self, sample, timestep, encoder_hidden_states, refs=None, self_ref=None):
        if sample.shape[0] > 1:
            self.refused += 1
            raise torch.OutOfMemoryError("CUDA out of memory")
        return super().unet(sample, timestep, encoder_hidden_states, refs, self_ref)


def test_inversion_out_of_memory_is_retried_smaller(tiny_models, tmp_path) -> None:
    from p2v_fast.nets.memory import CallBudget

    clip = sample_clip(tmp_path, n_frames=3)
    one, _, _ = _invert(tiny_models, clip, tmp_path / "c1", steps=5, batch=1)
    cfg = EditConfig(model="tiny", size=64, steps=5, source_prompt="a clip", cache_dir=tmp_path / "co")
    backend = _OneFrameDevice(tiny_models)
    budget = CallBudget(backend.device, measurable=False)
    small = invert_clip(cfg, select_clip(clip, cfg), tiny_models, backend, "a clip", budget=budget, check=False)
    assert backend.refused == budget.ooms == 1
    for i in range(3):
        torch.testing.assert_close(small.load(i)["x_T"], one.load(i)["x_T"], rtol=1e-4, atol=1e-4)


def test_clip_depth_normalisation(tiny_models, tmp_path) -> None:
    clip = sample_clip(tmp_path, n_frames=3)
    per_frame, _, _ = _invert(tiny_models, clip, tmp_path / "c", steps=2)
    per_clip, _, _ = _invert(tiny_models, clip, tmp_path / "c", steps=2, depth_norm="clip")
    for i in range(3):
        d = per_frame.load(i)["depth"]
        assert float(d.min()) == -1.0 and float(d.max()) == 1.0
    clip_depths = torch.cat([per_clip.load(i)["depth"] for i in range(3)])
    assert float(clip_depths.min()) == -1.0 and float(clip_depths.max()) == 1.0


def test_reconstruction_error_is_measured_once_and_kept_in_the_cache(tiny_models, tmp_path) -> None:
    """On a miss, frame 1 is regenerated from its x_T (steps more batch-1 UNet calls, one decode
    of 2 latents) and the error recorded; a hit reads it back without UNet work."""
    clip = sample_clip(tmp_path, n_frames=2)
    first, backend, _ = _invert(tiny_models, clip, tmp_path / "cache", steps=6, check=True)
    assert backend.counter.unet_calls == 2 * 6 + 6 and backend.counter.vae_decode == 2
    rec = first.reconstruction
    assert rec is not None and first.runtime == backend.identity()
    # the same measure, computed here by hand
    schedule, d = DDIMSchedule(tiny_models.scheduler, 6), first.load(0)
    x = d["x_T"]
    with torch.no_grad():
        for s in range(6):
            idx = torch.tensor([s])
            eps, _ = backend.unet(torch.cat([x, d["depth"]], 1), schedule.timesteps[idx], encode_prompt(tiny_models,
                                                                                                         "a clip"))
            x, _ = schedule.step(x, eps, idx)
    expected = float((x - d["x_0"]).pow(2).mean().sqrt() / d["x_0"].pow(2).mean().sqrt())
    assert rec["latent_rel_rms"] == pytest.approx(expected, rel=1e-4)
    assert rec["psnr_db"] is not None and rec["psnr_db"] > 0
    again, backend2, _ = _invert(tiny_models, clip, tmp_path / "cache", steps=6, check=True)
    assert again.cache_hit and again.reconstruction == rec and backend2.counter.unet_calls == 0


@pytest.mark.parametrize("depth_norm", ["frame", "clip"])
def test_the_full_inversion_takes_frame_1_from_the_previews_entry(tiny_models, tmp_path, depth_norm) -> None:
    """Before: a preview's entry (frame 1 alone) never matched the full clip's key, so the edit
    after a preview inverted frame 1 again. Now it takes it (and its reconstruction error) and
    inverts the other frames, unless the depth is normalised over the clip, where frame 1's
    depth differs; the frame is the one a full inversion computes."""
    clip = sample_clip(tmp_path, n_frames=3)
    preview, _, _ = _invert(tiny_models, clip, tmp_path / "cache", steps=4, check=True, max_frames=1,
                            depth_norm=depth_norm)
    assert preview.n_frames == 1 and preview.reconstruction is not None
    logs: list[str] = []
    progress = NullProgress()
    progress.log = logs.append  # type: ignore[method-assign]
    cfg = EditConfig(model="tiny", size=64, steps=4, source_prompt="a clip", cache_dir=tmp_path / "cache",
                     depth_norm=depth_norm)
    backend = TorchBackend(tiny_models)
    full = invert_clip(cfg, select_clip(clip, cfg), tiny_models, backend, "a clip", batch=1, progress=progress)
    assert full.n_frames == 3 and not full.cache_hit and full.root != preview.root
    fresh, _, _ = _invert(tiny_models, clip, tmp_path / "fresh", steps=4, check=True, depth_norm=depth_norm)
    assert all(torch.equal(full.load(i)[k], fresh.load(i)[k]) for i in range(3) for k in ("x_T", "depth", "x_0"))
    if depth_norm == "frame":
        assert backend.counter.unet_calls == 2 * 4  # frames 2 and 3; no check (the preview measured frame 1)
        assert full.reconstruction == preview.reconstruction
        assert any("frame 1 from the preview's cache entry" in m for m in logs), logs
    else:
        assert backend.counter.unet_calls == 3 * 4 + 4  # every frame, and the check
        assert not any("preview" in m for m in logs), logs
    again, backend2, _ = _invert(tiny_models, clip, tmp_path / "cache", steps=4, check=True, depth_norm=depth_norm)
    assert again.cache_hit and again.root == full.root and backend2.counter.unet_calls == 0


def test_cache_key_covers_the_runtime_and_the_framing(tiny_models, tmp_path) -> None:
    from p2v_fast.media.clip_selection import frames_digest
    from p2v_fast.method.inversion_cache import cache_key

    clip = sample_clip(tmp_path, n_frames=1)
    cfg = EditConfig(model="tiny", size=64, steps=2)
    torch32 = {"backend": "torch", "dtype": "float32", "device": "cpu"}
    keys = set()
    for resize in ("crop", "stretch", "pad"):
        sel = select_clip(clip, cfg.replace(resize=resize))
        digest = frames_digest(sel)
        for runtime in (torch32, {**torch32, "dtype": "float16"}, {**torch32, "device": "cuda"},
                        {"backend": "onnxruntime", "dtype": "float32", "device": "cpu", "graphs": "a"},
                        {"backend": "onnxruntime", "dtype": "float32", "device": "cpu", "graphs": "b"}):
            keys.add(cache_key(cfg, tiny_models, digest, "a clip", runtime, sel))
    assert len(keys) == 15


@pytest.fixture(scope="module")
def bf16_models(tiny_dir):
    from p2v_fast.weights.models import load_models

    return load_models("tiny", dtype=torch.bfloat16)


def test_inversion_runs_in_fp32_by_default_whatever_the_edit_dtype(tiny_models, bf16_models, tmp_path) -> None:
    """A bf16 edit inverts in fp32 (on a copy of its weights, upcast): an entry of its own (its
    weights are bf16-rounded, not the fp32 model's), which a second bf16 edit reuses;
    --invert-dtype same inverts in bf16: another entry, far from an fp64 inversion of the same
    weights where the fp32 one is close."""
    from p2v_fast.nets.runtime import Runtime, models_in_dtype
    from p2v_fast.pipeline import invert_video

    clip = sample_clip(tmp_path, n_frames=2)
    cfg = EditConfig(model="tiny", size=64, steps=8, source_prompt="a clip", cache_dir=tmp_path / "cache")
    bf16 = Runtime(bf16_models, TorchBackend(bf16_models), None)
    bf16.grad_backend = bf16.backend
    first = invert_video(cfg, clip, runtime=bf16)
    assert not first.inverted.cache_hit and first.inverted.runtime["dtype"] == "float32"
    assert first.inverted.runtime["weights"] == "bfloat16"
    assert first.inverted.reconstruction is not None
    assert bf16.backend.counter.unet_calls == 0  # the fp32 copy did the work
    assert bf16_models.unet.dtype == torch.bfloat16  # the edit's weights are untouched
    again = invert_video(cfg, clip, runtime=Runtime(bf16_models, bf16.backend, bf16.backend))
    assert again.inverted.cache_hit and again.inverted.root == first.inverted.root
    fp32 = Runtime(tiny_models, TorchBackend(tiny_models), None)
    other = invert_video(cfg, clip, runtime=fp32)
    assert not other.inverted.cache_hit and other.inverted.runtime == fp32.backend.identity()
    same = invert_video(cfg.replace(invert_dtype="same"), clip, runtime=bf16)
    assert not same.inverted.cache_hit and same.inverted.runtime["dtype"] == "bfloat16"
    # 2 calls measuring memory at the first step (1 and 2 frames), 8 steps for both frames
    # together, 8 for the reconstruction check
    assert bf16.backend.counter.unet_calls == 2 + 8 + 8

    exact = TorchBackend(models_in_dtype(bf16_models, torch.float64))  # the same weights, in fp64
    ref = invert_clip(cfg, select_clip(clip, cfg), exact.models, exact, "a clip", check=False)

    def deviation(inv) -> float:
        return max(float((inv.load(i)["x_T"].double() - ref.load(i)["x_T"]).norm() / ref.load(i)["x_T"].norm())
                   for i in range(2))

    assert deviation(first.inverted) < deviation(same.inverted) / 10, (deviation(first.inverted),
                                                                       deviation(same.inverted))
