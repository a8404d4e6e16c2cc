"""PyTorch speed-ups keep the result: channels-last (always), torch.compile (slow tier)."""

from __future__ import annotations

import copy
import os

import pytest
import torch

from p2v_fast.config import EditConfig
from p2v_fast.edit import sequential
from p2v_fast.pipeline import load_runtime
from tests.helpers import make_context, random_frames


def _edit(cfg: EditConfig) -> torch.Tensor:
    rt = load_runtime(cfg)
    ctx = make_context(cfg, rt.models, 3, backend=rt.backend)
    return torch.cat([s.latent for s in sequential(ctx, iter(copy.deepcopy(random_frames(3))))])


def _cfg(**kw) -> EditConfig:
    return EditConfig(prompt="a swan", model="tiny", device="cpu", steps=3, latent_update="detached", **kw)


def test_channels_last_keeps_the_result(tiny_dir) -> None:
    torch.testing.assert_close(_edit(_cfg(channels_last=True)), _edit(_cfg()), rtol=1e-3, atol=1e-3)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("P2V_SLOW") != "1", reason="torch.compile takes minutes on 2 CPU cores; P2V_SLOW=1")
def test_compile_keeps_the_result(tiny_dir) -> None:
    torch.testing.assert_close(_edit(_cfg(compile=True)), _edit(_cfg()), rtol=1e-3, atol=1e-3)
