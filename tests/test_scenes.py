"""The scene renderer: deterministic, and its depth and flow agree with the camera (reprojection)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from p2v_fast.media import scenes as sc


def _bilinear(img: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Sample img [H,W,C] at pixel coordinates (pixel centres at i + 0.5)."""
    h, w = img.shape[:2]
    x = np.clip(x - 0.5, 0, w - 1)
    y = np.clip(y - 0.5, 0, h - 1)
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    x1, y1 = np.minimum(x0 + 1, w - 1), np.minimum(y0 + 1, h - 1)
    ax, ay = (x - x0)[..., None], (y - y0)[..., None]
    return (img[y0, x0] * (1 - ax) * (1 - ay) + img[y0, x1] * ax * (1 - ay)
            + img[y1, x0] * (1 - ax) * ay + img[y1, x1] * ax * ay)


def test_clip_shapes_and_determinism():
    a = sc.render_clip(7, 4, (64, 48))
    b = sc.render_clip(7, 4, (64, 48))
    assert a.frames.shape == (4, 48, 64, 3) and a.frames.dtype == np.uint8
    assert a.depth.shape == (4, 48, 64) and a.depth.dtype == np.float32
    assert a.ids.shape == (4, 48, 64) and a.ids.dtype == np.int16
    assert a.flow.shape == (3, 48, 64, 2) and a.flow.dtype == np.float32
    assert a.occluded.shape == (3, 48, 64) and a.occluded.dtype == bool
    for name in ("frames", "depth", "ids", "flow", "occluded"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    assert a.caption == b.caption
    assert 1 <= len(a.objects) <= 3
    assert set(np.unique(a.ids)) <= set(range(len(a.objects) + 1))
    assert sc.render_clip(8, 2).caption != a.caption or not np.array_equal(sc.render_clip(8, 2).frames[0], a.frames[0])


def test_captions_use_the_grammar():
    for seed in range(30):
        scene = sc.random_scene(np.random.default_rng(seed))
        cap = sc.caption_of(scene)
        assert set(cap.split()) <= set(sc.GRAMMAR_WORDS), cap
        assert cap.endswith(f"on a {scene.floor} floor")
        for o in scene.objects:
            assert f"{o.colour} {o.shape}" in cap


def test_depth_agrees_with_the_geometry():
    """Unprojecting the depth lands floor pixels on y = 0 and sphere pixels on the sphere."""
    for seed in range(12):
        clip = sc.render_clip(seed, 2, (64, 64))
        scene = clip.scene
        pts = sc.unproject(scene, 1.0, clip.depth[1].astype(np.float64))
        bg = clip.ids[1] == 0
        on_floor = bg & (np.abs(pts[..., 2] - sc.WALL_Z) > 1e-3)
        assert np.abs(pts[on_floor][:, 1]).max() < 1e-3
        wall = bg & ~on_floor
        assert np.all(pts[wall][:, 1] > -1e-3)
        for k, o in enumerate(scene.objects, start=1):
            m = clip.ids[1] == k
            if o.shape == "sphere" and m.any():
                c = o.centre(1.0) + np.array([0.0, o.size, 0.0])
                r = np.linalg.norm(pts[m] - c, axis=-1)
                assert np.abs(r - o.size).max() < 1e-3
        # reprojecting the points gives back the pixel centres
        uv, z = sc.project(scene, 1.0, pts, (64, 64))
        assert np.allclose(uv[..., 0], np.arange(64)[None, :] + 0.5, atol=1e-3)
        assert np.allclose(z, clip.depth[1], rtol=1e-4)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_flow_warps_next_frame_onto_this_one(seed):
    """frame[t+1] sampled at x + flow(x) equals frame[t] where not occluded (faster motion than usual)."""
    scene = sc.random_scene(np.random.default_rng(seed), 4)
    scene = replace(scene, daz=scene.daz * 3 + 0.5,
                    objects=tuple(replace(o, vx=o.vx * 3 + 0.05, vz=o.vz * 3) for o in scene.objects))
    clip = sc.render_scene_clip(scene, 2, (128, 128))
    h, w = clip.depth.shape[1:]
    u = np.arange(w)[None, :] + 0.5 + clip.flow[0, ..., 0]
    v = np.arange(h)[:, None] + 0.5 + clip.flow[0, ..., 1]
    warped = _bilinear(clip.frames[1].astype(np.float64), u, v)
    keep = ~clip.occluded[0]
    assert keep.mean() > 0.7
    err = np.abs(warped - clip.frames[0]).mean(-1)[keep].mean()
    still = np.abs(clip.frames[1].astype(np.float64) - clip.frames[0]).mean(-1)[keep].mean()
    assert np.abs(clip.flow).max() > 2.0
    assert err < 3.0, err
    assert err < 0.35 * still, (err, still)


def test_occlusion_marks_points_that_leave_or_hide():
    scene = sc.random_scene(np.random.default_rng(5), 4)
    scene = replace(scene, daz=2.0)  # a fast pan: a border strip leaves the view
    clip = sc.render_scene_clip(scene, 2, (64, 64))
    f = clip.flow[0]
    u = np.arange(64)[None, :] + 0.5 + f[..., 0]
    v = np.arange(64)[:, None] + 0.5 + f[..., 1]
    outside = (u < 0) | (u >= 64) | (v < 0) | (v >= 64)
    assert outside.any()
    assert clip.occluded[0][outside].all()


def test_write_clip_folder_and_video(tmp_path):
    clip = sc.render_clip(11, 3, (64, 64))
    folder = sc.write_clip(clip, tmp_path / "clip")
    assert len(list(folder.glob("frame_*.png"))) == 3
    gt = np.load(folder / "ground_truth.npz")
    assert np.array_equal(gt["flow"], clip.flow) and np.array_equal(gt["ids"], clip.ids)
    video = sc.write_clip(clip, tmp_path / "clip.mp4")
    assert video.is_file() and video.with_suffix(".npz").is_file() and video.with_suffix(".json").is_file()


def test_clip_tokenizer_keeps_grammar_words_whole(tmp_path):
    from training.tokenizer import build_scene_clip_tokenizer

    tok = build_scene_clip_tokenizer(tmp_path / "tok")
    for w in sc.GRAMMAR_WORDS:
        assert len(tok.tokenize(w)) == 1, (w, tok.tokenize(w))
    cap = "a red sphere and a blue cube on a checkered floor"
    assert len(tok.tokenize(cap)) == len(cap.split())
    assert len(tok.tokenize("a zebra!")) > 2  # unknown text still tokenizes (byte level)
    ids = tok(cap, padding="max_length", max_length=77, truncation=True).input_ids
    assert len(ids) == 77 and max(ids) < len(tok)
    again = type(tok).from_pretrained(str(tmp_path / "tok"))
    assert again(cap).input_ids == tok(cap).input_ids


def test_bert_vocab_covers_the_grammar(tmp_path):
    from training.tokenizer import build_scene_bert_vocab

    tok = build_scene_bert_vocab(tmp_path / "bert")
    for w in sc.GRAMMAR_WORDS:
        assert tok.tokenize(w) == [w]
    assert "[UNK]" not in tok.tokenize("a zebra")
    assert tok.bos_token == "[DEC]"
