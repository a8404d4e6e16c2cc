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


def test_compiled_backend_runs_gradient_calls_eager(tiny_models) -> None:
    """--compile: calls without gradients go to the compiled module, calls with gradients (the
    autograd guided steps) to the eager one (inductor's gradient disagrees with eager's)."""
    from p2v_fast.backends import TorchBackend

    backend = TorchBackend(tiny_models)
    backend.optimize(compile=True)
    assert backend.unet_call is not backend.unet_module

    def compiled(*args, **kwargs):
        raise AssertionError("compiled module called")

    backend.unet_call = compiled
    sample = torch.randn(2, 5, 8, 8, requires_grad=True)
    t, ehs = torch.tensor([500, 500]), torch.randn(2, 77, tiny_models.text_encoder.config.hidden_size)
    eps = backend.unet_forward(sample, t, ehs)[0]
    assert eps.requires_grad
    with torch.no_grad(), pytest.raises(AssertionError, match="compiled module called"):
        backend.unet_forward(sample, t, ehs)
    torch._dynamo.reset()
