"""Files written so that nothing half-written is ever seen: atomic writes, locks, output claims.

Every file p2v writes whole (reports, cache entries, manifests, engines, timing caches, images)
goes through :func:`write_bytes_atomic`: a temporary file beside the target, renamed into place,
removed on any failure; a full disk is one :class:`~p2v_fast.errors.OutputError` line. Videos
stream through :class:`p2v_fast.media.writer.VideoWriter`, which follows the same rule.
Caches (inversions, the tiny models) live under :func:`cache_root`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from p2v_fast.errors import InputError, OutputError, write_error

CACHE_ENV = "P2V_CACHE"


def cache_root() -> Path:
    """The cache root: ``$P2V_CACHE`` if set and non-empty, else ``~/.cache/p2v-fast``.

    The folder is not created here; writers create the subfolders they need.
    """
    env = os.environ.get(CACHE_ENV, "").strip()
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "p2v-fast"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_fd(fd: int, data: bytes | bytearray | memoryview) -> None:
    """Write all of ``data`` to ``fd`` and close it (where bytes reach the disk: tests inject faults here)."""
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def write_bytes_atomic(path: str | Path, data: bytes | bytearray | memoryview, what: str = "") -> Path:
    """Write ``data`` to a temporary file beside ``path`` and rename it into place; on failure
    (out of space, ...) remove the temporary file and raise :class:`OutputError` (one line).
    The file gets the mode a plain ``open()`` would give it (0666 less the umask)."""
    out = Path(path)
    parent = out.parent if str(out.parent) else Path(".")
    with contextlib.suppress(OSError):  # only a regular file is ever replaced (never /dev/null, a FIFO, ...)
        if not stat.S_ISREG(out.stat().st_mode):
            raise OutputError(f"cannot write '{out}': it exists and is not a regular file; nothing was written")
    tmp: str | None = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=parent)
        _write_fd(fd, data)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, out)
    except OSError as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise write_error(exc, out, what) from None
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise
    return out


class FileLock:
    """An exclusive advisory lock (``fcntl.flock``) on ``path``, created if missing.

    Held until :meth:`release`, the end of a ``with`` block, or the process's end (the kernel
    drops it, so a killed run never leaves a stale lock). Where ``fcntl`` does not exist
    (Windows) it locks nothing.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    def acquire(self, wait: bool = True, on_wait: Callable[[], None] | None = None) -> bool:
        """Take the lock; if another process holds it: ``wait`` (calling ``on_wait`` first) or return False."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            return True
        try:  # never through a link: a planted (or dangling) one would make p2v create or lock its target
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
        except OSError as e:
            if self.path.is_symlink():
                raise OutputError(f"lock file '{self.path}' is a symbolic link, which p2v never makes and does not "
                                  "follow; remove it and run again") from None
            raise write_error(e, self.path, "a lock file") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                os.close(fd)
                return False
            if on_wait is not None:
                on_wait()
            fcntl.flock(fd, fcntl.LOCK_EX)
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = None

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter exit the kernel drops it anyway
            self.release()


class OutputClaim:
    """Claims an output file for one run: a second run writing the same path is refused at
    once instead of silently replacing the first one's result.

    The claim is a lock on ``.NAME.lock`` beside the output, taken before the existence check
    (so a run that finishes in between is seen); :meth:`release` removes the lock file.
    """

    def __init__(self, out: str | Path) -> None:
        self.out = Path(out)
        self.lock_path = self.out.with_name(f".{self.out.name}.lock")
        self._lock: FileLock | None = None

    def acquire(self, overwrite: bool) -> OutputClaim:
        for _ in range(3):  # the lock file may be removed by its releasing owner between open and flock
            lock = FileLock(self.lock_path)
            if not lock.acquire(wait=False):
                raise InputError(f"another p2v run is writing '{self.out}' (its lock '{self.lock_path.name}' is "
                                 "held); wait for it or choose another -o")
            try:
                same = lock._fd is None or os.fstat(lock._fd).st_ino == os.stat(self.lock_path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._lock = lock
                break
            lock.release()
        else:
            raise InputError(f"cannot claim '{self.out}': its lock file keeps changing (another p2v run?)")
        if self.out.exists() and not overwrite:
            self.release()
            raise InputError(f"output '{self.out}' exists; pass --overwrite to replace it")
        return self

    def release(self) -> None:
        if self._lock is not None:
            self.lock_path.unlink(missing_ok=True)  # still ours: unlinked before the lock is dropped
            self._lock.release()
            self._lock = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.release()


def json_safe(obj: Any) -> Any:
    """Tuples to lists and non-finite floats to None, so the JSON is strict (no NaN)."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to a temporary file beside ``path`` and rename it into place (mode 0666 less
    the umask, like the videos and images; a full disk is one :class:`OutputError` line)."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    return write_text_atomic(path, json.dumps(json_safe(obj), indent=2, allow_nan=False, default=str) + "\n")


class OutputSet:
    """The files of one run (a video, its side-by-side, its strip, its JSON report), written under
    temporary names beside their final ones and renamed into place together by :meth:`commit`.

    Until then no final name is touched: a failure, Ctrl-C or SIGTERM (an exception leaving the
    ``with`` block) removes every temporary file. A failure during :meth:`commit` itself undoes the
    renames already made: a file that was new is removed, a file it replaced (``--overwrite``) is
    put back, so a run leaves all of its files or none.
    """

    def __init__(self) -> None:
        self._staged: list[tuple[Path, Path]] = []  # (temporary, final), in commit order

    def stage(self, final: str | Path) -> Path:
        """A new, empty temporary file beside ``final`` for the caller to fill (atomic writers may
        replace it); it becomes ``final`` at :meth:`commit`."""
        out = Path(final)
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".staged", dir=out.parent if str(out.parent)
                                       else ".")
        except OSError as exc:
            raise write_error(exc, out) from None
        os.close(fd)
        self._staged.append((Path(tmp), out))
        return Path(tmp)

    def adopt(self, tmp: Path, final: Path) -> None:
        """A finished temporary file written by someone else (a video writer): renamed at :meth:`commit`."""
        self._staged.append((Path(tmp), Path(final)))

    def commit(self) -> list[Path]:
        """Rename every staged file into place (all or none); returns the final paths."""
        done: list[tuple[Path, Path | None]] = []  # (final, where the file it replaces was moved)
        try:
            for tmp, final in self._staged:
                backup = None
                if final.exists():
                    backup = final.with_name(f".{final.name}.replaced")
                    os.replace(final, backup)
                done.append((final, backup))
                os.replace(tmp, final)
        except BaseException as exc:
            self._undo(done)
            self.abort()
            if isinstance(exc, OSError):
                raise write_error(exc, done[-1][0] if done else Path(".")) from None
            raise
        for _, backup in done:
            if backup is not None:
                with contextlib.suppress(OSError):
                    backup.unlink()
        finals = [final for _, final in self._staged]
        self._staged = []
        return finals

    @staticmethod
    def _undo(done: list[tuple[Path, Path | None]]) -> None:
        for final, backup in reversed(done):
            with contextlib.suppress(OSError):
                if backup is not None:
                    os.replace(backup, final)
                else:
                    final.unlink(missing_ok=True)

    def abort(self) -> None:
        """Remove every temporary file not yet renamed."""
        for tmp, _ in self._staged:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
        self._staged = []

    def __enter__(self) -> OutputSet:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.abort()  # after a commit there is nothing left to remove
