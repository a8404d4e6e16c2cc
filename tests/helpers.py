"""Plain helpers shared by tests (the fixtures are in ``tests/conftest.py``). A test module imports
from here, never from another test module or from conftest (``tests/test_layering.py`` checks).

Imports of torch and the models stay inside the functions: conftest imports this module for the
tiers' checks before any test runs.
"""

from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING

from p2v_fast.nets.specs import NETWORKS, Geometry

if TYPE_CHECKING:
    from click.testing import Result

    from export import ExportReport
    from p2v_fast.config import EditConfig
    from p2v_fast.method.edit import EditContext, FrameState

# ------------------------------------------------------------------------------ the CLI


def p2v(*args: object, catch_exceptions: bool = False, **kw) -> Result:
    """``p2v ARGS`` in this process (Typer's runner; stdout and stderr kept apart), each argument
    ``str()``-ed. An exception other than ``SystemExit`` propagates (with its traceback) unless
    ``catch_exceptions``; ``kw`` goes to ``CliRunner.invoke`` (``env=``, ``input=``)."""
    from typer.testing import CliRunner

    from cli import app

    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=catch_exceptions, **kw)


def one_line_error(result) -> str:
    """Assert a CLI result failed with one ``error:`` line as its last stderr line and no
    traceback; return that line."""
    assert result.exit_code not in (0, None), result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    return errors[0]


def one_line(msg: str) -> str:
    """Assert an error message is one non-empty line without a traceback; return it."""
    assert msg and "\n" not in msg and "Traceback" not in msg, msg
    return msg


# ------------------------------------------------------------------------------ inputs and outputs


def digest(path: Path) -> str:
    """The sha256 of a file's bytes (to show that an input was left untouched)."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def sample_clip(tmp: Path, n_frames: int = 6, size=(96, 64), audio: bool = True) -> Path:
    from p2v_fast.media.samples import make_sample_clip

    return make_sample_clip(tmp / "clip.mp4", n_frames=n_frames, size=size, fps=12.0, with_audio=audio)


#: ``p2v batch``'s fast defaults for a jobs file: the tiny model, 64 pixels, 2 steps.
JOB_DEFAULTS = {"model": "tiny", "size": 64, "steps": 2}


def write_jobs(folder: Path, jobs: list[dict], defaults: dict | None = None, name: str = "jobs.yaml") -> Path:
    """A ``p2v batch`` jobs file ``folder/name``: ``defaults`` over :data:`JOB_DEFAULTS`, then ``jobs``."""
    import yaml

    path = folder / name
    path.write_text(yaml.safe_dump({"defaults": {**JOB_DEFAULTS, **(defaults or {})}, "jobs": jobs}, sort_keys=False))
    return path


class ModelLoaded(BaseException):
    """Not an Exception: a batch worker reports every Exception as a failed job, and this must
    fail the test instead."""


def no_model_loads(monkeypatch) -> None:
    """Fail the test if anything loads a model (validation and skipped jobs must not)."""
    import p2v_fast.nets.runtime
    import p2v_fast.pipeline

    def refuse(cfg):
        raise ModelLoaded("a model was loaded")

    for module in (p2v_fast.nets.runtime, p2v_fast.pipeline):
        monkeypatch.setattr(module, "load_runtime", refuse)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (closed again when this returns)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------------------------------ the method's state


def make_context(cfg: EditConfig, models, n_frames: int, backend=None) -> EditContext:
    import torch

    from p2v_fast.method.ddim import DDIMSchedule
    from p2v_fast.method.edit import EditContext, EditStats, FeatureStore
    from p2v_fast.nets.backends import TorchBackend
    from p2v_fast.weights.prompts import encode_prompt

    backend = backend or TorchBackend(models, cfg.inject)
    emb = torch.cat([encode_prompt(models, cfg.negative_prompt), encode_prompt(models, cfg.prompt)])
    return EditContext(cfg, backend, backend, DDIMSchedule(models.scheduler, cfg.steps), emb,
                       FeatureStore(cfg, n_frames), cfg.effective_delta((8, 8)), EditStats())


def random_frames(n: int, seed: int = 0, hw: tuple[int, int] = (8, 8)) -> list[FrameState]:
    import torch

    from p2v_fast.method.edit import FrameState

    g = torch.Generator().manual_seed(seed)
    return [FrameState(i, torch.randn(1, 4, *hw, generator=g), torch.rand(1, 1, *hw, generator=g) * 2 - 1)
            for i in range(n)]


# ------------------------------------------------------------------------------ exported graphs

SIZE = 64  # pixels: 8x8 latents


# SD2-depth's geometry (stabilityai/stable-diffusion-2-depth), for profile arithmetic at real sizes.
SD2 = Geometry(
    latent_channels=4, unet_in_channels=5, vae_scale=8, text_tokens=77, text_dim=1024,
    feature_scales=(4, 4, 4, 2, 2, 2, 1, 1, 1), feature_channels=(1280,) * 3 + (640,) * 3 + (320,) * 3,
    depth_in=(384, 384), depth_out=(384, 384),
)


def export_tiny(base: Path, precision: str = "fp32", networks: tuple[str, ...] = NETWORKS,
                name: str | None = None, cleaner: str | None = None) -> tuple[Path, ExportReport]:
    """Export the tiny set at 64x64 (64 to 128 pixels a side) into ``base/<name>`` (cached across
    calls: same keys). ``cleaner``: force one graph-cleaning path (default: the installed one)."""
    import torch

    from export import ExportOptions, export_engines
    from p2v_fast.weights.models import load_models

    folder = base / (name or f"engines-tiny-{precision}")
    # A model set of its own: the export wraps (re-wires) the UNet's attention processors.
    models = load_models("tiny", dtype=torch.float16 if precision == "fp16" else torch.float32)
    options = ExportOptions(model="tiny", out=folder, format="onnx", precision=precision, height=SIZE, width=SIZE,
                            max_size=2 * SIZE, max_batch=4, networks=networks, cleaner=cleaner)
    return folder, export_engines(options, models=models)


# ------------------------------------------------------------------------------ what this machine has

REAL_MODEL = "stabilityai/stable-diffusion-2-depth"


def real_weights() -> str | None:
    """Where the real SD2-depth weights are (a folder or the hub id, if cached), or None."""
    folder = os.environ.get("P2V_WEIGHTS")
    if folder:
        return folder
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(REAL_MODEL, "model_index.json")
    except Exception:
        return None
    return REAL_MODEL if isinstance(cached, str) else None


def chromium() -> str | None:
    """Debian's chromium (the browser tier's browser), or None."""
    import shutil

    return next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)


def playwright() -> bool:
    import importlib.util

    return importlib.util.find_spec("playwright") is not None
