"""Shared fixtures (a fresh P2V_CACHE; the tiny random-weight SD2-depth model set and its ONNX
export, each made once per session for the tests that only read it) and the test tiers, each
skipped here, in one place, with its reason where this machine lacks it:

- ``cuda``: a CUDA GPU; ``tensorrt``: TensorRT's libraries and a GPU;
- ``slow``: minutes on 2 CPU cores (torch.compile, the dynamo exporter): ``P2V_SLOW=1``;
- ``weights``: the real ``stabilityai/stable-diffusion-2-depth`` (``P2V_WEIGHTS=FOLDER`` or the
  hub cache);
- ``browser``: Debian's chromium, for the web app's page tests.

Plain helpers (the CLI runner ``p2v``, ``write_jobs``, ``export_tiny``, ``free_port``, ...) are in
``tests/helpers.py``; a test module imports those, never conftest or another test module.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# isort: off
import p2v_fast  # noqa: F401  (its CPU thread policy, as a user's import applies it: before torch loads OpenMP)
import torch
# isort: on

from tests.helpers import REAL_MODEL, chromium, export_tiny, playwright, real_weights


def _tier_skips() -> dict[str, str | None]:
    """Marker -> why its tests cannot run here (None: they can)."""
    from p2v_fast.nets.system import tensorrt_status

    cuda = torch.cuda.is_available()
    trt_ok, trt_why = tensorrt_status()
    return {
        "cuda": None if cuda else "needs a CUDA GPU; none on this machine",
        "tensorrt": None if trt_ok and cuda else f"needs TensorRT and a GPU ({trt_why if not trt_ok else 'no GPU'})",
        "slow": None if os.environ.get("P2V_SLOW") == "1" else "slow tier (minutes on 2 CPU cores); P2V_SLOW=1",
        "weights": None if real_weights() else f"needs the real {REAL_MODEL} weights (P2V_WEIGHTS=FOLDER or the "
                                              "hub cache)",
        "browser": "needs chromium (apt-get install chromium)" if not chromium() else None if playwright()
        else "needs Playwright (pip install -e '.[ui,browser]'; it drives Debian's chromium, no browser download)",
    }


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skips: dict[str, str | None] | None = None
    for item in items:
        marks = {m.name for m in item.iter_markers()}
        if not marks & {"cuda", "tensorrt", "slow", "weights", "browser"}:
            continue
        skips = skips if skips is not None else _tier_skips()
        for mark in sorted(marks & set(skips)):
            if skips[mark] is not None:
                item.add_marker(pytest.mark.skip(reason=skips[mark]))
                break


@pytest.fixture(scope="session", autouse=True)
def p2v_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh ``P2V_CACHE`` for the session; the previous value is restored afterwards."""
    root = tmp_path_factory.mktemp("p2v-cache")
    old = os.environ.get("P2V_CACHE")
    os.environ["P2V_CACHE"] = str(root)
    try:
        yield root
    finally:
        if old is None:
            os.environ.pop("P2V_CACHE", None)
        else:
            os.environ["P2V_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_dir(p2v_cache: Path) -> Path:
    """The tiny model folder (``<P2V_CACHE>/models/tiny-v1``), built on first use."""
    from p2v_fast.weights.tiny import tiny_model_dir

    return tiny_model_dir()


@pytest.fixture
def own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_dir: Path) -> Path:
    """An empty ``P2V_CACHE`` of this test's own, the session's tiny model linked in (not rebuilt),
    for tests that damage or count cache entries."""
    root = tmp_path / "cache"
    (root / "models").mkdir(parents=True)
    (root / "models" / tiny_dir.name).symlink_to(tiny_dir)
    monkeypatch.setenv("P2V_CACHE", str(root))
    return root


@pytest.fixture(scope="session")
def tiny_edit(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path):
    """One ``p2v edit`` as a newcomer runs it on the tiny model (3 frames at 64x64, 4 steps, the
    source prompt a BLIP caption, a fresh inversion, the guided update), made once: ``(Result,
    folder)``, the folder holding ``clip.mp4`` and the edit ``out.mp4``. Read them; copy to change."""
    from tests.helpers import p2v, sample_clip

    folder = tmp_path_factory.mktemp("tiny-edit")
    clip = sample_clip(folder, n_frames=3, size=(64, 64), audio=False)  # folder/clip.mp4
    result = p2v("edit", clip, "a crochet swan", "-o", folder / "out.mp4", "--model", "tiny", "--size", "64",
                 "--steps", "4")
    assert result.exit_code == 0, result.output
    return result, folder


@pytest.fixture(scope="session")
def tiny_models(tiny_dir: Path):
    """``load_models("tiny")``: fp32 on the CPU."""
    from p2v_fast.weights.models import load_models

    return load_models("tiny")


@pytest.fixture(scope="session")
def tiny_engines(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """The tiny set's ONNX export (fp32, 64x64; 64 to 128 pixels a side, batch up to 4) in
    ``<basetemp>/engines-tiny-fp32``, made once: ``(folder, ExportReport)``. Read it; copy it to change it."""
    return export_tiny(tmp_path_factory.getbasetemp())


@pytest.fixture
def no_tf32() -> Iterator[None]:
    """TF32 off (cuDNN convolutions and CUDA matmuls) while a test compares fp32 results: with it
    on, an fp32 GPU result is ~1e-3 off, which spoils comparisons made to 1e-3 at random."""
    before = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread while a module runs: on a shared 2-core machine, two OpenMP threads
    with another busy process slow the tiny models ~100x (barrier waits); results are unchanged."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
