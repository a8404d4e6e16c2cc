"""The Python API (``from p2v_fast import ...``), as the README shows it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from helpers import sample_clip

import p2v_fast


def test_importing_the_package_loads_neither_torch_nor_a_model() -> None:
    code = "import sys, p2v_fast; print('torch' in sys.modules, sorted(p2v_fast.__all__)[:3])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("False"), out


def _openmp_settings(code: str, **env: str) -> str:
    """What libgomp says it runs with (OMP_DISPLAY_ENV=VERBOSE, printed as torch loads it) after
    ``code`` in a fresh Python whose environment sets no OMP_WAIT_POLICY unless ``env`` does."""
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "TOKENIZERS_PARALLELISM")}
    return subprocess.run([sys.executable, "-c", code], env={**base, "OMP_DISPLAY_ENV": "VERBOSE", **env},
                          capture_output=True, text=True, check=True).stderr


def test_the_readme_import_makes_openmp_threads_sleep_as_the_cli_does() -> None:
    """The README's import, before torch loads, gives OpenMP the CLI's passive waits (spin count 0;
    left unset, libgomp spins 300000 times, which on a busy CPU made the API 3-18x slower than the
    CLI); a setting of the user's wins; torch loaded first is too late, and load_runtime says so."""
    readme_import = next(ln for ln in (p2v_fast.__doc__ or "").splitlines() if "from p2v_fast import" in ln).strip()
    assert "GOMP_SPINCOUNT = '0'" in _openmp_settings(f"{readme_import}\nimport torch; torch.ones(2) + 1")
    assert "GOMP_SPINCOUNT = '0'" not in _openmp_settings(f"{readme_import}\nimport torch", OMP_WAIT_POLICY="ACTIVE")
    late = "import torch, warnings; import p2v_fast.config as c; warnings.simplefilter('error'); " \
           "c.warn_if_policy_late()"
    with pytest.raises(subprocess.CalledProcessError) as caught:
        _openmp_settings(late)
    assert "RuntimeWarning: torch was imported before p2v_fast" in caught.value.stderr


def test_the_cli_and_the_library_apply_one_policy(monkeypatch) -> None:
    """cli.main and ``import p2v_fast`` call the same function (p2v_fast.config.cpu_policy)."""
    import cli
    from p2v_fast import config

    for name in config.CPU_POLICY:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(cli, "app", lambda: None)
    monkeypatch.setattr(cli.signal, "signal", lambda *args: None)  # main's SIGTERM handler: not in pytest
    cli.main()
    assert {k: os.environ[k] for k in config.CPU_POLICY} == config.CPU_POLICY
    assert cli.cpu_policy is config.cpu_policy is p2v_fast.cpu_policy


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
