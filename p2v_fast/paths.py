"""Where p2v-fast keeps its on-disk caches, and the check every output path goes through."""

from __future__ import annotations

import os
from pathlib import Path

from p2v_fast.errors import InputError

CACHE_ENV = "P2V_CACHE"


def cache_root() -> Path:
    """The cache root: ``$P2V_CACHE`` if set and non-empty, else ``~/.cache/p2v-fast``.

    The folder is not created here; writers create the subfolders they need.
    """
    env = os.environ.get(CACHE_ENV, "").strip()
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "p2v-fast"


def check_output_file(path: str | Path) -> Path:
    """InputError unless ``path`` can be written as a file (checked before long work starts)."""
    out = Path(path)
    if out.is_dir():
        raise InputError(f"output '{out}' is a folder; give a file name")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"output folder '{parent}' does not exist")
    if not os.access(parent, os.W_OK):
        raise InputError(f"output folder '{parent}' is not writable")
    return out
