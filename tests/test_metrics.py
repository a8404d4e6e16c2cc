"""Table 2 metrics: Pixel-MSE on synthetic motion, CLIP scores with the tiny offline CLIP."""

from __future__ import annotations

import importlib.util
import itertools

import cv2
import numpy as np
import pytest
import torch

from p2v_fast.errors import InputError, ModelLoadError
from p2v_fast.quality.metrics import (
    ClipScorer,
    PixelMSEResult,
    StreamingEvaluator,
    clip_image_score,
    clip_text_score,
    evaluate,
    pixel_mse,
)
from p2v_fast.weights.tiny import TINY_CLIP_DIR

H, W = 96, 128  # frame size of the synthetic clips
SHIFT = 3  # pan, pixels per frame


def texture(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth random colour texture, values kept in [30, 225] (no clipping under jitter)."""
    rng = np.random.default_rng(seed)
    n = cv2.GaussianBlur(rng.normal(size=(h, w, 3)).astype(np.float32), (0, 0), 3)
    n = (n - n.mean()) / n.std()
    return np.clip(128 + 40 * n, 30, 225).astype(np.uint8)


def panned_clip(n: int, shift: int = SHIFT, seed: int = 0) -> list[np.ndarray]:
    """Frames cropped from a bigger texture, the window moving right by ``shift`` px/frame.

    Content moves left in the frame; ``shift`` new columns enter at the right each frame and
    the ``shift`` leftmost ones leave. No wrap-around: every frame is a real crop.
    """
    big = texture(H + 20, W + shift * n + 20, seed)
    return [
        big[10 : 10 + H, 10 + t * shift : 10 + t * shift + W].copy() for t in range(n)
    ]


@pytest.fixture(scope="module")
def clip6() -> list[np.ndarray]:
    return panned_clip(6)


@pytest.fixture(scope="session")
def tiny_scorer(tmp_path_factory: pytest.TempPathFactory):
    """Tiny random CLIP built once into a temporary P2V_CACHE (env restored afterwards)."""
    cache = tmp_path_factory.mktemp("clip-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("P2V_CACHE", str(cache))
        scorer = ClipScorer("tiny")  # the env is restored as soon as the model is built
    return scorer, cache


# ------------------------------------------------------------------------------ Pixel-MSE


def test_identical_edit_under_pan_is_near_zero(clip6):
    r = pixel_mse(clip6, clip6)
    assert isinstance(r, PixelMSEResult)
    assert len(r.per_pair) == len(clip6) - 1
    assert r.mse < 1.0, r
    # at least the columns entering at the border are excluded, but not much more
    assert SHIFT / W <= r.masked_fraction < 0.15, r.masked_fraction


def test_warp_direction_matters(clip6):
    # Comparing each frame with the *previous* frame's pixels unwarped is far worse: the flow
    # is used, and used the right way round (a sign error would double the misalignment).
    static = pixel_mse(clip6, [clip6[0]] * len(clip6))  # zero flow: no warping at all
    flicker_free = pixel_mse(clip6, clip6).mse
    assert static.mse > 20 * max(flicker_free, 1.0)
    assert static.masked_fraction < 0.01


def test_grows_monotonically_with_flicker(clip6):
    values = []
    for amp in (0, 2, 5, 10, 20):
        edited = [
            (f.astype(np.int16) + (amp if t % 2 else -amp)).astype(np.uint8)
            for t, f in enumerate(clip6)
        ]
        values.append(pixel_mse(edited, clip6).mse)
        # alternating +-amp: consecutive frames differ by 2*amp everywhere
        assert values[-1] == pytest.approx((2 * amp) ** 2, abs=1.0, rel=0.05)
    assert all(a < b for a, b in itertools.pairwise(values)), values


def test_occluded_border_pixels_are_excluded():
    src = panned_clip(2, seed=3)
    base = pixel_mse(src, src)
    assert base.masked_fraction >= SHIFT / W
    rng = np.random.default_rng(7)

    def noise(w: int) -> np.ndarray:
        return rng.integers(0, 256, (H, w, 3), dtype=np.uint8)

    # Columns that leave (frame 0, left) and enter (frame 1, right) have no correspondence.
    ed = [f.copy() for f in src]
    ed[0][:, :SHIFT] = noise(SHIFT)
    ed[1][:, W - SHIFT :] = noise(SHIFT)
    occl = pixel_mse(ed, src)
    assert abs(occl.mse - base.mse) < 1.0, (occl, base)
    # the mask depends on the source only
    assert occl.masked_fraction == base.masked_fraction

    # The same corruption in the middle of the frame is counted.
    ed = [f.copy() for f in src]
    ed[1][:, W // 2 : W // 2 + SHIFT] = noise(SHIFT)
    assert pixel_mse(ed, src).mse > 50 * max(base.mse, 1.0)


@pytest.mark.parametrize(("a", "b"), [(3, 252), (252, 3), (0, 255)])
def test_no_uint8_wraparound(a, b):
    src = [texture(H, W, 1)] * 2  # static scene: valid everywhere
    ed = [np.full((H, W, 3), a, np.uint8), np.full((H, W, 3), b, np.uint8)]
    r = pixel_mse(ed, src)
    assert r.masked_fraction == 0.0
    assert r.mse == pytest.approx(float(a - b) ** 2, rel=1e-6)


# ------------------------------------------------------------------------------ CLIP


def test_tiny_clip_is_cached_and_reloads(tiny_scorer):
    scorer, cache = tiny_scorer
    model_dir = cache / "models" / TINY_CLIP_DIR
    assert (model_dir / "config.json").is_file()
    assert (model_dir / "model.safetensors").is_file()
    # no temp dirs left behind
    assert [p.name for p in (cache / "models").iterdir()] == [TINY_CLIP_DIR]
    mtime = (model_dir / "config.json").stat().st_mtime_ns
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("P2V_CACHE", str(cache))
        again = ClipScorer("tiny")  # loads, does not rebuild
    assert (model_dir / "config.json").stat().st_mtime_ns == mtime
    frames = panned_clip(2)
    assert torch.allclose(scorer.image_embeds(frames), again.image_embeds(frames))
    # the same folder loads as an explicit path, like any real model
    by_path = ClipScorer(str(model_dir))
    assert torch.allclose(scorer.text_embeds("a cat"), by_path.text_embeds("a cat"))


def test_processor_resizes_and_crops_odd_frames(tiny_scorer):
    scorer, _ = tiny_scorer
    size = scorer.model.config.vision_config.image_size
    odd = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    pix = scorer.preprocess([odd, odd])
    assert tuple(pix.shape) == (2, 3, size, size)
    assert pix.dtype == torch.float32
    # CLIP-normalised, not 0..1
    assert float(pix.min()) < -0.5 and float(pix.max()) > 0.5
    emb = scorer.image_embeds([odd])
    assert tuple(emb.shape) == (1, scorer.dim)


def test_embeddings_normalised_and_batched(tiny_scorer):
    scorer, _ = tiny_scorer
    frames = panned_clip(5, shift=8)
    emb = scorer.image_embeds(frames)
    assert tuple(emb.shape) == (5, scorer.dim)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(5), atol=1e-5)
    txt = scorer.text_embeds(["a red car", "a watercolour painting of a dog", "x"])
    assert tuple(txt.shape) == (3, scorer.dim)
    assert torch.allclose(txt.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert not torch.allclose(txt[0], txt[1])
    old = scorer.batch_size
    try:
        scorer.batch_size = 2
        assert torch.allclose(scorer.image_embeds(frames), emb, atol=1e-5)
        assert torch.allclose(
            scorer.text_embeds(["a red car", "a watercolour painting of a dog", "x"]),
            txt,
            atol=1e-5,
        )
    finally:
        scorer.batch_size = old


def test_clip_scores(tiny_scorer):
    scorer, _ = tiny_scorer
    frame = texture(H, W, 4)
    assert clip_image_score(scorer, [frame] * 4) == pytest.approx(1.0, abs=1e-5)
    frames = [texture(H, W, s) for s in range(3)]
    assert clip_image_score(scorer, frames) < 1.0 - 1e-5
    score = clip_text_score(scorer, frames, "a photo of a cat")
    emb, txt = scorer.image_embeds(frames), scorer.text_embeds("a photo of a cat")
    assert score == pytest.approx(float((emb @ txt[0]).mean()), abs=1e-6)
    assert -1.0 <= score <= 1.0


def test_evaluate(tiny_scorer, clip6):
    scorer, _ = tiny_scorer
    out = evaluate(clip6, clip6, "a panning shot", scorer)
    assert set(out) == {
        "clip_text",
        "clip_image",
        "pixel_mse",
        "masked_fraction",
        "n_frames",
    }
    assert out["n_frames"] == 6
    ref = pixel_mse(clip6, clip6)
    assert out["pixel_mse"] == ref.mse and out["masked_fraction"] == ref.masked_fraction
    assert out["clip_image"] == pytest.approx(clip_image_score(scorer, clip6), abs=1e-6)
    assert out["clip_text"] == pytest.approx(
        clip_text_score(scorer, clip6, "a panning shot"), abs=1e-6
    )


@pytest.mark.parametrize("batch_size", [1, 4, 16])
def test_streaming_evaluator_matches_evaluate(tiny_scorer, clip6, batch_size):
    """Frames fed one at a time, CLIP batches cut anywhere: the same numbers as evaluate()."""
    scorer, _ = tiny_scorer
    rng = np.random.default_rng(3)
    edited = [np.clip(f.astype(int) + rng.integers(-20, 21, f.shape), 0, 255).astype(np.uint8) for f in clip6]
    ref = evaluate(edited, clip6, "a panning shot", scorer)
    old = scorer.batch_size
    scorer.batch_size = batch_size
    try:
        ev = StreamingEvaluator(scorer, "a panning shot")
        for e, s in zip(edited, clip6, strict=True):
            ev.add(e, s)
        out = ev.result()
    finally:
        scorer.batch_size = old
    assert set(out) == set(ref) and out["n_frames"] == 6 and len(ev.per_pair) == 5
    for k in ("clip_text", "clip_image"):
        assert out[k] == pytest.approx(ref[k], abs=1e-6)
    assert out["pixel_mse"] == pytest.approx(ref["pixel_mse"], rel=1e-9)
    assert out["masked_fraction"] == ref["masked_fraction"]


def test_streaming_evaluator_bad_inputs(tiny_scorer, clip6):
    scorer, _ = tiny_scorer
    with pytest.raises(InputError, match="empty"):
        StreamingEvaluator(scorer, "  ")
    with pytest.raises(InputError, match="farneback"):
        StreamingEvaluator(scorer, "a cat", flow="farneback")
    ev = StreamingEvaluator(scorer, "a cat")
    ev.add(clip6[0], clip6[0])
    with pytest.raises(InputError, match="at least 2"):
        ev.result()
    with pytest.raises(InputError, match="64x48"):
        ev.add(cv2.resize(clip6[1], (64, 48)), clip6[1])
    with pytest.raises(InputError, match="source frame 1"):
        ev.add(clip6[1], cv2.resize(clip6[1], (64, 48)))


# ------------------------------------------------------------------------------ errors


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_bad_inputs(clip6, tiny_scorer):
    scorer, _ = tiny_scorer
    with pytest.raises(InputError) as e:
        pixel_mse(clip6, clip6[:5])
    assert "6" in _one_line(e) and "5" in str(e.value)
    small = [cv2.resize(f, (64, 48)) for f in clip6]
    with pytest.raises(InputError) as e:
        pixel_mse(small, clip6)
    assert "64x48" in _one_line(e) and "128x96" in str(e.value)
    with pytest.raises(InputError) as e:
        pixel_mse(clip6[:1], clip6[:1])
    assert "1" in _one_line(e)
    with pytest.raises(InputError):
        pixel_mse([], [])
    with pytest.raises(InputError) as e:
        pixel_mse([f.astype(np.float32) for f in clip6], clip6)
    assert "float32" in _one_line(e)
    with pytest.raises(InputError) as e:
        pixel_mse(clip6, clip6, flow="farneback")
    assert "farneback" in _one_line(e)
    for prompt in ("", "   "):
        with pytest.raises(InputError) as e:
            evaluate(clip6, clip6, prompt, scorer)
        assert repr(prompt) in _one_line(e)
        with pytest.raises(InputError):
            clip_text_score(scorer, clip6, prompt)
    with pytest.raises(InputError):
        evaluate(clip6, clip6[:4], "a cat", scorer)
    with pytest.raises(InputError):
        clip_image_score(scorer, clip6[:1])


@pytest.mark.skipif(
    importlib.util.find_spec("torchvision") is not None,
    reason="torchvision is installed",
)
def test_raft_without_torchvision_is_a_clear_error(clip6):
    with pytest.raises(ModelLoadError) as e:
        pixel_mse(clip6, clip6, flow="raft")
    assert "torchvision" in _one_line(e)


def test_clip_load_failure_is_one_line(tmp_path):
    with pytest.raises(ModelLoadError) as e:
        ClipScorer(str(tmp_path / "no-such-clip"))
    msg = _one_line(e)
    assert "--clip-model tiny" in msg and "no-such-clip" in msg


def test_the_papers_table2_is_written_once() -> None:
    """Table 2's numbers live in quality/metrics.py only; the eval table and the ablation's
    report print them from there, as the paper prints them."""
    import ast
    from pathlib import Path

    from p2v_fast.quality.metrics import PAPER_TABLE2, paper_scores

    assert paper_scores() == ("0.2891", "0.9767", "228.62")
    assert paper_scores("no-update") == ("0.2893", "0.9740", "371.18")
    root = Path(__file__).resolve().parents[1]
    numbers = {v for row in PAPER_TABLE2.values() for v in row.values()}
    texts = {s for row in PAPER_TABLE2 for s in paper_scores(row)}
    offenders = []
    for pkg in ("p2v_fast", "benchmarks", "export"):
        for path in sorted((root / pkg).rglob("*.py")):
            if path == root / "p2v_fast" / "quality" / "metrics.py":
                continue
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                value = node.value if isinstance(node, ast.Constant) else None
                if value in numbers or (isinstance(value, str) and any(t in value for t in texts)):
                    offenders.append(f"{path.relative_to(root)}:{node.lineno}")
    assert not offenders, offenders
