"""How counts, durations, names and sizes are written in messages and file names (and sizes read): one of each."""

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


_BYTE_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": 2**20, "mb": 2**20, "mib": 2**20,
               "g": 2**30, "gb": 2**30, "gib": 2**30, "t": 2**40, "tb": 2**40, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """``--max-memory``'s value: "12GB", "12 GiB", "800M", "1.5g", "4096" (bytes); units are
    binary (1 GB = 2**30 bytes). Raises ValueError on anything else or a value below 1 MiB."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _BYTE_UNITS:
        raise ValueError(f"{text!r} is not a size; use e.g. 12GB, 800MB")
    n = int(float(m.group(1)) * _BYTE_UNITS[m.group(2).lower()])
    if n < 2**20:
        raise ValueError(f"{text!r} is below 1 MiB")
    return n
