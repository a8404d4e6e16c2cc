"""The Python API (``from p2v_fast import ...``), as the README shows it."""

from __future__ import annotations

import subprocess
import sys

from helpers import sample_clip

import p2v_fast


def test_importing_the_package_loads_neither_torch_nor_a_model() -> None:
    code = "import sys, p2v_fast; print('torch' in sys.modules, sorted(p2v_fast.__all__)[:3])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("False"), out


def test_every_public_name_resolves_and_an_unknown_one_is_an_attribute_error() -> None:
    assert set(p2v_fast.__all__) == {*p2v_fast._API, "__version__"}
    for name in p2v_fast.__all__:
        assert getattr(p2v_fast, name) is not None
    try:
        p2v_fast.no_such_thing  # noqa: B018
    except AttributeError as exc:
        assert "no_such_thing" in str(exc)
    else:
        raise AssertionError("an unknown name resolved")


def test_the_readme_example_edits_a_clip(tmp_path, tiny_dir) -> None:
    from p2v_fast import EditConfig, EditResult, edit_video, invert_video, load_runtime

    clip = sample_clip(tmp_path, n_frames=2, size=(64, 64), audio=False)
    cfg = EditConfig(prompt="a crochet swan on the lake", model="tiny", size=64, steps=2, source_prompt="a clip",
                     threads=1)
    rt = load_runtime(cfg)
    assert not invert_video(cfg, clip, runtime=rt).inverted.cache_hit
    result = edit_video(cfg, clip, tmp_path / "out.mp4", runtime=rt)
    assert isinstance(result, EditResult)
    assert result.output.stat().st_size > 0 and result.n_frames == 2 and result.inversion_cache_hit
    assert result.stats.unet_calls > 0 and result.seconds_per_frame > 0
