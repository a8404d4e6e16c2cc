"""`p2v edit --dry-run` (issue 26, item 8): the working size, frames, UNet calls and the GPU memory
an edit is expected to need, before (and without) loading anything."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from p2v_fast.config import EditConfig
from p2v_fast.method.estimate import architecture, count_edit, feature_shapes, plan_edit
from tests.helpers import one_line_error, p2v, sample_clip

GiB = 2**30


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return sample_clip(tmp_path_factory.mktemp("estimate"), n_frames=60, size=(96, 64), audio=False)


def test_sd2_depth_parameter_counts_are_its_configs() -> None:
    """The counts a hub model is weighed by are the published configs', built on the meta device."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, DPTConfig, DPTForDepthEstimation

    from p2v_fast.weights import sd2_depth as sd

    with torch.device("meta"):
        nets = {"unet": UNet2DConditionModel(**sd.SD2_DEPTH_UNET), "vae": AutoencoderKL(**sd.SD_VAE),
                "text_encoder": CLIPTextModel(CLIPTextConfig(**sd.OPENCLIP_VIT_H_TEXT)),
                "depth_estimator": DPTForDepthEstimation(DPTConfig(**sd.DPT_HYBRID_MIDAS))}
    assert {k: sum(p.numel() for p in m.parameters()) for k, m in nets.items()} == sd.PARAMETERS


@pytest.mark.parametrize("model", ["tiny", "mini", "sd2"])
@pytest.mark.parametrize("latent_hw", [(8, 8), (8, 14), (9, 5)])
def test_feature_shapes_from_the_config_are_the_built_unets(model: str, latent_hw) -> None:
    import torch
    from diffusers import UNet2DConditionModel

    from p2v_fast.nets.attention import feature_shapes as built_shapes

    config = architecture("stabilityai/stable-diffusion-2-depth" if model == "sd2" else model).unet
    with torch.device("meta"):
        unet = UNet2DConditionModel(**{k: v for k, v in config.items() if not k.startswith("_")})
    assert feature_shapes(config, latent_hw) == built_shapes(unet, latent_hw)


@pytest.mark.parametrize("mode", ["autograd", "detached", "off"])
@pytest.mark.parametrize("refs", ["anchor+prev", "prev", "anchor", "none"])
@pytest.mark.parametrize(("frames", "cap"), [(1, None), (7, 3), (20, None), (5, 50)])
def test_calls_and_stored_bytes_are_the_plan_simulations(mode: str, refs: str, frames: int, cap) -> None:
    """The torch-free count equals p2v_fast.method.plan's simulation, which runs the edit loop's own
    commit on meta tensors: same ticks, calls, largest call and store peak."""
    import torch

    from p2v_fast.method.plan import simulate_wavefront

    cfg = EditConfig(steps=12, latent_update=mode, refs=refs, batch_frames=cap)
    shapes, latent_hw = [(64, 8), (16, 16), (4, 24)], (8, 8)
    plan = simulate_wavefront(cfg, frames, shapes, torch.float16, latent_hw)
    step_bytes = sum(2 * n * c for n, c in shapes) * 2
    count = count_edit(cfg, frames, step_bytes, 4 * 8 * 8 * 4)
    assert (count.ticks, count.calls, count.largest, count.peak_feature_bytes) == (
        plan.ticks, plan.calls, plan.largest_call, plan.peak_feature_bytes)
    sequential = count_edit(cfg.replace(schedule="sequential"), frames, step_bytes, 256)
    assert sequential.calls == sequential.ticks == frames * 12 and sequential.largest == 1


def test_the_activation_constants_are_the_benchmarks_count() -> None:
    """ACTIVATION_BYTES and DECODE_BYTES are what benchmarks.activation_memory counts at 512x512,
    and that count is linear in the latent cells: at 256x256 it is a quarter."""
    from benchmarks.activation_memory import measure
    from p2v_fast.method.estimate import ACTIVATION_BYTES, DECODE_BYTES

    quarter = measure(256)
    assert quarter["inference_per_sample"] == pytest.approx(ACTIVATION_BYTES["inference"] / 4, rel=2e-3)
    # 1.5 % above a quarter: the cross-attention inputs the backward pass keeps do not shrink with the cells
    assert quarter["backward_per_sample"] == pytest.approx(ACTIVATION_BYTES["backward"] / 4, rel=0.02)
    assert quarter["decode_1"] == pytest.approx(DECODE_BYTES / 4, rel=2e-3)
    assert quarter["inference_overhead"] == quarter["backward_overhead"] == 0


def test_sd2_depth_at_512_fp16_is_in_a_plausible_range(clip) -> None:
    """SD2-depth (hub id: nothing downloaded) on 60 frames squashed to 512x512, fp16 on a GPU, the
    caption given: weights ~2.9 GiB (UNet, VAE, text encoder in fp16, DPT in fp32), the store's
    2.75 GB (anchor + ~50 frame-steps of 27.5 MB), a call's activations on top."""
    cfg = EditConfig(prompt="x", resize="stretch", source_prompt="a clip", latent_update="detached")
    plan = plan_edit(cfg, clip)
    assert (plan.n_frames, plan.size, plan.dtype, plan.gpu) == (60, (512, 512), "fp16", True)
    assert (plan.edit.calls, plan.edit.ticks, plan.invert_calls) == (211, 211, 4 * 50 + 50)  # docs/performance.md
    mem = plan.memory
    assert 2.7 * GiB < mem["weights"] < 3.0 * GiB
    assert 2.5 * GiB < mem["features"] < 2.6 * GiB  # 2.75e9 bytes
    assert mem["inversion_copy"] == pytest.approx(4 * 1.29e9, rel=0.01)  # fp32 UNet + VAE + text encoder
    assert 0.05 * GiB < mem["per_frame"] < 1.0 * GiB
    assert 5.5 * GiB < plan.peak_one < plan.peak_full < 16 * GiB
    assert plan.peak_one < 7 * GiB  # one frame per call fits an 8 GB card
    # ... but the inversion's fp32 copy does not, unless the inversion runs in the edit's fp16
    assert plan.peak_invert_one > 7.5 * GiB > plan_edit(cfg.replace(invert_dtype="same"), clip).peak_invert_one
    assert any(s.startswith("--invert-dtype same") for s in plan.savings())
    # the captioner is loaded when no source prompt is given; autograd's calls keep activations
    assert plan_edit(cfg.replace(source_prompt=None), clip).memory["weights"] > mem["weights"] + 0.4 * GiB
    grad = plan_edit(cfg.replace(latent_update="autograd"), clip)
    assert grad.memory["per_frame_backward"] > 2 * grad.memory["per_frame"] and grad.peak_one > plan.peak_one
    # fp32 everywhere: no inversion copy, twice the weights and features
    fp32 = plan_edit(cfg.replace(dtype="fp32"), clip)
    assert fp32.memory["inversion_copy"] == 0 and fp32.memory["features"] > 1.99 * mem["features"]


def test_dry_run_prints_the_plan_and_loads_nothing(clip) -> None:
    r = p2v("edit", clip, "a swan", "--dry-run", "--max-frames", "5", "--size", "256")
    assert r.exit_code == 0, r.output
    out = r.stdout
    assert "5 frames at 384x256 (crop)" in out
    assert "UNet calls" in out and "inversion 100 (none if cached), edit" in out  # 5 frames in 1 call x 50 + 50
    assert "peak GPU memory" in out and "at 1 frame per UNet call" in out
    assert out.rstrip().endswith("dry run: nothing was loaded or written")
    assert not list(clip.parent.glob("*.p2v.*"))  # no output written


def test_dry_run_refuses_what_the_edit_refuses(clip, tmp_path) -> None:
    assert "input does not exist" in one_line_error(p2v("edit", tmp_path / "none.mp4", "x", "--dry-run"))
    assert "--max-frames must be >= 1" in one_line_error(p2v("edit", clip, "x", "--max-frames", "0", "--dry-run"))
    assert "does not exist" in one_line_error(p2v("edit", clip, "x", "--model", "./nowhere", "--dry-run"))


def test_dry_run_imports_no_torch_and_reaches_no_hub(clip, tmp_path) -> None:
    """Fast: it probes the clip and reads the config; torch is never imported, and the hub id is
    weighed by its published architecture with the hub unreachable and its cache empty."""
    code = ("import sys\nfrom cli import main\nsys.argv = ['p2v', 'edit', sys.argv[1], 'a swan', '--dry-run']\n"
            "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "assert 'torch' not in sys.modules and 'diffusers' not in sys.modules, 'torch imported'\n")
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "HOME": str(tmp_path),
           "HTTPS_PROXY": "http://127.0.0.1:9", "P2V_CACHE": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-c", code, str(clip)], capture_output=True, text=True, env=env,
                       cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert r.returncode == 0, r.stderr
    assert "SD2-depth's published architecture, not downloaded" in r.stdout
    assert not (tmp_path / "hf").exists()
