"""Small helpers shared by tests (not fixtures)."""

from __future__ import annotations

from pathlib import Path

import torch

from p2v_fast.config import EditConfig
from p2v_fast.method.ddim import DDIMSchedule
from p2v_fast.method.edit import EditContext, EditStats, FeatureStore, FrameState
from p2v_fast.nets.backends import TorchBackend
from p2v_fast.weights.prompts import encode_prompt


def make_context(cfg: EditConfig, models, n_frames: int, backend=None) -> EditContext:
    backend = backend or TorchBackend(models)
    emb = torch.cat([encode_prompt(models, cfg.negative_prompt), encode_prompt(models, cfg.prompt)])
    return EditContext(cfg, backend, backend, DDIMSchedule(models.scheduler, cfg.steps), emb,
                       FeatureStore(cfg, n_frames), cfg.effective_delta((8, 8)), EditStats())


def random_frames(n: int, seed: int = 0, hw: tuple[int, int] = (8, 8)) -> list[FrameState]:
    g = torch.Generator().manual_seed(seed)
    return [FrameState(i, torch.randn(1, 4, *hw, generator=g), torch.rand(1, 1, *hw, generator=g) * 2 - 1)
            for i in range(n)]


def sample_clip(tmp: Path, n_frames: int = 6, size=(96, 64), audio: bool = True) -> Path:
    from p2v_fast.media.video import make_sample_clip

    return make_sample_clip(tmp / "clip.mp4", n_frames=n_frames, size=size, fps=12.0, with_audio=audio)


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
