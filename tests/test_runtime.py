"""Where the inversion runs and in what precision: --invert-dtype tf32."""

from __future__ import annotations

import pytest
import torch

from p2v_fast.config import EditConfig
from p2v_fast.errors import InputError
from p2v_fast.nets.backends import TorchBackend
from p2v_fast.nets.runtime import inversion_runtime, invert_precision


def test_tf32_is_a_cuda_inversion_precision() -> None:
    assert invert_precision("tf32", torch.device("cuda")) == (torch.float32, True)
    assert invert_precision("fp32", torch.device("cpu")) == (torch.float32, False)
    assert invert_precision("same", torch.device("cpu")) == (None, False)
    with pytest.raises(InputError, match="tf32"):
        invert_precision("tf32", torch.device("cpu"))
    with pytest.raises(InputError, match="tf32"):
        EditConfig(invert_dtype="tf32", device="cpu")
    EditConfig(invert_dtype="tf32", device="cuda")


def test_a_tf32_inversion_has_its_own_backend_and_cache_identity(tiny_models) -> None:
    """Never the edit's fp32 backend (its math is torch's default): a backend of its own whose
    calls use TF32, named so in the identity (another cache entry than fp32's)."""
    edit = TorchBackend(tiny_models)
    fp32 = inversion_runtime(tiny_models, edit, None, torch.float32)
    tf32 = inversion_runtime(tiny_models, edit, None, torch.float32, tf32=True)
    assert fp32.make() is edit and "math" not in fp32.identity
    assert tf32.identity == {**fp32.identity, "math": "tf32"}
    made = tf32.make()
    assert made is not edit and made.tf32 and made.identity() == tf32.identity


def test_tf32_math_is_on_only_inside_the_calls(tiny_models) -> None:
    from p2v_fast.nets.backends import tf32_math

    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    with tf32_math(True):
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before
