"""How counts, durations and names are written in messages and file names: one of each."""

from __future__ import annotations

import re


def plural(count: int, noun: str) -> str:
    """'1 frame', '2 frames', '0 frames'."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def clock(seconds: float) -> str:
    """A duration as ``h:mm:ss``: ``3725.4`` -> ``'1:02:05'``, ``10`` -> ``'0:00:10'``; never negative."""
    s = max(round(seconds), 0)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def slug(text: str, limit: int = 40) -> str:
    """``text`` as a file-name part: lower-case ASCII letters and digits joined by '-', at most
    ``limit`` characters, never empty ("edit"): 'A Swan, on the lake!' -> 'a-swan-on-the-lake'."""
    out = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return out[:limit].rstrip("-") or "edit"


def size_text(n_bytes: float) -> str:
    """A file or download size in decimal units, as the Hugging Face hub shows them:
    ``5_650_000_000`` -> ``'5.65 GB'``, ``990e6`` -> ``'990 MB'``, ``20.1e6`` -> ``'20.1 MB'``."""
    n = float(max(n_bytes, 0))
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{int(n)} B"
