"""Quality judged against a scene clip's ground truth (p2v_fast.quality.scene_truth): the judge
is checked on renders whose answer is known (the source, the truly recoloured scene, frames out of
order), so a broken judge cannot pass."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from p2v_fast.media import scenes
from p2v_fast.quality import scene_truth as st

SEED = 900_123  # held out (below training's seeds)


@pytest.fixture(scope="module")
def clip() -> scenes.SceneClip:
    return scenes.render_clip(SEED, 6)


def _target(colour: str) -> str:
    return next(c for c in scenes.COLOURS if c != colour)


def test_the_palette_reads_as_itself() -> None:
    for name, rgb in scenes.COLOURS.items():
        patch = np.tile((np.array(rgb) * 255).astype(np.uint8), (16, 1))
        assert st.nearest_colour(patch) == name
    grey = np.full((16, 3), 128, np.uint8)
    assert st.nearest_colour(grey) is None  # the floor and wall tones are not judged


def test_a_true_recolouring_scores_full_and_the_source_scores_zero(clip: scenes.SceneClip) -> None:
    first = clip.scene.objects[0].colour
    target = _target(first)
    others = {i + 1: o.colour for i, o in enumerate(clip.scene.objects) if i > 0}
    recoloured = scenes.render_scene_clip(scenes.with_colour(clip.scene, 0, target), 6)
    good = st.score_scene_edit(recoloured.frames, clip.frames, clip.ids, clip.flow, clip.occluded, clip.depth,
                               1, first, target, others)
    assert good.edit_accuracy == 1.0 and good.source_accuracy == 1.0
    assert np.isnan(good.others_kept) or good.others_kept == 1.0
    unchanged = st.score_scene_edit(clip.frames, clip.frames, clip.ids, clip.flow, clip.occluded, clip.depth,
                                    1, first, target, others)
    assert unchanged.edit_accuracy == 0.0
    assert good.object_iou > 0.8


def test_the_true_flow_warp_error_tells_a_steady_clip_from_a_shuffled_one(clip: scenes.SceneClip) -> None:
    steady = st.warp_error_truth(clip.frames, clip.flow, clip.occluded)
    rng = np.random.default_rng(0)
    flicker = np.clip(clip.frames.astype(np.int16) + rng.integers(-40, 40, (len(clip.frames), 1, 1, 3)), 0, 255)
    assert st.warp_error_truth(flicker.astype(np.uint8), clip.flow, clip.occluded) > 3 * steady
    assert st.warp_error_truth(clip.frames[::-1].copy(), clip.flow, clip.occluded) > 3 * steady


def test_flow_epe_is_zero_for_the_truth_and_grows_with_error(clip: scenes.SceneClip) -> None:
    it = iter(clip.flow)
    assert st.flow_epe(clip.frames, clip.flow, clip.occluded, lambda a, b: next(it)) == pytest.approx(0.0)
    assert st.flow_epe(clip.frames, clip.flow, clip.occluded,
                       lambda a, b: np.zeros((*a.shape[:2], 2), np.float32)) > 0.1


def test_aligned_inverse_depth_error_allows_scale_and_shift_only(clip: scenes.SceneClip) -> None:
    z = clip.depth[0]
    assert st.aligned_inverse_depth_error(3.0 / z + 0.5, z) == pytest.approx(0.0, abs=1e-6)
    assert st.aligned_inverse_depth_error(z, z) > 0.05  # metric depth is not inverse depth


def test_held_out_seeds_are_below_the_training_seeds() -> None:
    from benchmarks.scene_quality import HELD_OUT_BASE
    from training.data import TRAIN_SEED0

    assert SEED < TRAIN_SEED0 and HELD_OUT_BASE + 10_000 <= TRAIN_SEED0


# ------------------------------------------------------------------------------ p2v eval on a scene clip


def test_colour_edit_reads_which_object_the_prompt_recolours() -> None:
    meta = {"caption": "a red sphere and a blue cube on a checkered floor",
            "objects": [{"shape": "cube", "colour": "blue"}, {"shape": "sphere", "colour": "red"}]}
    edit = st.colour_edit(meta, "a red sphere and a green cube on a checkered floor")
    assert edit == st.ColourEdit(object_id=1, source_colour="blue", target_colour="green", others={2: "red"})
    assert st.colour_edit(meta, "a red sphere and a blue cube on a striped floor") is None  # the floor
    assert st.colour_edit(meta, "a cyan sphere and a green cube on a checkered floor") is None  # two at once
    assert st.colour_edit(meta, "a red cone and a green cube") is None  # another shape


@pytest.fixture(scope="module")
def scene_files(clip: scenes.SceneClip, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """The clip as an mp4 with its sidecar, and two 'edits': the true recolouring and the source itself."""
    from p2v_fast.media.writer import VideoWriter

    base = tmp_path_factory.mktemp("scene_eval")
    src = scenes.write_clip(clip, base / "scene.mp4")
    target = _target(clip.scene.objects[0].colour)
    edits = {"true": scenes.render_scene_clip(scenes.with_colour(clip.scene, 0, target), 6).frames,
             "none": clip.frames}
    paths = {}
    for name, frames in edits.items():
        paths[name] = base / f"{name}.mp4"
        with VideoWriter(paths[name], 12.0, (frames.shape[2], frames.shape[1])) as w:
            for f in frames:
                w.write(f)
    prompt = scenes.caption_of(scenes.with_colour(clip.scene, 0, target))
    return {"src": src, "prompt": prompt, **paths}


def test_eval_scores_a_scene_clip_against_its_ground_truth(scene_files: dict, tmp_path: Path) -> None:
    """`p2v eval` on a clip with a sidecar: the true recolouring scores full edit accuracy, the
    unedited source none; the JSON holds the scores, the output names them."""
    from tests.helpers import p2v

    src, prompt = scene_files["src"], scene_files["prompt"]
    scores = {}
    for name in ("true", "none"):
        out = tmp_path / f"{name}.json"
        result = p2v("eval", src, prompt, "-o", scene_files[name], "--clip-model", "mini", "--json", out)
        assert result.exit_code == 0, result.output
        assert "ground truth of the scene clip" in result.stdout and "edit accuracy" in result.stdout
        scores[name] = json.loads(out.read_text())["ground_truth"]
    assert scores["true"]["edit_accuracy"] >= 0.8 and scores["none"]["edit_accuracy"] <= 0.2
    assert scores["true"]["source_accuracy"] >= 0.8  # the judge reads the source's own colour
    assert scores["none"]["warp_error"] == pytest.approx(scores["none"]["source_warp_error"])
    assert scores["true"]["object_iou"] > 0.5 and np.isfinite(scores["true"]["depth_error"])


def test_eval_without_a_sidecar_has_no_ground_truth(scene_files: dict, tmp_path: Path) -> None:
    import shutil

    from tests.helpers import p2v

    plain = tmp_path / "plain.mp4"
    shutil.copy(scene_files["src"], plain)  # the same video, no .npz/.json beside it
    out = tmp_path / "s.json"
    result = p2v("eval", plain, scene_files["prompt"], "-o", scene_files["true"], "--clip-model", "mini",
                 "--json", out)
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["ground_truth"] is None
    assert "ground truth" not in result.stdout


def test_the_quality_benchmark_reports_each_update_form_with_its_edit_time() -> None:
    """`--settings autograd,detached` compares the two forms on the same clips in one run: the
    summary and its table hold each one's warp error, edit accuracy and edit seconds."""
    from benchmarks.scene_quality import COLUMNS, markdown, summarize

    def row(clip: int, setting: str, acc: float, warp: float, seconds: float) -> dict:
        return {**dict.fromkeys((*COLUMNS, "source_warp_error", "source_depth_error", "flow_epe_dis"), 0.0),
                "clip": clip, "setting": setting, "edit_accuracy": acc, "warp_error": warp, "seconds_edit": seconds}

    rows = [row(0, "autograd", 0.5, 10.0, 30.0), row(0, "detached", 0.7, 12.0, 10.0),
            row(1, "autograd", 0.7, 14.0, 50.0), row(1, "detached", 0.9, 16.0, 14.0)]
    summary = summarize(rows, ["autograd", "detached"])
    assert summary["autograd"]["seconds_edit"] == 40.0 and summary["detached"]["seconds_edit"] == 12.0
    assert summary["detached"]["edit_accuracy"] == pytest.approx(0.8) and summary["autograd"]["warp_error"] == 12.0
    table = markdown({"summary": summary}).splitlines()
    assert table[0].endswith("| edit s/clip |") and table[2].startswith("| autograd | 0.600 |")
    assert table[3].startswith("| detached |") and table[3].endswith("| 12.0 |")
