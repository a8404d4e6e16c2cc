"""Non-finite results are never written (issue 27, item 7): the options that blow up are bounded,
an edit whose latents go non-finite stops in one line naming the option, and a cached inversion
holding NaN is recomputed even when its checksum record was rewritten to match."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from p2v_fast.config import EditConfig
from p2v_fast.errors import InputError, P2VError
from p2v_fast.pipeline import edit_video
from tests.helpers import one_line_error, sample_clip
from tests.helpers import p2v as _p2v

FAST = ["--model", "tiny", "--size", "64", "--steps", "2", "--source-prompt", "a clip"]


@pytest.fixture(scope="module")
def clip(tmp_path_factory, tiny_dir) -> Path:
    return sample_clip(tmp_path_factory.mktemp("clip"), n_frames=3, size=(64, 64), audio=False)


@pytest.fixture()
def cache(own_cache: Path) -> Path:
    return own_cache


@pytest.mark.parametrize(("option", "value"), [("--guidance-scale", "1e308"), ("--guidance-scale", "101"),
                                               ("--update-weight", "1e30"), ("--update-weight", "1e308")])
def test_values_that_overflow_are_refused_in_one_line(clip, tmp_path, option, value) -> None:
    r = _p2v("edit", clip, "a swan", "-o", tmp_path / "o.mp4", *FAST, option, value)
    assert r.exit_code == 2
    assert f"{option} must be a finite number from" in one_line_error(r)
    assert not (tmp_path / "o.mp4").exists()


def test_the_page_and_the_cli_share_the_bounds() -> None:  # the page builds an EditConfig from its fields
    with pytest.raises(InputError, match="--guidance-scale"):
        EditConfig(prompt="x", guidance_scale=1e308)
    with pytest.raises(InputError, match="--update-weight"):
        EditConfig(prompt="x", update_weight=1e30)
    EditConfig(prompt="x", guidance_scale=100, update_weight=1e5)  # the bounds themselves are allowed


def _files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def test_latents_going_non_finite_stop_the_edit_naming_the_update_weight(clip, cache, tmp_path, monkeypatch) -> None:
    import p2v_fast.method.latent_update as latent_update

    real = latent_update.apply_update

    def overflowing(x_prev, grad, delta):  # the guided update of frames 2.. overflows, as with delta 1e30
        return real(x_prev, grad, float("inf"))

    monkeypatch.setattr(latent_update, "apply_update", overflowing)
    out = tmp_path / "out" / "o.mp4"
    out.parent.mkdir()
    cfg = EditConfig(prompt="a swan", model="tiny", size=64, steps=2, source_prompt="a clip", schedule="sequential")
    with pytest.raises(P2VError, match=r"non-finite \(NaN or inf\) at frame 2: lower --update-weight") as e:
        edit_video(cfg, clip, out, side_by_side=True)
    assert "nothing was written" in str(e.value)
    assert _files(out.parent) == set()  # no video, side-by-side, strip or temporary file


def test_an_anchor_going_non_finite_names_the_guidance_scale(clip, cache, tmp_path, monkeypatch) -> None:
    import p2v_fast.method.ddim as ddim

    real = ddim.DDIMSchedule.step

    def overflowing(self, x, eps, idx):
        x_prev, x0 = real(self, x, eps, idx)
        return x_prev * float("inf"), x0

    monkeypatch.setattr(ddim.DDIMSchedule, "step", overflowing)
    r = _p2v("edit", clip, "a swan", "-o", tmp_path / "o.mp4", *FAST)
    assert "at frame 1: lower --guidance-scale (it is 7.5" in one_line_error(r)
    assert not (tmp_path / "o.mp4").exists()


def test_a_cached_nan_frame_whose_record_was_rewritten_is_recomputed(clip, cache, tmp_path) -> None:
    assert _p2v("invert", clip, *FAST).exit_code == 0
    (entry,) = (cache / "inversions").iterdir()
    frame = entry / "frame_000001.safetensors"
    t = load_file(frame)
    t["x_T"][0, 0, 0, 0] = float("nan")
    save_file(t, frame)
    meta = json.loads((entry / "meta.json").read_text())
    data = frame.read_bytes()
    meta["files"][frame.name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (entry / "meta.json").write_text(json.dumps(meta))
    r = _p2v("invert", clip, *FAST)
    assert r.exit_code == 0, r.output
    assert "frame 1: non-finite values in x_T" in r.output and "recomputing" in r.output, r.output
    assert torch.isfinite(load_file(frame)["x_T"]).all()
