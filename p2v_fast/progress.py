"""Progress reporting, decoupled from the terminal: the library reports, the CLI renders."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol


class Progress(Protocol):
    def stage(self, description: str, total: int | None) -> Callable[[int], None]:
        """Start a stage of ``total`` units; returns ``advance(n)``."""
        ...

    def log(self, message: str) -> None:
        """A one-line status message (e.g. "inversion: cache hit")."""
        ...


class NullProgress:
    """Reports nothing (tests, library use)."""

    def stage(self, description: str, total: int | None) -> Callable[[int], None]:
        def advance(n: int = 1) -> None:
            pass

        return advance

    def log(self, message: str) -> None:
        pass
