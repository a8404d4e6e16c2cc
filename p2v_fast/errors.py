"""User-facing errors.

Every error a user can cause (bad input, a model that cannot be loaded, an engine built for
another machine) is raised as a :class:`P2VError` subclass with a one-line message that quotes
the offending value. The CLI prints ``error: <message>`` and exits non-zero; it never shows a
traceback for these.
"""

from __future__ import annotations


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
