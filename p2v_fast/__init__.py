"""p2v-fast: Pix2Video text-guided video editing on Stable Diffusion 2 depth, made fast.

The Python API, as the CLI uses it::

    from p2v_fast import EditConfig, edit_video, load_runtime

    cfg = EditConfig(prompt="a crochet swan on the lake", model="tiny", size=128, steps=20)
    rt = load_runtime(cfg)                       # models and backends, loaded once
    result = edit_video(cfg, "in.mp4", "out.mp4", runtime=rt)
    print(result.output, f"{result.seconds_per_frame:.2f} s/frame", result.stats.unet_calls)

:func:`invert_video` fills the inversion cache alone (``p2v invert``); ``edit_video(...,
preview=True)`` renders the anchor frame as a PNG. Every error a user can cause is a
:class:`P2VError` with a one-line message. Names are imported on first use, so ``import
p2v_fast`` stays light.

Importing p2v_fast applies the CLI's CPU thread policy (:func:`p2v_fast.config.cpu_policy`:
OpenMP's idle threads sleep instead of spinning), which OpenMP reads only when torch loads:
import p2v_fast before torch, or set ``OMP_WAIT_POLICY=PASSIVE`` yourself.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from p2v_fast.config import cpu_policy

cpu_policy()  # before anything imports torch (see above)

__version__ = "0.1.0"

#: Public name -> the module that defines it.
_API = {
    "EditConfig": "p2v_fast.config",
    "edit_video": "p2v_fast.pipeline",
    "invert_video": "p2v_fast.pipeline",
    "EditResult": "p2v_fast.pipeline",
    "load_runtime": "p2v_fast.nets.runtime",
    "Runtime": "p2v_fast.nets.runtime",
    "load_models": "p2v_fast.weights.models",
    "Progress": "p2v_fast.progress",
    "P2VError": "p2v_fast.errors",
    "InputError": "p2v_fast.errors",
}

__all__ = [
    "EditConfig", "EditResult", "InputError", "P2VError", "Progress", "Runtime", "__version__", "edit_video",
    "invert_video", "load_models", "load_runtime",
]

if TYPE_CHECKING:  # pragma: no cover
    from p2v_fast.config import EditConfig
    from p2v_fast.errors import InputError, P2VError
    from p2v_fast.nets.runtime import Runtime, load_runtime
    from p2v_fast.pipeline import EditResult, edit_video, invert_video
    from p2v_fast.progress import Progress
    from p2v_fast.weights.models import load_models


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'p2v_fast' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(__all__)
