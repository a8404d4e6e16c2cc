"""--output-size input|working: the edit, its side-by-side, its strip and a preview are written at
the input's size by default (tiny model, 2 frames, 1 step, --size 64)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from p2v_fast.config import EditConfig
from p2v_fast.errors import InputError
from p2v_fast.media import framing, reader, samples
from tests.helpers import p2v, write_jobs

FAST = ["--model", "tiny", "--size", "64", "--steps", "1", "--source-prompt", "a clip"]
# a 160x120 picture in three known colours: a green band on top, red in the middle, a blue band below
BANDS = {"green": (slice(0, 30), (0, 200, 0)), "red": (slice(30, 90), (220, 0, 0)),
         "blue": (slice(90, 120), (0, 0, 220))}


def _dims(path: Path) -> tuple[int, int]:
    info = reader.probe(path)
    return info.width, info.height


@pytest.fixture(scope="module")
def wide(tmp_path_factory, tiny_dir) -> Path:
    """A 200x120 clip, 2 frames."""
    return samples.make_sample_clip(tmp_path_factory.mktemp("wide") / "wide.mp4", n_frames=2, size=(200, 120),
                                    with_audio=False)


def test_output_frame_geometry() -> None:
    # crop: the region the edit saw, at the source's scale (200x120 framed as 128x64 is its middle 200x100)
    assert framing.output_frame((200, 120), (128, 64), "crop") == ((0, 0, 128, 64), (200, 100))
    assert framing.output_frame((854, 480), (896, 512), "crop") == ((0, 0, 896, 512), (840, 480))
    assert framing.output_frame((160, 120), (64, 64), "stretch") == ((0, 0, 64, 64), (160, 120))
    box = framing.pad_box((160, 120), (64, 64))
    assert framing.output_frame((160, 120), (64, 64), "pad", box) == (box, (160, 120))  # bars cut, then resized
    assert framing.output_frame((201, 121), (64, 64), "stretch") == ((0, 0, 64, 64), (200, 120))  # even for H.264
    assert framing.output_frame((160, 120), (64, 64), "pad", box, "working") == (box, (64, 48))
    assert framing.output_frame((200, 120), (128, 64), "crop", None, "working") == ((0, 0, 128, 64), (128, 64))
    with pytest.raises(InputError, match="--output-size"):
        EditConfig(output_size="4k")


def test_edit_comes_back_at_the_inputs_size_unless_working(wide, tmp_path) -> None:
    r = p2v("edit", wide, "a swan", "-o", tmp_path / "s.mp4", *FAST, "--resize", "stretch", "--side-by-side")
    assert r.exit_code == 0, r.output
    assert "working size 64x64, output 200x120 (the input's size)" in r.output
    assert _dims(tmp_path / "s.mp4") == (200, 120)
    assert _dims(tmp_path / "s.side-by-side.mp4") == (400, 120)
    assert Image.open(tmp_path / "s.strip.png").size == (2 * 200, 2 * 120)

    r = p2v("edit", wide, "a swan", "-o", tmp_path / "w.mp4", *FAST, "--resize", "stretch", "--side-by-side",
            "--output-size", "working")
    assert r.exit_code == 0, r.output
    assert "working size 64x64, output 64x64 (--output-size working)" in r.output
    assert _dims(tmp_path / "w.mp4") == (64, 64)
    assert _dims(tmp_path / "w.side-by-side.mp4") == (128, 64)
    assert Image.open(tmp_path / "w.strip.png").size == (2 * 64, 2 * 64)


def test_a_frames_folder_comes_back_at_its_size(wide, tmp_path) -> None:
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, frame in enumerate(reader.read_frames(wide)):
        Image.fromarray(frame).save(folder / f"{i:03d}.png")
    r = p2v("edit", folder, "a swan", "-o", tmp_path / "p.mp4", *FAST, "--resize", "pad")
    assert r.exit_code == 0, r.output
    assert _dims(tmp_path / "p.mp4") == (200, 120)
    # crop (the default) edits the middle 200x100 of the 200x120 picture at 128x64 and gives it back at 200x100
    r = p2v("edit", folder, "a swan", "-o", tmp_path / "c.png", *FAST, "--preview")
    assert r.exit_code == 0, r.output
    assert "working size 128x64, output 200x100 (the cropped region at the input's scale)" in r.output
    assert Image.open(tmp_path / "c.png").size == (200, 100)


def _banded(path: Path) -> Path:
    frame = np.zeros((120, 160, 3), np.uint8)
    for rows, colour in BANDS.values():
        frame[rows] = colour
    return samples.make_sample_clip(path, size=(160, 120), with_audio=False, frames=[frame, frame])


class _SourceDecoder:
    """A sink backend whose 'decode' gives the next working source frame: the edit written is the
    input as the edit saw it, so the output's framing can be checked against known colours."""

    device = torch.device("cpu")

    def __init__(self, frames) -> None:
        self.frames = frames

    def vae_decode(self, latent: torch.Tensor) -> torch.Tensor:
        frame = torch.from_numpy(np.array(next(self.frames))).permute(2, 0, 1)[None].float()
        return frame / 127.5 - 1


def test_pad_comes_back_at_the_inputs_size_without_its_bars(tmp_path, tiny_dir, monkeypatch) -> None:
    from p2v_fast import pipeline
    from p2v_fast.media.clip_selection import select_clip
    from p2v_fast.method.frame_sink import FrameSink
    from p2v_fast.quality.evaluate import evaluate_video

    clip = _banded(tmp_path / "bands.mp4")
    base = EditConfig(prompt="a swan", model="tiny", size=64, steps=1, source_prompt="a clip", resize="pad")
    for output, wh in (("input", (160, 120)), ("working", (64, 48))):
        cfg = base.replace(output_size=output)
        decoder = _SourceDecoder(select_clip(clip, cfg).frames())  # letterboxed: black bars above and below
        monkeypatch.setattr(pipeline, "FrameSink", lambda _backend, consume, d=decoder: FrameSink(d, consume))
        out = tmp_path / f"{output}.mp4"
        res = pipeline.edit_video(cfg, clip, out, side_by_side=True)
        assert res.size == wh and res.working_size == (64, 64) and _dims(out) == wh
        h = wh[1]
        for edited in (next(reader.read_frames(out)), next(reader.read_frames(res.side_by_side))[:, wh[0]:]):
            assert edited.shape == (h, wh[0], 3)
            for rows, colour in BANDS.values():  # each band where the input has it (none black: no bars)
                lo, hi = round(rows.start * h / 120) + 3, round(rows.stop * h / 120) - 3
                np.testing.assert_allclose(edited[lo:hi, 3:-3].reshape(-1, 3).mean(0), colour, atol=12)
    # `p2v eval` compares the input-size output with its source like with like: pixel for pixel here
    diffs: list[float] = []
    ev = evaluate_video(tmp_path / "input.mp4", clip, "a swan", clip_model="tiny", resize="pad",
                        on_frame=lambda i, e, s: diffs.append(float(np.abs(e.astype(int) - s).mean())))
    assert ev.size == (160, 120) and len(diffs) == 2 and max(diffs) < 4, diffs


def test_batch_the_page_and_the_demo_follow_the_option(wide, tmp_path) -> None:
    from p2v_fast.apps.demo import demo_config
    from p2v_fast.apps.renders import Renderer, UISettings

    jobs = write_jobs(tmp_path, [{"input": str(wide), "output": str(tmp_path / "in.mp4")},
                                 {"input": str(wide), "output": str(tmp_path / "w.mp4"), "output_size": "working"}],
                      {"prompt": "a swan", "steps": 1, "source_prompt": "a clip", "resize": "stretch", "max_frames": 1})
    r = p2v("batch", jobs)
    assert r.exit_code == 0, r.output
    assert (_dims(tmp_path / "in.mp4"), _dims(tmp_path / "w.mp4")) == ((200, 120), (64, 64))
    page = Renderer(UISettings(out_dir=tmp_path / "ui", model="tiny", output_size="working"))
    assert page.config(prompt="a swan").output_size == "working"
    assert Renderer(UISettings(out_dir=tmp_path / "ui2", model="tiny")).config(prompt="a swan").output_size == "input"
    assert (demo_config().output_size, demo_config(output_size="working").output_size) == ("input", "working")
