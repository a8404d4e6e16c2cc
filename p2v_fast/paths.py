"""Where p2v-fast keeps its on-disk caches."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "P2V_CACHE"


def cache_root() -> Path:
    """The cache root: ``$P2V_CACHE`` if set and non-empty, else ``~/.cache/p2v-fast``.

    The folder is not created here; writers create the subfolders they need.
    """
    env = os.environ.get(CACHE_ENV, "").strip()
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "p2v-fast"
