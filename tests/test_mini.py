"""The trained small model ``mini`` (issue 25): its training loop runs (tiny configs), the shipped
weights load by ``--model mini``, and a short edit moves an object's colour toward the prompt."""

from __future__ import annotations

import colorsys
from pathlib import Path

import numpy as np
import pytest
import torch

from p2v_fast.media import scenes as sc
from p2v_fast.weights.models import MINI, load_models

MINI_DIR = Path(__file__).resolve().parents[1] / "p2v_fast" / "weights" / "mini"
shipped = pytest.mark.skipif(not (MINI_DIR / "model_index.json").is_file(), reason="mini weights not built here")


def test_training_loop_runs_on_tiny_configs(tmp_path):
    """Every stage of ``python -m training.mini`` for a few steps; the folder loads as a model."""
    from training.mini import main

    out = tmp_path / "run"
    rc = main(["--out", str(out), "--tiny", "--n-data", "8", "--vae-steps", "2", "--vae-dec-steps", "1",
               "--vae-dec2-steps", "1", "--vae-batch", "2", "--unet-steps", "2", "--unet-batch", "2"])
    assert rc == 0
    folder = out / "mini"
    assert not [p for p in folder.rglob("*") if p.suffix in (".bin", ".pt", ".pkl")]
    models = load_models(str(folder))
    assert models.unet.config.in_channels == 5
    assert models.vae.config.scaling_factor != 0.18215  # 1/std of the encoded training frames
    names = [n for n, _ in models.unet.named_modules() if n.startswith("up_blocks") and n.endswith("attn1")]
    assert len(names) == 9
    # resuming a finished run does nothing and succeeds
    assert main(["--out", str(out), "--tiny", "--resume", "--only", "vae", "--only", "unet"]) == 0


@shipped
def test_mini_loads_by_name():
    m = load_models(MINI)
    assert m.source == MINI and m.local_dir == MINI_DIR
    assert m.unet.config.in_channels == 5 and m.vae_scale_factor == 8
    size = sum(p.stat().st_size for p in MINI_DIR.rglob("*") if p.is_file())
    assert size <= 15 * 1024 * 1024
    assert not [p for p in MINI_DIR.rglob("*") if p.suffix in (".bin", ".pt", ".pkl", ".pth")]


def _hue(pixels: np.ndarray) -> float:
    r, g, b = (pixels.astype(np.float64).mean(axis=0) / 255.0).tolist()
    return colorsys.rgb_to_hsv(r, g, b)[0]


def _hue_dist(a: float, b: float) -> float:
    d = abs(a - b) % 1.0
    return min(d, 1.0 - d)


@shipped
def test_mini_edit_moves_the_colour(tmp_path):
    """A 3-frame scene clip, the caption with one object's colour word changed: the object's masked
    hue moves toward the target colour's."""
    from p2v_fast import EditConfig, edit_video
    from p2v_fast.media.reader import read_frames

    torch.manual_seed(0)
    clip = sc.render_clip(123, 3, (64, 64))
    scene = clip.scene
    k = int(np.argmax([(clip.ids[0] == i + 1).sum() for i in range(len(scene.objects))]))
    src_colour = scene.objects[k].colour
    target = "blue" if src_colour not in ("blue", "cyan", "purple") else "yellow"
    prompt = sc.caption_of(sc.with_colour(scene, k, target))
    folder = sc.write_clip(clip, tmp_path / "clip")
    cfg = EditConfig(prompt=prompt, source_prompt=clip.caption, model=MINI, size=64, steps=20, device="cpu",
                     cache_dir=tmp_path / "cache", threads=1)
    out = tmp_path / "edit.mp4"
    edit_video(cfg, folder, out)
    edited = np.stack(list(read_frames(out)))
    assert edited.shape == clip.frames.shape
    want = colorsys.rgb_to_hsv(*sc.COLOURS[target])[0]
    moved = 0
    for t in range(3):
        m = clip.ids[t] == k + 1
        before = _hue_dist(_hue(clip.frames[t][m]), want)
        after = _hue_dist(_hue(edited[t][m]), want)
        moved += after < before - 0.05
    assert moved >= 2, (clip.caption, prompt)
