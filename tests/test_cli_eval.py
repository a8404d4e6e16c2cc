"""`p2v eval` and `p2v ablate` end to end (tiny random models, offline), and their pure helpers."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from p2v_fast.apps.ablation import (
    DEFAULT_SETTINGS,
    GAP,
    LABEL_H,
    SETTINGS,
    AblationResult,
    AblationRow,
    contact_sheet,
    markdown_table,
    parse_settings,
    sheet_indices,
    sheet_size,
)
from p2v_fast.errors import InputError
from p2v_fast.files import json_safe
from p2v_fast.media import reader, writer
from tests.helpers import p2v

EVAL_FIELDS = {
    "edited", "source", "prompt", "clip_model", "flow", "size", "n_frames", "source_start", "source_stride",
    "clip_text", "clip_image", "pixel_mse", "masked_fraction", "per_pair_pixel_mse", "ground_truth",
}
CLIP_SIZE = (128, 64)  # (W, H): at --size 64 the working size is exactly this, no resampling


def panned_frames(n: int, size: tuple[int, int] = CLIP_SIZE, shift: int = 2) -> list[np.ndarray]:
    """A smooth random colour texture panned ``shift`` px per frame (uint8 frames, ``size`` = (W, H)).

    Smooth content and an even shift keep optical flow exact and H.264's 4:2:0 chroma grid
    aligned from frame to frame, so a clip scored against itself has Pixel-MSE near 0. (An odd
    shift of fine chroma detail alone gives ~60 after 4:2:0 subsampling.)
    """
    w, h = size
    rng = np.random.default_rng(0)
    noise = cv2.GaussianBlur(rng.normal(size=(h + 20, w + shift * n + 20, 3)).astype(np.float32), (0, 0), 3)
    big = np.clip(128 + 40 * (noise - noise.mean()) / noise.std(), 30, 225).astype(np.uint8)
    return [big[10 : 10 + h, 10 + t * shift : 10 + t * shift + w].copy() for t in range(n)]


def write_clip(path: Path, frames: list[np.ndarray]) -> Path:
    with writer.VideoWriter(path, 12.0, (frames[0].shape[1], frames[0].shape[0])) as out:
        for f in frames:
            out.write(f)
    return path


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("clips")
    frames = panned_frames(6)
    return {"six": write_clip(d / "six.mp4", frames), "four": write_clip(d / "four.mp4", frames[:4])}


def assert_one_line_error(result, *needles: str) -> str:
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:"), lines[0]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


# ------------------------------------------------------------------------------------------- eval


def test_eval_clip_against_itself(clips: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "scores.json"
    clip = str(clips["six"])
    r = p2v("eval", clip, "--source", clip, "--prompt", "a red ball", "--clip-model", "tiny",
            "--json", str(out))
    assert r.exit_code == 0, r.output
    for header in ("CLIP-Text", "CLIP-Image", "Pixel-MSE"):
        assert header in r.stdout
    data = json.loads(out.read_text())
    assert set(data) == EVAL_FIELDS
    assert data["n_frames"] == 6 and data["size"] == list(CLIP_SIZE)
    assert data["clip_model"] == "tiny" and data["flow"] == "dis" and data["prompt"] == "a red ball"
    assert len(data["per_pair_pixel_mse"]) == 5
    # Identical videos: warping with the source's own flow reproduces the next frame.
    assert data["pixel_mse"] < 1.0, data["pixel_mse"]
    assert data["clip_image"] > 0.95, data["clip_image"]
    assert -1.0 <= data["clip_text"] <= 1.0
    assert 0.0 <= data["masked_fraction"] < 0.5
    assert not list(tmp_path.glob(".*partial*"))  # the atomic write left nothing behind
    assert out.stat().st_mode & 0o777 == 0o666 & ~_umask()  # like the videos (before: 0600)


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_eval_source_selection_and_size(clips: dict[str, Path], tmp_path: Path) -> None:
    """A 4-frame edit of the first 4 frames of a 6-frame source; compared at a smaller size."""
    out = tmp_path / "s.json"
    r = p2v("eval", str(clips["four"]), "--source", str(clips["six"]), "--prompt", "a red ball",
            "--clip-model", "tiny", "--max-frames", "4", "--size", "32", "--json", str(out))
    assert r.exit_code == 0, r.output
    data = json.loads(out.read_text())
    assert data["n_frames"] == 4 and data["size"] == [64, 32]
    assert data["pixel_mse"] < 10.0


def test_eval_different_lengths(clips: dict[str, Path]) -> None:
    r = p2v("eval", str(clips["four"]), "--source", str(clips["six"]), "--prompt", "a cat",
            "--clip-model", "tiny")
    assert_one_line_error(r, "4", "6", "differ")
    assert r.exit_code == InputError.exit_code


@pytest.mark.parametrize("prompt", ["", "   "])
def test_eval_empty_prompt(clips: dict[str, Path], prompt: str) -> None:
    clip = str(clips["six"])
    r = p2v("eval", clip, "--source", clip, "--prompt", prompt, "--clip-model", "tiny")
    assert_one_line_error(r, "prompt", "empty")


@pytest.mark.parametrize("which", ["edited", "source"])
def test_eval_missing_file(clips: dict[str, Path], tmp_path: Path, which: str) -> None:
    missing = str(tmp_path / "nope.mp4")
    clip = str(clips["six"])
    edited, source = (missing, clip) if which == "edited" else (clip, missing)
    r = p2v("eval", edited, "--source", source, "--prompt", "a cat", "--clip-model", "tiny")
    assert_one_line_error(r, which, "nope.mp4")


def test_eval_bad_flow_and_clip_model(clips: dict[str, Path], tmp_path: Path) -> None:
    clip = str(clips["six"])
    r = p2v("eval", clip, "--source", clip, "--prompt", "a cat", "--flow", "farneback")
    assert_one_line_error(r, "farneback")
    r = p2v("eval", clip, "--source", clip, "--prompt", "a cat",
            "--clip-model", str(tmp_path / "no-such-clip"))
    assert_one_line_error(r, "no-such-clip")


# ----------------------------------------------------------------------------------------- ablate


def test_ablate_tiny(clips: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "abl"
    args = ["ablate", str(clips["six"]), "a red ball on a checkerboard", "--out", str(out), "--model", "tiny",
            "--size", "64", "--steps", "4", "--max-frames", "3", "--clip-model", "tiny"]
    r = p2v(*args)
    assert r.exit_code == 0, r.output
    print(r.stdout)  # the table (pytest -s shows it)

    labels = [SETTINGS[k].label for k in DEFAULT_SETTINGS]
    for label in labels:
        assert label in r.stdout
    for header in ("CLIP-Text", "CLIP-Image", "Pixel-MSE", "s/frame"):
        assert header in r.stdout

    for key in DEFAULT_SETTINGS:
        info = reader.probe(out / f"{key}.mp4")
        assert (info.n_frames, info.width, info.height) == (3, *CLIP_SIZE)

    table = json.loads((out / "table.json").read_text())
    assert [row["key"] for row in table["rows"]] == list(DEFAULT_SETTINGS)
    assert table["n_frames"] == 3 and table["size"] == list(CLIP_SIZE) and table["clip_model"] == "tiny"
    for row, key in zip(table["rows"], DEFAULT_SETTINGS, strict=True):
        assert (row["refs"], row["latent_update"]) == (SETTINGS[key].refs, SETTINGS[key].latent_update)
        for name in ("clip_text", "clip_image", "pixel_mse", "seconds_per_frame"):
            assert isinstance(row[name], float) and math.isfinite(row[name]), (key, name, row[name])
        assert row["seconds_per_frame"] > 0
    # One inversion shared by all settings: everything after the first is a cache hit.
    assert all(row["inversion_cache_hit"] for row in table["rows"][1:])

    for name in ("table.json", "table.md", "contact_sheet.png", "ours.mp4"):
        assert (out / name).stat().st_mode & 0o777 == 0o666 & ~_umask(), name
    md = (out / "table.md").read_text()
    body = [ln for ln in md.splitlines() if ln.startswith("| ") and not ln.startswith("| setting")]
    assert len(body) == 5 and [ln.split(" | ")[0][2:] for ln in body] == labels

    with Image.open(out / "contact_sheet.png") as im:
        assert im.mode == "RGB"
        assert im.size == sheet_size(1 + 5, 3, CLIP_SIZE)  # source + 5 settings, 3 frames

    # A second run into the same folder refuses (before loading any model) unless --overwrite.
    r2 = p2v(*args)
    assert_one_line_error(r2, "--overwrite")


def test_ablate_bad_inputs(clips: dict[str, Path], tmp_path: Path) -> None:
    clip = str(clips["six"])
    base = ["--out", str(tmp_path / "o"), "--model", "tiny", "--size", "64", "--clip-model", "tiny"]
    assert_one_line_error(p2v("ablate", clip, "a cat", "--settings", "ours,magic", *base), "magic")
    assert_one_line_error(p2v("ablate", clip, "  ", *base), "empty")
    assert_one_line_error(p2v("ablate", str(tmp_path / "x.mp4"), "a cat", *base), "x.mp4")
    assert_one_line_error(p2v("ablate", clip, "a cat", "--max-frames", "1", *base), "2 frames")
    if importlib.util.find_spec("torchvision") is None:  # RAFT unusable: refused before any edit
        assert_one_line_error(p2v("ablate", clip, "a cat", "--flow", "raft", *base), "torchvision")
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------------- pure helpers


def test_parse_settings() -> None:
    assert parse_settings(None) == DEFAULT_SETTINGS == ("ours", "no-update", "anchor", "prev", "per-frame")
    assert parse_settings("detached, ours") == ("detached", "ours")
    for bad in ("", "ours,ours", "ours,nope"):
        with pytest.raises(InputError):
            parse_settings(bad)


def test_sheet_indices() -> None:
    assert sheet_indices(3, 4) == [0, 1, 2]
    assert sheet_indices(10, 4) == [0, 3, 6, 9]
    assert sheet_indices(1, 4) == [0]
    assert sheet_indices(100, 1) == [0]


def test_contact_sheet_layout() -> None:
    w, h = 20, 10
    red = np.zeros((h, w, 3), np.uint8)
    red[..., 0] = 255
    sheet = contact_sheet([("source", [red, red]), ("a much longer label than fits", [red, red])])
    assert (sheet.shape[1], sheet.shape[0]) == sheet_size(2, 2, (w, h)) == (2 * w + GAP, 2 * (LABEL_H + h) + GAP)
    # Frames sit below their label band, columns GAP apart; the band carries text.
    assert (sheet[LABEL_H : LABEL_H + h, :w] == red).all()
    assert (sheet[LABEL_H : LABEL_H + h, w + GAP :] == red).all()
    band = sheet[:LABEL_H]
    assert band.min() < 64 and band.max() > 192


def test_markdown_table_marks_best_and_json_safe() -> None:
    res = AblationResult(Path("clip.mp4"), "p", "s", "tiny", (64, 64), 3, 4, "tiny", "dis", Path("o"))
    for key, mse in (("ours", 10.0), ("no-update", float("nan")), ("per-frame", 30.0)):
        s = SETTINGS[key]
        res.rows.append(AblationRow(key, s.label, s.refs, s.latent_update, f"{key}.mp4", 0.2, 0.9, mse, 0.1,
                                    1.0, 8, True))
    assert res.best()["pixel_mse"] == "ours"
    md = markdown_table(res)
    assert "| ours | anchor+prev | autograd | **0.2000** | **0.9000** | **10.00** |" in md
    assert "n/a" in md
    data = json_safe(res.to_dict())
    assert data["rows"][1]["pixel_mse"] is None
    json.dumps(data, allow_nan=False)
