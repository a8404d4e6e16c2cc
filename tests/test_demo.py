"""`p2v demo`: a held-out scene chosen by a rule on the scene, its clip written with audio and its
ground truth, and the edit wired end to end (here on the tiny model, steps cut: speed and the
trained model's result are tests/test_mini.py's and the benchmark's)."""

from __future__ import annotations

import av
import numpy as np

from p2v_fast.apps import demo
from p2v_fast.media import scenes


def _rule(scene: scenes.Scene) -> bool:
    return len(scene.objects) == 1 and scene.objects[0].size >= 0.5 and scene.floor == "checkered"


def test_the_scene_is_the_first_held_out_seed_the_rule_picks() -> None:
    from training.data import TRAIN_SEED0

    first = next(s for s in range(900_000, 901_000)
                 if _rule(scenes.random_scene(np.random.default_rng(s), demo.SCENE_DESIGN_FRAMES)))
    assert demo.SCENE_SEED == first < TRAIN_SEED0


def test_the_edit_changes_one_colour_word_to_the_opposite_hue() -> None:
    ds = demo.demo_scene()
    assert demo.opposite_colour("red") == "cyan" and demo.opposite_colour("blue") == "yellow"
    assert ds.target_colour == demo.opposite_colour(ds.source_colour)
    assert ds.prompt == ds.source_prompt.replace(ds.source_colour, ds.target_colour, 1) != ds.source_prompt
    cfg = demo.demo_config()
    assert (cfg.model, cfg.size, cfg.prompt, cfg.source_prompt) == ("mini", 64, ds.prompt, ds.source_prompt)


def test_the_demo_writes_the_scene_with_audio_and_truth_and_edits_it(tmp_path) -> None:
    cfg = demo.demo_config(steps=2, model="tiny")
    result = demo.run_demo(tmp_path, cfg, frames=3)
    clip = tmp_path / "scene.mp4"
    with av.open(str(clip)) as c:
        assert c.streams.audio and c.streams.video[0].frames == 3
        first = next(c.decode(video=0)).to_ndarray(format="rgb24")
    truth = scenes.render_scene_clip(demo.demo_scene().scene, 3, demo.CLIP_SIZE)
    assert np.abs(first.astype(int) - truth.frames[0]).mean() < 6  # the rendered frame, through H.264
    assert np.load(tmp_path / "scene.npz")["flow"].shape == (2, 64, 64, 2)
    assert (tmp_path / "scene.json").exists()
    assert result.output == tmp_path / "scene.p2v.mp4" and result.output.exists() and result.n_frames == 3
    assert result.side_by_side is not None and result.side_by_side.exists()


def test_the_demo_refuses_to_replace_its_edit_without_overwrite(tmp_path) -> None:
    """Before: `p2v demo` replaced samples/scene.p2v.mp4 (and its side files) on every run, where
    `p2v edit` refuses an existing output; now it follows the same rule."""
    from tests.helpers import digest, one_line_error, p2v

    args = ["demo", "--out", tmp_path, "--model", "tiny", "--frames", 2, "--steps", 1]
    assert p2v(*args).exit_code == 0
    before = {p.name: digest(p) for p in tmp_path.iterdir()}
    assert {"scene.p2v.mp4", "scene.p2v.side-by-side.mp4", "scene.p2v.strip.png"} <= set(before)
    (tmp_path / "scene.p2v.mp4").unlink()  # a side file alone is refused too
    error = one_line_error(p2v(*args))
    assert "scene.p2v.strip.png' exists; pass --overwrite to replace it" in error, error
    assert not (tmp_path / "scene.p2v.mp4").exists()  # refused before any work
    r = p2v(*args, "--overwrite")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "scene.p2v.mp4").exists() and digest(tmp_path / "scene.mp4") == before["scene.mp4"]
