"""PyTorch speed-ups keep the result: channels-last; the compiled path's padding and routing
(the compiled edit itself: tests/test_edit_cuda.py)."""

from __future__ import annotations

import copy

import pytest
import torch

from p2v_fast.config import EditConfig
from p2v_fast.method.edit import sequential
from p2v_fast.nets.runtime import load_runtime
from tests.helpers import make_context, random_frames


def _edit(cfg: EditConfig) -> torch.Tensor:
    rt = load_runtime(cfg)
    ctx = make_context(cfg, rt.models, 3, backend=rt.backend)
    return torch.cat([s.latent for s in sequential(ctx, iter(copy.deepcopy(random_frames(3))))])


def _cfg(**kw) -> EditConfig:
    return EditConfig(prompt="a swan", model="tiny", device="cpu", steps=3, latent_update="detached", **kw)


def test_channels_last_keeps_the_result(tiny_dir) -> None:
    torch.testing.assert_close(_edit(_cfg(channels_last=True)), _edit(_cfg()), rtol=1e-3, atol=1e-3)


def test_compiled_backend_runs_gradient_calls_eager(tiny_models) -> None:
    """--compile: calls without gradients go to the compiled module, calls with gradients (the
    autograd guided steps) to the eager one (inductor's gradient disagrees with eager's)."""
    from p2v_fast.nets.backends import TorchBackend

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


def test_compiled_calls_are_padded_to_buckets_and_cut_back(tiny_models) -> None:
    """The compiled path's one signature (references always, self_ref) and padded batches give
    the eager wrapper's outputs; the module sees only bucket sizes. (The compiled module is
    replaced by the eager one here: what is tested is the padding around it.)"""
    from p2v_fast.method.edit import per_branch
    from p2v_fast.nets.attention import feature_shapes
    from p2v_fast.nets.backends import COMPILE_BUCKETS, TorchBackend

    padded = TorchBackend(tiny_models)  # one wrapper per UNet: its processors are the UNet's
    seen: list[int] = []

    def bucketed(*args, self_ref):
        seen.append(args[0].shape[0])
        assert self_ref is not None and len(args) == 3 + len(feature_shapes(tiny_models.unet, (8, 8)))
        # as traced: dynamo guards on strides, so a broadcast batch (stride 0) would recompile
        assert all(a.is_contiguous() for a in (*args, self_ref))
        return padded.unet_module(*args, self_ref=self_ref)

    padded.unet_call = bucketed
    g = torch.Generator().manual_seed(0)
    dim = tiny_models.text_encoder.config.hidden_size
    shapes = feature_shapes(tiny_models.unet, (8, 8))
    for b, with_refs in ((1, False), (3, True), (6, True), (5, False), (2, True)):
        sample, ehs = torch.randn(b, 5, 8, 8, generator=g), torch.randn(b, 77, dim, generator=g)
        t = torch.randint(1, 999, (b,), generator=g)
        if b == 2:  # one frame's two CFG branches, as the edit makes them: a broadcast (stride 0)
            sample, t = per_branch(sample[:1]), per_branch(t[:1])
            assert sample.stride(0) == 0
        refs = [torch.randn(b, 2 * n, c, generator=g) for n, c in shapes] if with_refs else None
        self_ref = (torch.arange(b) % 3 == 0).float() if with_refs else None
        with torch.no_grad():
            padded.compiled = False
            want = padded.unet(sample, t, ehs, refs, self_ref)
            padded.compiled = True
            got = padded.unet(sample, t, ehs, refs, self_ref)
        for w, o in zip([want[0], *want[1]], [got[0], *got[1]], strict=True):
            assert o.shape == w.shape
            torch.testing.assert_close(o, w, rtol=1e-4, atol=1e-5)
    assert seen == [2, 4, 8, 8, 2] and set(seen) <= set(COMPILE_BUCKETS)
