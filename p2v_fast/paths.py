"""Where p2v-fast keeps its on-disk caches; the checks every output path goes through; atomic
writes, out-of-space errors and the locks that keep two runs from writing the same file."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from p2v_fast.errors import InputError, OutputError

CACHE_ENV = "P2V_CACHE"
#: errno values that mean "the disk (or this process's file size limit) is full".
NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def cache_root() -> Path:
    """The cache root: ``$P2V_CACHE`` if set and non-empty, else ``~/.cache/p2v-fast``.

    The folder is not created here; writers create the subfolders they need.
    """
    env = os.environ.get(CACHE_ENV, "").strip()
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "p2v-fast"


def name_max(folder: Path) -> int:
    """Longest file name (bytes) the file system of ``folder`` takes (255 where it cannot say)."""
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):
        return 255


def check_name_length(path: str | Path, extra_names: tuple[str, ...] = ()) -> Path:
    """InputError if ``path``'s name, its temporary ``.NAME.partial`` name or an ``extra_names``
    side file name is longer than the file system allows (checked before anything touches it)."""
    out = Path(path)
    parent = out.parent if str(out.parent) else Path(".")
    longest = max(len(n.encode()) for n in (f".{out.name}.partial", *extra_names))
    limit = name_max(parent) if parent.is_dir() else 255
    if longest > limit:
        raise InputError(f"output name '{out.name}' is too long for the file system ({limit} bytes at most, "
                         "with the temporary and side files' suffixes); choose a shorter -o")
    return out


def check_output_file(path: str | Path, *, extra_names: tuple[str, ...] = (), create_folder: bool = False) -> Path:
    """InputError unless ``path`` can be written as a file (checked before long work starts).

    Refused: a folder, a device, FIFO or socket (only a regular file is ever replaced), a missing
    or unwritable folder, and a name longer than the file system allows, counting the temporary
    ``.NAME.partial`` name it is written under and ``extra_names`` (side files) beside it.
    ``create_folder``: a missing folder is fine if its nearest existing ancestor is a writable
    folder (the caller creates it).
    """
    out = check_name_length(path, extra_names)
    if out.is_dir():
        raise InputError(f"output '{out}' is a folder; give a file name")
    parent = out.parent if str(out.parent) else Path(".")
    if create_folder:
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"output folder '{parent}' does not exist")
    if not os.access(parent, os.W_OK):
        raise InputError(f"output folder '{parent}' is not writable")
    try:
        mode = out.stat().st_mode
    except FileNotFoundError:
        mode = None
    except OSError as e:
        raise InputError(f"cannot use output '{out}': {e.strerror or e}") from None
    if mode is not None and not stat.S_ISREG(mode):
        raise InputError(f"output '{out}' exists and is not a regular file (a device, FIFO or socket); "
                         "give a file name")
    return out


def disk_full(exc: BaseException) -> bool:
    """True for an error that means out of space (ENOSPC, EDQUOT) or over the file size limit (EFBIG),
    including errors from libraries that only keep the message (safetensors)."""
    if isinstance(exc, OSError) and exc.errno in NO_SPACE:
        return True
    text = str(exc)
    return any(s in text for s in ("No space left on device", "Disk quota exceeded", "File too large"))


def write_error(exc: BaseException, path: Path, what: str = "") -> OutputError:
    """The one-line error for a failed write of ``path`` (``what``: e.g. "the inversion cache")."""
    folder = path.parent if str(path.parent) else Path(".")
    about = f" writing {what}" if what else f" writing '{path.name}'"
    if disk_full(exc):
        if isinstance(exc, OSError) and exc.errno == errno.EFBIG:
            return OutputError(f"file too large for '{folder}'{about} (file size limit reached); nothing "
                               "partial was kept")
        return OutputError(f"no space left on the device of '{folder}'{about}; free some space and run again "
                           "(nothing partial was kept)")
    why = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return OutputError(f"cannot write '{path}'{about if what else ''}: {why}")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_fd(fd: int, data: bytes) -> None:
    """Write all of ``data`` to ``fd`` and close it (where bytes reach the disk: tests inject faults here)."""
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def write_bytes_atomic(path: str | Path, data: bytes, what: str = "") -> Path:
    """Write ``data`` to a temporary file beside ``path`` and rename it into place; on failure
    (out of space, ...) remove the temporary file and raise :class:`OutputError` (one line).
    The file gets the mode a plain ``open()`` would give it (0666 less the umask)."""
    out = Path(path)
    parent = out.parent if str(out.parent) else Path(".")
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
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
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
