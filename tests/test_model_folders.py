"""Model folders as stabilityai/stable-diffusion-2-depth publishes them, and malformed ones.

The published layout (issue 26, item 5): the real files that hold no weights
(:mod:`p2v_fast.weights.sd2_depth`'s ``MODEL_INDEX``, ``SCHEDULER_FILE``, ``DPT_PREPROCESSOR``,
``TOKENIZER_CONFIG``, ``SPECIAL_TOKENS_MAP``, ``TEXT_ENCODER_TOKEN_IDS``) over the tiny set's weights
(the depth estimator at the published 384 x 384 input), loaded and edited as a real folder is. The
conditioning the random weights cannot judge is checked on ``mini``: the depth map's orientation
and the text embedding against diffusers' own ``encode_prompt``.

Malformed folders (item 4): refused at load in one line where the configs tell (cheap and
certain), else one line at the first call of the network that fails.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from p2v_fast.errors import ModelLoadError
from p2v_fast.weights import sd2_depth, tiny
from p2v_fast.weights.models import load_models, model_id, model_id_at
from tests.helpers import one_line, one_line_error, p2v, sample_clip

FAST = ["--size", "64", "--steps", "2", "--source-prompt", "a clip", "--max-frames", "2"]


def _write(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")


def _copy(tiny_dir: Path, folder: Path) -> Path:
    shutil.copytree(tiny_dir, folder, ignore=shutil.ignore_patterns("captioner", "p2v_tiny.json"))
    return folder


def _edit_json(path: Path, **changes) -> None:
    _write(path, {**json.loads(path.read_text(encoding="utf-8")), **changes})


@pytest.fixture(scope="module")
def published(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The published SD2-depth layout over tiny weights (see the module's docstring)."""
    from transformers import DPTConfig, DPTForDepthEstimation

    folder = _copy(tiny_dir, tmp_path_factory.mktemp("published") / "stable-diffusion-2-depth")
    _write(folder / "model_index.json", sd2_depth.MODEL_INDEX)
    _write(folder / "scheduler" / "scheduler_config.json", sd2_depth.SCHEDULER_FILE)
    _write(folder / "feature_extractor" / "preprocessor_config.json", sd2_depth.DPT_PREPROCESSOR)
    # DPT-Hybrid's position embeddings are sized for its input: the tiny widths at 384 x 384
    size, stage3 = sd2_depth.DPT_IMAGE_SIZE, tiny.DPT_CONFIG["backbone_config"]["hidden_sizes"][2]
    torch.manual_seed(tiny.SEEDS["depth_estimator"])
    dpt = DPTForDepthEstimation(DPTConfig(**{**tiny.DPT_CONFIG, "image_size": size,
                                             "backbone_featmap_shape": [1, stage3, size // 16, size // 16]}))
    shutil.rmtree(folder / "depth_estimator")
    dpt.save_pretrained(str(folder / "depth_estimator"))
    # CLIP's BPE files (the tiny byte-level vocabulary) with the published configs, no tokenizer.json
    tok = folder / "tokenizer"
    shutil.rmtree(tok)
    tok.mkdir()
    _write(tok / "vocab.json", tiny._byte_vocab())
    (tok / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    _write(tok / "tokenizer_config.json", sd2_depth.TOKENIZER_CONFIG)
    _write(tok / "special_tokens_map.json", sd2_depth.SPECIAL_TOKENS_MAP)
    _edit_json(folder / "text_encoder" / "config.json", **sd2_depth.TEXT_ENCODER_TOKEN_IDS)
    return folder


# ------------------------------------------------------------------------------ the published layout


def test_the_published_layout_loads_as_sd2_runs(published: Path) -> None:
    from p2v_fast.method.ddim import DDIMSchedule
    from p2v_fast.weights.depth import DepthEstimator

    m = load_models(str(published))
    # PNDM's config, run as DDIM: SD2's "leading" timesteps shifted by steps_offset 1
    assert type(m.scheduler).__name__ == "DDIMScheduler" and m.scheduler.config.steps_offset == 1
    assert DDIMSchedule(m.scheduler, 50).timesteps[[0, -1]].tolist() == [981, 1]
    # DPT's preprocessing: 384 x 384, bilinear, to [-1, 1]
    fe = m.feature_extractor
    assert "DPTImageProcessor" in type(fe).__name__ and int(fe.resample) == 2
    frame = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    pv = fe(images=[frame], return_tensors="pt")["pixel_values"]
    assert pv.shape == (1, 3, 384, 384) and -1.0 <= float(pv.min()) < -0.9 and 0.9 < float(pv.max()) <= 1.0
    assert DepthEstimator(m).raw(frame).shape == (1, 8, 12)
    # special_tokens_map.json's pad token wins over tokenizer_config.json's: "!" (id 0), as
    # OpenCLIP's tokenizer pads with zeros in SD2's training
    ids = m.tokenizer(["a swan"], padding="max_length", max_length=77, truncation=True).input_ids[0]
    assert m.tokenizer.pad_token == "!" and ids[-1] == 0 and ids.count(m.tokenizer.eos_token_id) == 1
    assert m.text_encoder.config.eos_token_id == 2  # the legacy id, kept
    assert model_id_at(str(published)) == model_id(m)  # the configs-only identity reads the same files


def test_the_published_layout_edits(published: Path, tmp_path: Path, own_cache: Path) -> None:
    clip = sample_clip(tmp_path, n_frames=2, audio=False)
    out = tmp_path / "out.mp4"
    r = p2v("edit", clip, "a swan", "-o", out, "--model", published, *FAST)
    assert r.exit_code == 0, r.output
    assert out.is_file() and out.stat().st_size > 0


@pytest.mark.parametrize("model", ["published", "mini"])
def test_the_prompt_embedding_is_diffusers_own(model: str, request: pytest.FixtureRequest) -> None:
    """The embedding the edit is conditioned on is StableDiffusionDepth2ImgPipeline.encode_prompt's
    (the last hidden states, the final layer norm applied), not the hidden states before it."""
    from diffusers import StableDiffusionDepth2ImgPipeline

    from p2v_fast.weights.prompts import encode_prompt

    m = load_models(str(request.getfixturevalue("published")) if model == "published" else "mini")
    pipe = StableDiffusionDepth2ImgPipeline(vae=m.vae, text_encoder=m.text_encoder, tokenizer=m.tokenizer,
                                            unet=m.unet, scheduler=m.scheduler, depth_estimator=m.depth_estimator,
                                            feature_extractor=m.feature_extractor)
    text = "a red sphere and a blue cube on a checkered floor"
    ours = encode_prompt(m, text)
    theirs, _ = pipe.encode_prompt(text, m.device, 1, False)
    assert ours.shape == theirs.shape == (1, 77, m.text_encoder.config.hidden_size)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    ids = m.tokenizer([text], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        before_norm = m.text_encoder(ids, output_hidden_states=True).hidden_states[-1]
    assert not torch.allclose(ours.float(), before_norm.float(), atol=1e-3)


def _unet_depth_input(models, clip: Path, cfg) -> np.ndarray:
    """The depth channel of the first frame's first UNet input in an inversion of ``clip``."""
    from p2v_fast.media.clip_selection import select_clip
    from p2v_fast.method.inversion import invert_clip
    from p2v_fast.nets.backends import TorchBackend

    backend, seen = TorchBackend(models), []
    unet = backend.unet

    def spy(sample, *args, **kw):
        seen.append(sample[:, 4].clone())
        return unet(sample, *args, **kw)

    backend.unet = spy  # type: ignore[method-assign]
    invert_clip(cfg, select_clip(clip, cfg), models, backend, "a scene", check=False)
    return seen[0][0].numpy()


def test_the_depth_map_is_nearest_at_plus_one(tmp_path: Path) -> None:
    """The depth channel the UNet is given is DPT's inverse depth, min-max normalised: +1 at the
    nearest point, -1 at the farthest (as diffusers' prepare_depth_map and the authors' code give
    it). Checked on mini's trained DPT over rendered scenes whose true depth is known, by reading the
    UNet's input during an inversion."""
    from p2v_fast.config import EditConfig
    from p2v_fast.media import scenes

    m = load_models("mini")
    for seed in (1000, 1001, 1002):
        clip = scenes.render_clip(seed, 1, (128, 128))
        folder = scenes.write_clip(clip, tmp_path / f"scene{seed}")
        cfg = EditConfig(model="mini", size=128, steps=1, source_prompt="a scene", cache_dir=tmp_path / "cache")
        depth = _unet_depth_input(m, folder, cfg)  # [16, 16], the latent grid
        near = (1.0 / clip.depth[0]).reshape(16, 8, 16, 8).mean(axis=(1, 3))  # true inverse depth per cell
        assert depth.max() == 1.0 and depth.min() == -1.0
        at_max = np.unravel_index(depth.argmax(), depth.shape)
        at_min = np.unravel_index(depth.argmin(), depth.shape)
        assert near[at_max] >= 0.97 * near.max(), (seed, at_max)  # +1 sits at the nearest cell
        assert near[at_min] <= 1.1 * near.min(), (seed, at_min)  # -1 at the farthest
        assert np.corrcoef(depth.ravel(), near.ravel())[0, 1] > 0.9


# ------------------------------------------------------------------------------ malformed folders


def _save_unet(folder: Path, **changes) -> None:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    shutil.rmtree(folder / "unet")
    UNet2DConditionModel(**{**tiny.UNET_CONFIG, **changes}).save_pretrained(str(folder / "unet"))


def _save_text_encoder(folder: Path, **changes) -> None:
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = json.loads((folder / "text_encoder" / "config.json").read_text(encoding="utf-8"))
    cfg.update(changes)
    torch.manual_seed(0)
    shutil.rmtree(folder / "text_encoder")
    CLIPTextModel(CLIPTextConfig(**cfg)).save_pretrained(str(folder / "text_encoder"))


AT_LOAD = {
    "unet-4-channels": (lambda f: _save_unet(f, in_channels=4),
                        "its UNet takes 4 input channels; a depth model's takes 5 (4 latent + 1 depth)"),
    "text-too-wide": (lambda f: _save_text_encoder(f, hidden_size=48, projection_dim=48),
                      "its text encoder's hidden size is 48, but its UNet attends to text 32 wide"),
    "v-prediction": (lambda f: _edit_json(f / "scheduler" / "scheduler_config.json", prediction_type="v_prediction"),
                     "predicts 'v_prediction'"),
    "layers-without-weights": (lambda f: _edit_json(f / "unet" / "config.json", num_class_embeds=10),
                               "its UNet's config has layers its weights file lacks (e.g. 'class_embedding."),
}


@pytest.mark.parametrize("case", sorted(AT_LOAD))
def test_a_malformed_folder_is_refused_at_load_in_one_line(case: str, tiny_dir: Path, tmp_path: Path) -> None:
    make, expected = AT_LOAD[case]
    folder = _copy(tiny_dir, tmp_path / case)
    make(folder)
    with pytest.raises(ModelLoadError) as ei:
        load_models(str(folder))
    msg = one_line(str(ei.value))
    assert msg.startswith(f"model folder '{folder}'") and expected in msg, msg


AT_FIRST_CALL = {
    # loads (no weights change), then the UNet asks for class labels nothing gives
    "unet-class-labels": (lambda f: _edit_json(f / "unet" / "config.json", class_embed_type="identity"),
                          "its UNet failed on its first call: ValueError: class_labels should be provided"),
    # the image processor makes 64 x 64 inputs for a DPT-Hybrid built for 32 x 32
    "dpt-input-size": (lambda f: _edit_json(f / "feature_extractor" / "preprocessor_config.json",
                                            size={"height": 64, "width": 64}),
                       "its depth estimator failed on its first call: ValueError: Input image size (64*64)"),
}


@pytest.mark.parametrize("case", sorted(AT_FIRST_CALL))
def test_a_network_failing_on_its_first_call_is_one_error_line(case: str, tiny_dir: Path, tmp_path: Path,
                                                               own_cache: Path) -> None:
    make, expected = AT_FIRST_CALL[case]
    folder = _copy(tiny_dir, tmp_path / case)
    make(folder)
    load_models(str(folder))  # nothing in the configs tells
    clip = sample_clip(tmp_path, n_frames=2, audio=False)
    r = p2v("edit", clip, "a swan", "-o", tmp_path / "out.mp4", "--model", folder, *FAST)
    msg = one_line_error(r)
    assert f"model folder '{folder}': {expected}" in msg, msg
    assert not (tmp_path / "out.mp4").exists()


def test_the_first_call_keeps_the_cause_and_lets_later_errors_through(tiny_dir: Path, tmp_path: Path) -> None:
    """The one line chains the network's own exception (for a debugger, or a library caller); once a
    network has run, its errors are not the folder's and pass unchanged; out of memory always does."""
    from p2v_fast.weights.prompts import encode_prompt

    m = load_models(str(_copy(tiny_dir, tmp_path / "m")))
    real = m.text_encoder.forward
    m.text_encoder.forward = lambda *a, **k: (_ for _ in ()).throw(torch.OutOfMemoryError("CUDA out of memory"))
    with pytest.raises(torch.OutOfMemoryError):
        encode_prompt(m, "a swan")
    m.text_encoder.forward = lambda *a, **k: (_ for _ in ()).throw(IndexError("index out of range in self"))
    with pytest.raises(ModelLoadError) as ei:
        encode_prompt(m, "a swan")
    assert "its text encoder failed on its first call: IndexError: index out of range in self" in str(ei.value)
    assert isinstance(ei.value.__cause__, IndexError)
    m.text_encoder.forward = real
    encode_prompt(m, "a swan")  # runs: proven
    m.text_encoder.forward = lambda *a, **k: (_ for _ in ()).throw(IndexError("a later bug"))
    with pytest.raises(IndexError, match="a later bug"):
        encode_prompt(m, "a swan")
