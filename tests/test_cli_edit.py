"""`p2v edit` end to end on the tiny model, as a user meets it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from p2v_fast.media import reader
from tests.helpers import digest, p2v, sample_clip

FAST = ["--model", "tiny", "--size", "64", "--steps", "4"]



@pytest.fixture(scope="module")
def clip(tmp_path_factory, tiny_dir) -> Path:
    return sample_clip(tmp_path_factory.mktemp("clip"), n_frames=6, size=(96, 64))


def test_edit_preserves_frames_fps_and_audio_and_is_deterministic(clip, tmp_path) -> None:
    before = digest(clip)
    out1, out2 = tmp_path / "a.mp4", tmp_path / "b.mp4"
    r1 = p2v("edit", clip, "a crochet swan", "-o", out1, *FAST, "--side-by-side", "--source-prompt", "a clip")
    assert r1.exit_code == 0, r1.output
    r2 = p2v("edit", clip, "a crochet swan", "-o", out2, *FAST, "--source-prompt", "a clip")
    assert r2.exit_code == 0, r2.output
    assert "cache hit" in r2.output  # the second edit of the clip does no inversion work
    src, info = reader.probe(clip), reader.probe(out1)
    assert info.n_frames == src.n_frames == 6
    assert info.fps == pytest.approx(src.fps)
    assert info.has_audio and src.has_audio
    # 96x64 is edited at 128x64 (short side 64, long side 96 -> 128) and written back at the input's scale:
    # the 96x48 region of it that 128x64 covers (--output-size input, crop)
    assert (info.width, info.height) == (96, 48)
    frames1, frames2 = list(reader.read_frames(out1)), list(reader.read_frames(out2))
    assert all(np.array_equal(a, b) for a, b in zip(frames1, frames2, strict=True))
    assert (tmp_path / "a.side-by-side.mp4").exists() and (tmp_path / "a.strip.png").exists()
    assert digest(clip) == before  # the input is never touched
    assert not list(tmp_path.glob(".*partial*"))


def test_stride_start_and_max_frames(clip, tmp_path) -> None:
    out = tmp_path / "s.mp4"
    r = p2v("edit", clip, "x", "-o", out, *FAST, "--start", "1", "--stride", "2", "--max-frames", "2",
             "--source-prompt", "a clip", "--latent-update", "detached")
    assert r.exit_code == 0, r.output
    info = reader.probe(out)
    assert info.n_frames == 2
    assert info.fps == pytest.approx(reader.probe(clip).fps / 2)


def test_preview_writes_the_anchor_frame(clip, tmp_path) -> None:
    out = tmp_path / "p.png"
    r = p2v("edit", clip, "a swan", "--preview", "-o", out, *FAST, "--source-prompt", "a clip")
    assert r.exit_code == 0, r.output
    from PIL import Image

    assert Image.open(out).size == (96, 48)  # edited at 128x64 (2:1): the 96x48 middle of the 96x64 clip


def test_the_edit_after_a_preview_reuses_its_inversion_of_frame_1(clip, tmp_path, own_cache) -> None:
    """Before: the preview's inversion (frame 1 alone) had a key of its own, so the full edit
    inverted frame 1 again."""
    opts = [*FAST, "--max-frames", "3", "--source-prompt", "a clip"]
    r = p2v("edit", clip, "a swan", "--preview", "-o", tmp_path / "p.png", *opts)
    assert r.exit_code == 0, r.output
    r = p2v("edit", clip, "a swan", "-o", tmp_path / "e.mp4", *opts)
    assert r.exit_code == 0, r.output
    assert "frame 1 from the preview's cache entry" in r.output.replace("\n", " "), r.output
    assert len(list((own_cache / "inversions").iterdir())) == 2  # the preview's entry and the clip's


def test_invert_reports_the_reconstruction_once(clip, own_cache) -> None:
    """Before: `p2v invert` logged the reconstruction error as it measured it, then printed it again."""
    r = p2v("invert", clip, *FAST, "--max-frames", "2", "--source-prompt", "a clip")
    assert r.exit_code == 0, r.output
    assert "cache hit" not in r.output  # a miss: the reconstruction was measured in this run
    assert r.output.count("regenerated from its inverted noise") == 1, r.output


@pytest.mark.parametrize(("schedule", "lengths"), [("sequential", (3, 8)), ("wavefront", (5, 8))])
def test_feature_memory_is_constant_in_clip_length(tmp_path, tiny_dir, schedule, lengths) -> None:
    """Either schedule: the anchor's features for every step and about one frame's steps' worth
    of the other frames' (for each step, the frame whose successor has not reached it keeps it;
    p2v_fast.method.plan), the same for 5 or 8 frames."""
    from p2v_fast.config import EditConfig
    from p2v_fast.nets.runtime import load_runtime
    from p2v_fast.pipeline import edit_video

    clip = sample_clip(tmp_path, n_frames=8, size=(64, 64), audio=False)
    cfg = EditConfig(prompt="a swan", model="tiny", size=64, steps=3, source_prompt="a clip",
                     latent_update="detached", schedule=schedule)
    rt = load_runtime(cfg)
    peaks = []
    for n in lengths:
        res = edit_video(cfg.replace(max_frames=n), clip, tmp_path / f"{n}.mp4", runtime=rt)
        peaks.append(res.stats.peak_feature_bytes)
    assert peaks[0] == peaks[1] > 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["edit", "{missing}", "a swan"], "does not exist"),
        (["edit", "{text}", "a swan"], "not"),
        (["edit", "{empty_dir}", "a swan"], "images in folder"),
        (["edit", "{clip}", "   "], "prompt is empty"),
        (["edit", "{clip}", "a swan", "--size", "100"], "--size"),
        (["edit", "{clip}", "a swan", "--latent-update", "sideways"], "--latent-update"),
        (["edit", "{clip}", "a swan", "--refs", "everything"], "--refs"),
        (["edit", "{clip}", "a swan", "--steps", "0"], "--steps"),
        (["edit", "{clip}", "a swan", "--start", "99"], "start"),
        (["edit", "{clip}", "a swan", "-o", "{clip}"], "is the input"),
        (["edit", "{clip}", "a swan", "-o", "{existing}"], "--overwrite"),
        (["edit", "{clip}", "a swan", "-o", "{text}/out.mp4"], "notes.mp4' is a file, not a folder"),
        (["edit", "{clip}", "a swan", "-o", "{text}/sub/out.mp4"], "notes.mp4' is a file, not a folder"),
        (["edit", "{clip}", "a swan", "--model", "./no/such/model"], "does not exist"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(clip, tmp_path, args, message) -> None:
    text = tmp_path / "notes.mp4"
    text.write_text("not a video")
    empty = tmp_path / "empty"
    empty.mkdir()
    existing = tmp_path / "existing.mp4"
    existing.write_bytes(b"keep me")
    subst = {"missing": tmp_path / "nope.mp4", "text": text, "empty_dir": empty, "clip": clip, "existing": existing}
    formatted = [a.format(**subst) for a in args]
    defaults = ["--model", "tiny", "--size", "64", "--steps", "2"][0 if "--model" not in args else 2 :]
    argv = formatted[:3] + defaults + formatted[3:]  # the case's own options come last and win
    before = digest(clip)
    r = p2v(*argv)
    assert r.exit_code != 0
    lines = [ln for ln in r.output.strip().splitlines() if ln.strip()]
    assert "Traceback" not in r.output
    assert lines and lines[-1].startswith("error:"), r.output
    assert message in r.output.replace("\n", " ")
    assert existing.read_bytes() == b"keep me"
    assert digest(clip) == before


def test_unwritable_output_folder(clip, tmp_path, monkeypatch) -> None:
    import os

    from p2v_fast.errors import InputError
    from p2v_fast.media.paths import check_output

    monkeypatch.setattr(os, "access", lambda path, mode: False)  # root can write anywhere here
    with pytest.raises(InputError, match="not writable"):
        check_output(clip, tmp_path / "out.mp4", overwrite=False)


def test_installed_command_reports_errors_without_traceback(tmp_path) -> None:
    proc = subprocess.run([sys.executable, "-m", "cli", "edit", str(tmp_path / "nope.mp4"), "x"],
                          capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("error:")


def test_out_of_memory_at_one_frame_is_one_line(clip, tmp_path, monkeypatch) -> None:
    import p2v_fast.pipeline

    def too_big(*args, **kwargs):
        raise __import__("torch").OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(p2v_fast.pipeline, "run_schedule", too_big)
    out = tmp_path / "oom.mp4"
    r = p2v("edit", clip, "a swan", "-o", out, *FAST, "--source-prompt", "a clip")
    assert r.exit_code == 1
    lines = r.output.strip().splitlines()
    assert lines[-1].startswith("error: out of memory") and "Traceback" not in r.output
    assert not out.exists()


def test_prompts_past_clips_token_limit_warn_once_each_with_the_dropped_part(clip, tmp_path, tiny_models) -> None:
    """Target, negative and source prompts past 77 tokens: one warning line each, naming the
    prompt and showing what CLIP cuts off (as diffusers does); a short prompt: no warning."""
    from p2v_fast.weights.prompts import dropped_part

    tok = tiny_models.tokenizer
    long = {what: f"{what} " + "and ever more words " * 8 + f"tail of the {what}" for what in ("target", "negative",
                                                                                             "source")}
    models = type("M", (), {"tokenizer": tok})()
    for text in long.values():
        dropped = dropped_part(models, text)
        assert dropped and text.endswith(dropped.strip()[-8:])  # the end of the prompt is what is lost
    assert dropped_part(models, "a crochet swan") is None

    r = p2v("edit", clip, long["target"], "-o", tmp_path / "long.mp4", *FAST, "--max-frames", "2",
             "--negative-prompt", long["negative"], "--source-prompt", long["source"], "--latent-update", "off")
    assert r.exit_code == 0, r.output
    text = r.output.replace("\n", " ")
    for what in ("target", "negative", "source"):
        assert text.count(f"warning: the {what} prompt is longer than CLIP's 77 tokens") == 1, r.output
        assert f"tail of the {what}" in text
    r = p2v("edit", clip, "a swan", "-o", tmp_path / "short.mp4", *FAST, "--max-frames", "2",
             "--source-prompt", "a clip", "--latent-update", "off")
    assert r.exit_code == 0 and "warning:" not in r.output
    r = p2v("invert", clip, "--model", "tiny", "--size", "64", "--steps", "2", "--max-frames", "2",
             "--source-prompt", long["source"])
    assert r.exit_code == 0 and r.output.count("warning: the source prompt is longer") == 1, r.output
