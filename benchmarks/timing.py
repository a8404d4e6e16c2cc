"""Clocks, spreads and peak memory, the gpt-fast way: warm-up excluded, device synchronised
before a clock is read.

On CUDA a mark is a recorded CUDA event (read after a final synchronise); everything the
device was asked to do before the mark, on any stream, is finished first, so engines that run
on their own streams are timed too. On the CPU a mark is ``time.perf_counter()``.
"""

from __future__ import annotations

import os
import resource
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from p2v_fast.nets import memory


def synchronize(device: torch.device) -> None:
    """Wait for all work queued on ``device``."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


@dataclass
class Mark:
    wall: float
    event: torch.cuda.Event | None = None


class Clock:
    """``mark()`` points in time on one device; ``seconds(a, b)`` between two of them."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.kind = "cuda events" if device.type == "cuda" else "time.perf_counter"

    def mark(self) -> Mark:
        synchronize(self.device)
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return Mark(time.perf_counter(), event)
        return Mark(time.perf_counter())

    def seconds(self, a: Mark, b: Mark) -> float:
        if a.event is not None and b.event is not None:
            b.event.synchronize()
            return a.event.elapsed_time(b.event) / 1000.0
        return b.wall - a.wall


def summarize(samples: list[float]) -> dict[str, object]:
    """Every sample plus median, min, max, quartiles and IQR (linear interpolation)."""
    arr = np.asarray(samples, dtype=np.float64)
    if arr.size == 0:
        raise ValueError("no samples to summarize")
    q1, med, q3 = np.percentile(arr, [25, 50, 75])
    return {
        "repeats": [float(x) for x in arr],
        "median": float(med),
        "min": float(arr.min()),
        "max": float(arr.max()),
        "q1": float(q1),
        "q3": float(q3),
        "iqr": float(q3 - q1),
        "mean": float(arr.mean()),
    }


class PeakMemory:
    """Peak memory over a window: ``reset()``, run, ``peak()`` -> bytes.

    CUDA: ``torch.cuda.max_memory_allocated`` (tensors only, not the caching allocator's
    reserve or engines' own allocations). CPU on Linux: the process's peak resident set
    (VmHWM, reset through /proc/self/clear_refs), which includes the weights. Elsewhere: the
    lifetime peak RSS from ``getrusage`` (it cannot be reset; ``kind`` says so). Windows are
    :mod:`p2v_fast.nets.memory`'s, so the edit's own per-call measurements do not disturb them.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.window: int | None = None
        if device.type == "cuda":
            self.kind = "torch.cuda.max_memory_allocated"
        elif memory.peaks_measurable(device):
            self.kind = "process peak RSS (VmHWM, reset per stage)"
        else:
            self.kind = "process peak RSS (getrusage, lifetime)"

    @property
    def windowed(self) -> bool:
        return not self.kind.endswith("lifetime)")

    def reset(self) -> None:
        if self.windowed:
            if self.window is not None:
                memory.close_window(self.device, self.window)
            self.window = memory.open_window(self.device)

    def peak(self) -> int:
        if self.windowed and self.window is not None:
            return memory.window_peak(self.device, self.window)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(rss if sys.platform == "darwin" else rss * 1024)  # bytes on macOS, KiB on Linux


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages (other work on a shared machine skews CPU timings)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None
