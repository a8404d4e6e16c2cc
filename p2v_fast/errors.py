"""User-facing errors.

Every error a user can cause (bad input, a model that cannot be loaded, an engine built for
another machine) is raised as a :class:`P2VError` subclass with a one-line message that quotes
the offending value. The CLI prints ``error: <message>`` and exits non-zero; it never shows a
traceback for these.
"""

from __future__ import annotations

import errno
from pathlib import Path


class P2VError(Exception):
    """Base class: a problem the user can fix, described in one line."""

    exit_code = 1


class InputError(P2VError):
    """A bad input file, folder, prompt or option value."""

    exit_code = 2


class OutputError(P2VError):
    """An output or cache file could not be written (out of space, a file size limit, ...)."""


class ModelLoadError(P2VError):
    """A model could not be found or loaded."""


class EngineError(P2VError):
    """A missing, corrupt or mismatched ONNX/TensorRT artifact."""


class ExportValidationError(EngineError):
    """An exported graph disagrees with PyTorch beyond its tolerance."""


class BackendUnavailableError(P2VError):
    """A requested backend or device cannot run on this machine."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C (the CLI installs the handler), so the same
    cleanup runs; the exit code is 143 instead of 130."""


#: Longest reason :func:`one_line` quotes from an exception, in characters.
ONE_LINE_LIMIT = 240


def one_line(exc: BaseException | str, limit: int = ONE_LINE_LIMIT, *, kind: bool = False, whole: bool = False) -> str:
    """An exception (or a library's error text) as one line for a message: an OSError's reason
    without its errno and path (FFmpeg's errors are OSErrors; the message names the path), else the
    first non-empty line of its text (``whole``: every line, for a description spread over lines),
    whitespace collapsed, else the exception's type; shortened to ``limit`` characters with "...".
    ``kind``: "TypeName: text", for errors of unknown origin."""
    text = str(exc if isinstance(exc, str) else (getattr(exc, "strerror", None) or str(exc)))
    lines = [text] if whole else text.splitlines()
    line = next((" ".join(ln.split()) for ln in lines if ln.strip()), "")
    if not isinstance(exc, str) and (kind or not line):
        line = f"{type(exc).__name__}: {line}" if line else type(exc).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def is_out_of_memory(exc: BaseException) -> bool:
    """A CUDA out-of-memory error, or the CPU allocator failing to allocate."""
    import torch  # here, not at the top: this module is imported before anything heavy

    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)


#: errno values that mean "the disk (or this process's file size limit) is full".
NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


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
    return OutputError(f"cannot write '{path}'{about if what else ''}: {one_line(exc)}")
