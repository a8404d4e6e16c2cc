"""`p2v bench`'s options, written once: :class:`BenchRequest` holds them as the command takes them
(the CLI's parameters carry its field names and show its defaults); the timed stages' options
(:class:`benchmarks.bench.BenchOptions`) and the protocol's take their defaults from it. Light: no
torch, so ``p2v --help`` reads it without loading the benchmarks."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from p2v_fast.config import EditConfig

#: Frames of the synthetic clip when --frames is not given (1 anchor + 3 propagated).
DEFAULT_FRAMES = 4
#: Frames --plan simulates when --frames is not given (docs/performance.md's table): more than the
#: largest cap compared (50), so that every cap's row differs (at 4 frames every cap held the whole clip).
PLAN_FRAMES = 60


def default_size(model: str | None) -> int:
    """512, or 128 for the tiny model (at 512 it takes ~45 min on 2 CPU cores; its timings mean little)."""
    return 128 if model == "tiny" else 512


@dataclass(frozen=True)
class BenchRequest:
    """``p2v bench``'s options as given: the command's parameters carry these names and defaults
    (:meth:`from_options`). None means "the mode's default" (--size: :func:`default_size`; --steps:
    the edit's; --frames: :data:`DEFAULT_FRAMES`, :data:`PLAN_FRAMES` with --plan, or the protocol's workload)."""

    plan: bool = False  # only simulate the wavefront
    protocol: str | None = None  # run the peers' end-to-end protocol (benchmarks.protocol)
    model: str | None = None
    arch: str | None = None
    size: int | None = None
    steps: int | None = None
    frames: int | None = None
    backend: tuple[str, ...] = ()  # repeatable options: every value given, in order
    latent_update: tuple[str, ...] = ()
    schedule: tuple[str, ...] = ()
    speedups: tuple[str, ...] = ()
    batch_frames: int | None = None
    invert_batch: int | None = None
    invert_dtype: str = EditConfig.invert_dtype
    max_memory: int | None = None  # bytes
    dtype: str = EditConfig.dtype
    device: str = EditConfig.device
    engines: Path | None = None
    repeats: int = 3
    warmup: int = 1
    threads: int | None = None
    compile: bool = False
    json_path: Path | None = None
    overwrite: bool = False  # replace an existing --json file

    @classmethod
    def from_options(cls, options: Mapping[str, Any], **overrides: Any) -> BenchRequest:
        """The request a command's parameters describe: the entries that name a field (a repeatable
        option's list becomes a tuple, None an empty one), then ``overrides``."""
        values = {k: v for k, v in options.items() if k in cls.__dataclass_fields__}
        for name in ("backend", "latent_update", "schedule", "speedups"):
            if name in values:
                values[name] = tuple(values[name] or ())
        return cls(**{**values, **overrides})
