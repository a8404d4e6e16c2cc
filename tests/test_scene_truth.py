"""Quality judged against a scene clip's ground truth (p2v_fast.quality.scene_truth): the judge
is checked on renders whose answer is known (the source, the truly recoloured scene, frames out of
order), so a broken judge cannot pass."""

from __future__ import annotations

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
