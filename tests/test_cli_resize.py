"""--resize crop|stretch|pad on edit, invert, eval and ablate (tiny model, small clips)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from p2v_fast.config import EditConfig
from p2v_fast.errors import InputError
from p2v_fast.media import framing, reader, samples
from p2v_fast.media.clip_selection import select_clip
from tests.helpers import p2v, sample_clip

FAST = ["--model", "tiny", "--size", "64", "--steps", "2", "--source-prompt", "a clip"]



@pytest.fixture(scope="module")
def clip(tmp_path_factory, tiny_dir) -> Path:
    return sample_clip(tmp_path_factory.mktemp("clip"), n_frames=3, size=(96, 64), audio=False)


def test_frame_geometry_of_a_davis_clip() -> None:
    assert framing.frame_geometry(854, 480, 512, "crop") == ((896, 512), (0, 0, 896, 512))
    assert framing.frame_geometry(854, 480, 512, "stretch") == ((512, 512), (0, 0, 512, 512))  # the paper's
    assert framing.frame_geometry(854, 480, 512, "pad") == ((512, 512), (0, 112, 512, 288))
    assert framing.frame_geometry(480, 854, 512, "pad") == ((512, 512), (112, 0, 288, 512))
    assert framing.frame_geometry(96, 64, 64, "pad") == ((64, 64), (0, 11, 64, 42))  # even sides for H.264
    with pytest.raises(InputError, match="--resize"):
        framing.frame_geometry(854, 480, 512, "squash")


def test_invert_stretch_gives_the_papers_512_square_for_a_davis_sized_clip(tmp_path, tiny_dir) -> None:
    davis = samples.make_sample_clip(tmp_path / "davis.mp4", n_frames=1, size=(854, 480), with_audio=False)
    for resize, size in (("stretch", "512x512"), ("pad", "512x512")):  # crop: 896x512 (frame_geometry above)
        r = p2v("invert", davis, "--model", "tiny", "--size", "512", "--steps", "1", "--source-prompt", "a swan",
                 "--resize", resize)
        assert r.exit_code == 0, r.output
        assert f"1 frame at {size} ({resize})" in r.output, r.output


def test_pad_working_frames_are_letterboxed_and_eval_sees_their_picture(clip) -> None:
    sel = select_clip(clip, EditConfig(size=64, resize="pad", output_size="working"))
    assert sel.size == (64, 64) and sel.box == (0, 11, 64, 42) and sel.output_size == (64, 42)
    frame = next(sel.frames())
    assert frame.shape == (64, 64, 3)
    assert not frame[:11].any() and not frame[53:].any() and frame[11:53].any()  # black bars, picture between
    # what `p2v eval --resize pad` compares the 64x42 output with: exactly the picture the edit saw
    source = next(reader.read_frames(clip, size=(64, 42), resize="crop"))
    np.testing.assert_array_equal(sel.to_output(frame), source)
    stretched = next(select_clip(clip, EditConfig(size=64, resize="stretch")).frames())
    squashed = Image.fromarray(next(reader.read_frames(clip))).resize((64, 64), Image.Resampling.LANCZOS)
    np.testing.assert_array_equal(stretched, np.asarray(squashed))


def test_edit_stretch_and_pad_outputs(clip, tmp_path) -> None:
    """Working sizes 64x64 (stretch) and 64x64 holding a 64x42 picture (pad): at --output-size working
    the output is that picture; by default the clip's own 96x64 (test_output_size.py)."""
    r = p2v("edit", clip, "a swan", "-o", tmp_path / "s.mp4", *FAST, "--resize", "stretch", "--output-size",
            "working")
    assert r.exit_code == 0, r.output
    info = reader.probe(tmp_path / "s.mp4")
    assert (info.width, info.height, info.n_frames) == (64, 64, 3)

    r = p2v("edit", clip, "a swan", "-o", tmp_path / "p.mp4", *FAST, "--resize", "pad", "--side-by-side",
            "--output-size", "working")
    assert r.exit_code == 0, r.output
    assert "output 64x42" in r.output.replace("\n", " ")
    info = reader.probe(tmp_path / "p.mp4")
    assert (info.width, info.height, info.n_frames) == (64, 42, 3)  # the bars are cut off
    sbs = reader.probe(tmp_path / "p.side-by-side.mp4")
    assert (sbs.width, sbs.height) == (128, 42)
    assert Image.open(tmp_path / "p.strip.png").size[1] == 2 * 42

    r = p2v("edit", clip, "a swan", "-o", tmp_path / "p.png", *FAST, "--resize", "pad", "--preview")
    assert r.exit_code == 0, r.output
    assert Image.open(tmp_path / "p.png").size == (96, 64)  # the input's size

    for out, resize in (("s.mp4", "stretch"), ("p.mp4", "pad")):
        r = p2v("eval", tmp_path / out, "--source", clip, "--prompt", "a swan", "--clip-model", "tiny",
                 "--resize", resize)
        assert r.exit_code == 0, r.output


def test_ablate_stretch(clip, tmp_path) -> None:
    out = tmp_path / "abl"
    r = p2v("ablate", clip, "a swan", "--out", out, *FAST, "--resize", "stretch", "--settings",
             "no-update,per-frame", "--clip-model", "tiny")
    assert r.exit_code == 0, r.output
    assert "3 frames at 64x64" in r.output.replace("\n", " ")
    # edited at 64x64, written at the clip's 96x64 (--output-size input)
    assert (reader.probe(out / "no-update.mp4").width, reader.probe(out / "per-frame.mp4").height) == (96, 64)


@pytest.mark.parametrize("command", ["edit", "invert", "eval", "ablate"])
def test_bad_resize_is_one_line(clip, tmp_path, command) -> None:
    args = {"edit": ["edit", clip, "a swan", *FAST], "invert": ["invert", clip, *FAST[:4]],
            "ablate": ["ablate", clip, "a swan", "--out", tmp_path / "a", *FAST, "--clip-model", "tiny"],
            "eval": ["eval", clip, "--source", clip, "--prompt", "a swan", "--clip-model", "tiny"]}[command]
    r = p2v(*args, "--resize", "squash")
    assert r.exit_code == 2
    assert r.output.strip().splitlines()[-1].startswith("error:") and "--resize" in r.output
