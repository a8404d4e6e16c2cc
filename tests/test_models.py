"""Model loading (tiny, local folder, hub cache, errors), depth and captioning."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from p2v_fast.errors import InputError, ModelLoadError
from p2v_fast.files import cache_root
from p2v_fast.weights.caption import caption_frame
from p2v_fast.weights.depth import DepthEstimator, clip_range, normalize_per_frame, normalize_with
from p2v_fast.weights.models import Models, load_models
from p2v_fast.weights.tiny import TINY_VERSION, tiny_model_dir

REPO = Path(__file__).resolve().parents[1]


def _frames(n: int = 3, h: int = 64, w: int = 96, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def _one_line_error(exc_info: pytest.ExceptionInfo) -> str:
    msg = str(exc_info.value)
    assert msg and "\n" not in msg and "Traceback" not in msg
    return msg


# ------------------------------------------------------------------------------ tiny set


def test_tiny_unet_has_sd2_depth_layout(tiny_models: Models) -> None:
    unet = tiny_models.unet
    assert unet.config.in_channels == 5 and unet.config.out_channels == 4
    assert unet.config.use_linear_projection
    attn1 = [n for n, _ in unet.named_modules() if n.endswith(".attn1")]
    assert len(attn1) == 16
    assert sum(n.startswith("down_blocks.") for n in attn1) == 6
    assert sum(n.startswith("mid_block.") for n in attn1) == 1
    up = [n for n in attn1 if n.startswith("up_blocks.")]
    assert len(up) == 9
    for b in (1, 2, 3):
        assert sum(n.startswith(f"up_blocks.{b}.") for n in up) == 3
    assert unet.config.cross_attention_dim == tiny_models.text_encoder.config.hidden_size


def test_tiny_components(tiny_models: Models, tiny_dir: Path) -> None:
    m = tiny_models
    assert m.source == "tiny" and m.local_dir == tiny_dir
    assert tiny_dir.name == TINY_VERSION and tiny_dir.parent.parent == cache_root()
    assert m.device == torch.device("cpu") and m.dtype == torch.float32
    assert type(m.scheduler).__name__ == "DDIMScheduler"
    cfg = m.scheduler.config
    assert cfg.beta_schedule == "scaled_linear" and cfg.prediction_type == "epsilon"
    assert (cfg.beta_start, cfg.beta_end, cfg.num_train_timesteps) == (0.00085, 0.012, 1000)
    assert (cfg.clip_sample, cfg.set_alpha_to_one, cfg.steps_offset) == (False, False, 1)
    assert m.vae.config.latent_channels == 4 and m.vae_scale_factor == 8
    assert m.tokenizer.model_max_length == 77
    ids = m.tokenizer("a cat on a skateboard", padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert ids.shape == (1, 77) and int(ids.max()) < m.text_encoder.config.vocab_size
    assert m.text_encoder(ids).last_hidden_state.shape == (1, 77, m.unet.config.cross_attention_dim)
    for mod in (m.vae, m.unet, m.text_encoder, m.depth_estimator):
        assert not mod.training
        assert not any(p.requires_grad for p in mod.parameters())
    size = sum(f.stat().st_size for f in tiny_dir.rglob("*") if f.is_file())
    assert size < 30e6
    assert (tiny_dir / "captioner" / "config.json").is_file()


def test_tiny_dir_is_reused(tiny_dir: Path) -> None:
    stamp = (tiny_dir / "model_index.json").stat().st_mtime_ns
    assert tiny_model_dir() == tiny_dir
    assert (tiny_dir / "model_index.json").stat().st_mtime_ns == stamp
    # No leftover build folders beside it.
    assert not [p.name for p in tiny_dir.parent.iterdir() if p.name.startswith(".")]


def test_tiny_build_is_deterministic(tiny_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    other = tiny_model_dir(tmp_path)
    assert other == tmp_path / "models" / TINY_VERSION
    for rel in ("unet/diffusion_pytorch_model.safetensors", "depth_estimator/model.safetensors"):
        a, b = load_file(tiny_dir / rel), load_file(other / rel)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_tiny_build_race_keeps_the_winner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import p2v_fast.weights.tiny as tiny

    target = tmp_path / "models" / TINY_VERSION

    def racing_build(dest: Path) -> None:
        # Another process finishes first, while we are still building ours.
        target.mkdir(parents=True)
        (target / "model_index.json").write_text("{}")
        (target / "winner").write_text("")
        dest.mkdir(parents=True)
        (dest / "model_index.json").write_text("{}")

    monkeypatch.setattr(tiny, "build_tiny_model_dir", racing_build)
    assert tiny.tiny_model_dir(tmp_path) == target
    assert (target / "winner").is_file()
    assert [p.name for p in target.parent.iterdir()] == [TINY_VERSION]


def test_cache_root_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("P2V_CACHE", str(tmp_path))
    assert cache_root() == tmp_path
    monkeypatch.delenv("P2V_CACHE")
    assert cache_root() == Path.home() / ".cache" / "p2v-fast"


def test_the_tiny_builder_imports_nothing_from_media() -> None:
    """The random-model builder stands below the video module: weights/tiny.py (and what it
    imports from the package) never imports p2v_fast.media, lazily or not."""
    import ast

    root = Path(__file__).resolve().parents[1]
    seen: set[str] = set()
    todo = ["p2v_fast.weights.tiny"]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = root / (name.replace(".", "/") + ".py")
        if not path.is_file():
            path = path.with_suffix("") / "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            todo += [m for m in mods if m.startswith("p2v_fast.")]
    assert seen > {"p2v_fast.weights.tiny", "p2v_fast.files"}  # the imports are really followed
    assert not [m for m in seen if m.startswith("p2v_fast.media")]



@pytest.mark.parametrize(("device", "message"), [
    ("meta", "--device 'meta' is not supported; use auto, cpu, cuda or cuda:N"),
    ("gpu0", "--device 'gpu0' is not a device; use auto, cpu, cuda or cuda:N"),
])
def test_load_models_resolves_a_device_as_the_cli_does(device: str, message: str) -> None:
    """One device resolution (p2v_fast.config.resolve_device) for the runtime and load_models: a
    device it refuses is the CLI's one line, before anything loads."""
    from p2v_fast.config import resolve_device

    with pytest.raises(InputError) as cli_err:
        resolve_device(device)
    with pytest.raises(InputError) as lib_err:
        load_models("tiny", device=device)
    assert str(cli_err.value) == str(lib_err.value) == message
    assert load_models.__module__ == "p2v_fast.weights.models" and resolve_device(torch.device("cpu")).type == "cpu"



def test_the_tiny_configs_are_the_real_ones_shrunk() -> None:
    """Tiny has SD2-depth's architecture by construction: each tiny config holds every key of the
    real one, with the same value except for widths, depths and sizes."""
    from p2v_fast.weights import sd2_depth, tiny

    sizes = {"sample_size", "block_out_channels", "layers_per_block", "norm_num_groups", "attention_head_dim",
             "cross_attention_dim", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "projection_dim", "image_size", "backbone_out_indices", "neck_hidden_sizes", "fusion_hidden_size",
             "backbone_featmap_shape", "depths", "hidden_sizes", "embedding_size", "num_groups"}
    pairs = [(tiny.UNET_CONFIG, sd2_depth.SD2_DEPTH_UNET), (tiny.VAE_CONFIG, sd2_depth.SD_VAE),
             (tiny.TEXT_CONFIG, sd2_depth.OPENCLIP_VIT_H_TEXT), (tiny.DPT_CONFIG, sd2_depth.DPT_HYBRID_MIDAS),
             (tiny.DPT_CONFIG["backbone_config"], sd2_depth.DPT_HYBRID_MIDAS["backbone_config"])]
    for small, full in pairs:
        assert set(full) - {"vocab_size"} <= set(small), set(full) - set(small)  # the vocabulary: the tokenizer's
        changed = {k for k in full if k in small and small[k] != full[k] and k != "backbone_config"}
        assert changed <= sizes, changed - sizes
    unet = tiny.UNET_CONFIG
    assert unet["in_channels"] == 5 and unet["up_block_types"][1:] == ("CrossAttnUpBlock2D",) * 3


# ------------------------------------------------------------------------------ loading


def test_reload_offline_from_folder(tiny_dir: Path, tiny_models: Models, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    m = load_models(str(tiny_dir))
    assert m.source == str(tiny_dir) and m.local_dir == tiny_dir.resolve()
    a, b = m.unet.state_dict(), tiny_models.unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert load_models("tiny").source == "tiny"


def test_fp16_keeps_depth_in_fp32(tiny_dir: Path) -> None:
    m = load_models("tiny", dtype=torch.float16)
    assert m.unet.dtype == m.vae.dtype == m.text_encoder.dtype == torch.float16
    assert m.depth_estimator.dtype == torch.float32


def test_sd2_feature_extractor_name_loads(tiny_dir: Path, tmp_path: Path) -> None:
    """SD2-depth's model_index.json names DPTFeatureExtractor, which transformers 5 lacks."""
    folder = tmp_path / "sd2like"
    shutil.copytree(tiny_dir, folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["feature_extractor"] = ["transformers", "DPTFeatureExtractor"]
    (folder / "model_index.json").write_text(json.dumps(index))
    m = load_models(str(folder))
    assert "DPTImageProcessor" in type(m.feature_extractor).__name__


def test_unknown_hub_id_offline_is_fast_and_clear(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(ModelLoadError) as ei:
        load_models("p2v-test-no-such-owner/no-such-model")
    assert time.perf_counter() - t0 < 5
    msg = _one_line_error(ei)
    assert "p2v-test-no-such-owner/no-such-model" in msg and "tiny" in msg and "cache" in msg


def test_unknown_hub_id_online_fails_cleanly() -> None:
    """Without HF_HUB_OFFLINE, an unreachable hub gives one clear line. The hub endpoint is pointed at
    a closed loopback port (in a subprocess: huggingface_hub reads it at import), so the test sends
    nothing off this machine."""
    code = (
        "import time, diffusers, transformers\n"
        "from p2v_fast.weights.models import load_models\n"
        "from p2v_fast.errors import ModelLoadError\n"
        "t0 = time.perf_counter()\n"
        "try:\n    load_models('p2v-test-no-such-owner/no-such-model')\n"
        "except ModelLoadError as e:\n    print('ERR', e)\n"
        "print('SECONDS', time.perf_counter() - t0)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env["HF_ENDPOINT"] = "http://127.0.0.1:9"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    # no retrying with back-off against a closed port: the call itself (imports done) is quick
    # whatever the machine's load; the imports before it are not timed
    seconds = [float(ln.split()[1]) for ln in proc.stdout.splitlines() if ln.startswith("SECONDS ")]
    assert seconds and seconds[0] < 30, proc.stdout + proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("ERR ")]
    assert len(lines) == 1 and "p2v-test-no-such-owner/no-such-model" in lines[0], proc.stdout + proc.stderr


@pytest.mark.parametrize("name", ["./p2v-no-such-folder", "/p2v/no/such/folder", "a/b/c"])
def test_missing_folder(name: str) -> None:
    with pytest.raises(ModelLoadError) as ei:
        load_models(name)
    assert _one_line_error(ei) == f"model folder '{name}' does not exist"


def test_not_a_pipeline_folder(tmp_path: Path, tiny_dir: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError) as ei:
        load_models(str(empty))
    msg = _one_line_error(ei)
    assert str(empty) in msg and "model_index.json" in msg

    other = tmp_path / "other"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(ModelLoadError) as ei:
        load_models(str(other))
    msg = _one_line_error(ei)
    assert str(other) in msg and "StableDiffusionPipeline" in msg

    partial = tmp_path / "partial"
    shutil.copytree(tiny_dir, partial)
    shutil.rmtree(partial / "depth_estimator")
    with pytest.raises(ModelLoadError) as ei:
        load_models(str(partial))
    msg = _one_line_error(ei)
    assert str(partial) in msg and "depth_estimator/" in msg and "unet/" not in msg

    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    (broken / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ModelLoadError) as ei:
        load_models(str(broken))
    assert str(broken) in _one_line_error(ei)


def test_hub_cache_snapshot_loads_offline(tiny_dir: Path, tmp_path: Path) -> None:
    """A hub id found in the HF cache loads with HF_HUB_OFFLINE=1 (subprocess: HF env is read at import)."""
    rev = "0" * 40
    repo = tmp_path / "hub" / "models--p2v-test--sd2-depth-tiny"
    shutil.copytree(tiny_dir, repo / "snapshots" / rev)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    code = (
        "from p2v_fast.weights.models import load_models\n"
        "m = load_models('p2v-test/sd2-depth-tiny')\n"
        "print(m.source, m.local_dir, m.unet.config.in_channels)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["p2v-test/sd2-depth-tiny", "None", "5"]


# ------------------------------------------------------------------------------ depth


def test_depth_shapes(tiny_models: Models) -> None:
    est = DepthEstimator(tiny_models, batch_size=2)
    d = est.raw(_frames(3, 64, 96))
    assert d.shape == (3, 8, 12) and d.dtype == torch.float32 and d.device == tiny_models.device
    assert torch.isfinite(d).all()
    single = est.raw(_frames(1, 64, 96)[0])
    assert single.shape == (1, 8, 12)
    assert torch.allclose(single[0], d[0], atol=1e-6)  # batching does not change results
    with pytest.raises(InputError):
        est.raw(_frames(1, 60, 96))
    with pytest.raises(InputError):
        est.raw(_frames(1).astype(np.float32))


def test_depth_per_frame_normalisation(tiny_models: Models) -> None:
    d = DepthEstimator(tiny_models).raw(_frames(3, 64, 64))
    n = normalize_per_frame(d)
    assert n.shape == d.shape
    assert torch.allclose(n.amin(dim=(1, 2)), torch.full((3,), -1.0))
    assert torch.allclose(n.amax(dim=(1, 2)), torch.full((3,), 1.0))
    flat = normalize_per_frame(torch.full((2, 4, 4), 3.0))
    assert torch.equal(flat, torch.zeros(2, 4, 4))


def test_depth_per_clip_normalisation() -> None:
    d = torch.stack([torch.linspace(0, 1, 16).view(4, 4), torch.linspace(2, 4, 16).view(4, 4)])
    lo, hi = clip_range(d)
    assert (lo, hi) == (0.0, 4.0)
    n = normalize_with(d, lo, hi)
    assert n.shape == d.shape
    assert float(n.min()) == -1.0 and float(n.max()) == 1.0
    assert float(n[0].max()) == pytest.approx(-0.5)  # frame 0 keeps its place in the clip's range
    assert float(normalize_with(d, 1.0, 3.0).min()) == -1.0  # clamped
    assert float(normalize_with(d, 1.0, 3.0).max()) == 1.0
    assert torch.equal(normalize_with(d, 2.0, 2.0), torch.zeros_like(d))


# ------------------------------------------------------------------------------ caption


def test_caption_returns_str(tiny_models: Models) -> None:
    text = caption_frame(tiny_models, _frames(1, 48, 40)[0], max_new_tokens=8)
    assert isinstance(text, str) and text == text.strip()
    assert caption_frame(tiny_models, _frames(1, 48, 40)[0], max_new_tokens=8) == text  # greedy
    with pytest.raises(InputError):
        caption_frame(tiny_models, _frames(2))


# ------------------------------------------------------------------------------ the real weights


@pytest.mark.weights
def test_the_real_model_loads_and_edits_identical_frames_identically(tmp_path) -> None:
    """The real SD2-depth: the architecture the tiny model copies (5-channel UNet, 9 injected
    layers), and an edit of a clip of identical frames whose frames come out identical (the
    cross-frame mechanism holds for any weights) and not flat."""
    import numpy as np

    from p2v_fast import EditConfig, edit_video, load_runtime
    from p2v_fast.media.reader import read_frames
    from p2v_fast.media.samples import make_sample_frames_folder
    from p2v_fast.nets.attention import injected_layer_names
    from tests.helpers import real_weights

    folder = make_sample_frames_folder(tmp_path / "frames", n=1, size=(256, 256))
    for i in (2, 3):  # the same frame three times
        (folder / f"frame_{i}.png").write_bytes((folder / "frame_1.png").read_bytes())
    cfg = EditConfig(prompt="a watercolor painting", source_prompt="a test pattern", model=real_weights() or "",
                     size=256, steps=10, latent_update="detached")
    rt = load_runtime(cfg)
    assert rt.models.unet.config.in_channels == 5 and len(injected_layer_names(rt.models.unet)) == 9
    result = edit_video(cfg, folder, tmp_path / "out.mp4", runtime=rt)
    frames = [np.asarray(f, dtype=np.float32) for f in read_frames(result.output)]
    assert len(frames) == 3 and frames[0].std() > 5
    assert max(float(np.abs(f - frames[0]).mean()) for f in frames[1:]) < 2.0  # H.264 noise only
