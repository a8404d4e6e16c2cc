"""Shared fixtures: the tiny random-weight SD2-depth model set, built once per session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch


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
    from p2v_fast.tiny import tiny_model_dir

    return tiny_model_dir()


@pytest.fixture(scope="session")
def tiny_models(tiny_dir: Path):
    """``load_models("tiny")``: fp32 on the CPU."""
    from p2v_fast.models import load_models

    return load_models("tiny")


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread while a module runs: on a shared 2-core machine, two OpenMP threads
    with another busy process slow the tiny models ~100x (barrier waits); results are unchanged."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
