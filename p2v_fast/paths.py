"""Where p2v-fast keeps its on-disk caches, and the check every output path goes through."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
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


@contextlib.contextmanager
def cache_lock(name: str, root: str | Path | None = None) -> Iterator[None]:
    """Hold ``<cache>/locks/<name>.lock`` exclusively (``fcntl.flock``) while the block runs, so
    two processes sharing a cache (a batch's workers, two edits of one clip) do one piece of work
    once instead of racing on its files. Released when the block ends or the process dies."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no cross-process lock
        yield
        return
    folder = Path(root or cache_root()) / "locks"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{name}.lock", "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
