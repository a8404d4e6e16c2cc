"""Memory on the device: peak windows, headroom, and how many frames one UNet call may take.

Peak memory is read from what the device keeps: on CUDA the caching allocator's peak
(``torch.cuda.max_memory_allocated``), on Linux CPUs the process's peak resident set (VmHWM,
reset through ``/proc/self/clear_refs``). Both have one high-water mark per process, so
windows are nested here (:func:`open_window` / :func:`window_peak` / :func:`close_window`):
opening one folds the current mark into every open window before resetting it, so the
benchmark's stage window and the edit's per-call windows do not spoil each other.

:class:`CallBudget` is what ``--batch-frames``' default, "what fits", means for the wavefront:
the frames of one tick go through the UNet in calls of as many frames as fit in the memory
still free, measured rather than guessed.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager
from typing import TypeVar

import torch

from p2v_fast.errors import is_out_of_memory

# ------------------------------------------------------------------------------------------
# high-water marks

_HWM = re.compile(r"^VmHWM:\s+(\d+)\s+kB", re.MULTILINE)


def read_hwm() -> int | None:
    """The process's peak resident set in bytes (Linux), or None."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            m = _HWM.search(f.read())
    except OSError:
        return None
    return int(m.group(1)) * 1024 if m else None


def reset_hwm() -> bool:
    """Linux: writing 5 to clear_refs resets the process's peak RSS (VmHWM) to its current RSS."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        return False
    return read_hwm() is not None


def resident_bytes() -> int:
    """The process's current resident set in bytes."""
    import psutil

    return int(psutil.Process().memory_info().rss)


@functools.cache
def _hwm_resettable() -> bool:
    return read_hwm() is not None and os.access("/proc/self/clear_refs", os.W_OK)


def peaks_measurable(device: torch.device) -> bool:
    """Whether peak windows work on ``device``: CUDA, or a CPU whose VmHWM can be reset.
    Asking resets nothing (a reset outside :func:`open_window` would lose open windows' peaks)."""
    return device.type == "cuda" or (device.type == "cpu" and _hwm_resettable())


def _mark(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return read_hwm() or 0


def _reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        reset_hwm()


_windows: dict[str, dict[int, int]] = {}  # device -> open window -> its peak so far
_next_window = 0


def _fold(device: torch.device) -> dict[int, int]:
    windows = _windows.setdefault(str(device), {})
    if windows:
        mark = _mark(device)
        for k, v in windows.items():
            windows[k] = max(v, mark)
    return windows


def open_window(device: torch.device) -> int:
    """Start measuring the peak on ``device``; returns the window's handle."""
    global _next_window
    windows = _fold(device)
    _reset(device)
    handle, _next_window = _next_window, _next_window + 1
    windows[handle] = _mark(device)
    return handle


def window_peak(device: torch.device, handle: int) -> int:
    """Peak bytes on ``device`` since ``handle`` was opened (the window stays open)."""
    return _fold(device)[handle]


def close_window(device: torch.device, handle: int) -> int:
    """Peak bytes since ``handle`` was opened; the window is closed."""
    peak = window_peak(device, handle)
    del _windows[str(device)][handle]
    return peak


# ------------------------------------------------------------------------------------------
# headroom


def in_use(device: torch.device) -> int:
    """Bytes in use now: tensors on a CUDA device, the resident set on the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    return resident_bytes()


def default_pool_free(segments: list[dict]) -> int:
    """Bytes the caching allocator holds unused in its default pool, from
    ``torch.cuda.memory_snapshot()``'s segments. A private pool's free blocks (a CUDA graph's,
    ``segment_pool_id`` other than (0, 0)) serve only that graph's replays: an ordinary
    allocation cannot take them, so they are not headroom."""
    return sum(int(seg["total_size"]) - int(seg["allocated_size"]) for seg in segments
               if tuple(seg.get("segment_pool_id", (0, 0))) == (0, 0))


def cuda_room(free: int, total: int, fraction: float, reserved: int, allocated: int, pool_free: int,
              max_memory: int | None = None) -> int:
    """Bytes a new tensor may still take on a CUDA device: what the driver has free plus the
    default pool's unused blocks, within ``set_per_process_memory_fraction``'s limit (the
    allocator refuses to reserve beyond ``fraction x total``) and within ``max_memory`` (a
    budget on the bytes tensors hold, as ``torch.cuda.max_memory_allocated`` counts them)."""
    room = min(free, max(0, int(fraction * total) - reserved)) + pool_free
    if max_memory is not None:
        room = min(room, max_memory - allocated)
    return max(0, room)


def headroom(device: torch.device, max_memory: int | None = None) -> int:
    """Bytes that can still be taken: on CUDA, :func:`cuda_room` (free device memory and the
    default pool's unused blocks, within the per-process fraction); on the CPU, the system's
    available memory. ``max_memory``: a budget on the bytes in use (``--max-memory``), on CUDA
    the bytes tensors hold, on the CPU the resident set."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return cuda_room(int(free), int(total), torch.cuda.get_per_process_memory_fraction(device),
                         int(torch.cuda.memory_reserved(device)), int(torch.cuda.memory_allocated(device)),
                         default_pool_free(torch.cuda.memory_snapshot()), max_memory)
    import psutil

    room = int(psutil.virtual_memory().available)
    if max_memory is not None:
        room = min(room, max_memory - resident_bytes())
    return max(0, room)


def budget_exceeded(device: torch.device, max_memory: int | None) -> str | None:
    """A line saying that ``--max-memory`` is already spent before any UNet call (the loaded
    models and the process itself: on CUDA the bytes tensors hold, on the CPU the resident set),
    so every call will run one frame; None when there is room (or no budget)."""
    if max_memory is None:
        return None
    used = int(torch.cuda.memory_allocated(device)) if device.type == "cuda" else resident_bytes()
    if used < max_memory:
        return None
    where = "tensors on the GPU hold" if device.type == "cuda" else "this process already holds"
    return (f"--max-memory {max_memory / 2**20:.0f} MiB is already exceeded before the first UNet call "
            f"({where} {used / 2**20:.0f} MiB, the models included): every UNet call runs one frame; "
            f"give a budget above {used / 2**20:.0f} MiB to batch frames")


# ------------------------------------------------------------------------------------------
# frames per UNet call

#: Share of the headroom a UNet call may plan to use; the rest absorbs fragmentation, the
#: measurement's noise and what else runs beside the edit.
SAFETY = 0.6

Kind = Hashable  # the edit: (cross-frame network, differentiable call); inversion: its own
T = TypeVar("T")


class CallBudget:
    """How many frames one UNet call of each kind may take.

    Bytes per frame are measured, not guessed, as the difference between the peaks of a 2-frame
    and a 1-frame call of the kind (each above what was in use before it), so fixed costs (a
    workspace, the first use of a kernel) are not charged to the frame: the first call of a
    kind takes one frame, the second two (:meth:`calibrate` runs both up front where the
    caller's own calls would not). Later calls take ``floor(SAFETY x headroom / bytes per
    frame)`` frames, at least one, and are not measured again (no work on the hot path). Where
    the difference is not positive (noise of a CPU's resident-set peak), the 2-frame call's
    whole peak is charged to its two frames. Where the peak cannot be read (engines on a GPU
    allocate outside PyTorch's allocator) calls are not split here; a TensorRT engine's batch
    profile splits them instead. An out-of-memory error halves the kind's limit: the caller
    retries, since nothing has changed yet (:func:`p2v_fast.method.edit.run_step` commits only after a
    call returns). ``splits`` counts the calls added by splitting (measurement included).
    """

    def __init__(
        self,
        device: torch.device,
        measurable: bool | None = None,
        headroom_fn: Callable[[], int] | None = None,
        max_memory: int | None = None,
        buckets: Callable[[int], int] | None = None,
    ) -> None:
        self.device = device
        self.measurable = peaks_measurable(device) if measurable is None else measurable
        self.max_memory = max_memory
        self.headroom_fn = headroom_fn or (lambda: headroom(device, max_memory))
        # compiled calls: frames -> the padded batch (samples) the call runs at; calls are then
        # costed per bucket (bucket_bytes), since a CUDA graph's memory is its pool's, reserved
        # when the bucket is recorded, and a call measured after that shows ~0 bytes per frame
        self.buckets = buckets
        self.bucket_bytes: dict[int, int] = {}  # padded batch -> peak bytes of its first (recording) call
        self.one_frame_peak: dict[Kind, int] = {}  # peak of the kind's 1-frame call
        self.bytes_per_frame: dict[Kind, float] = {}
        self.ceiling: dict[Kind, int] = {}  # set by out-of-memory errors
        self.splits = 0  # calls added by splitting (to measure, or to fit)
        self.ooms = 0

    def _measuring(self, kind: Kind) -> bool:
        return self.measurable and kind not in self.bytes_per_frame

    def frames_per_call(self, kind: Kind, wanted: int) -> int:
        """Frames the next call of ``kind`` may take, of ``wanted``."""
        if wanted <= 1:
            return 1
        if self.buckets is not None and self.bucket_bytes and isinstance(kind, tuple) and kind[-1] is False:
            n = self._frames_by_bucket(min(wanted, self.ceiling.get(kind, wanted)))
        elif self._measuring(kind):
            n = 1 if kind not in self.one_frame_peak else 2  # measure one frame, then two
        else:
            n = min(wanted, self.ceiling.get(kind, wanted))
            per = self.bytes_per_frame.get(kind, 0.0) if self.measurable else 0.0
            if per > 0:
                n = min(n, int(SAFETY * self.headroom_fn() // per))
        n = max(1, min(n, wanted))
        if n < wanted:
            self.splits += 1
        return n

    def _frames_by_bucket(self, wanted: int) -> int:
        """Most frames (of ``wanted``) whose bucket is recorded and fits: a recorded bucket's
        memory is already reserved in its graph pool, so a call fits if its bucket was recorded;
        one not recorded is costed at the largest recorded bucket's bytes scaled by samples."""
        assert self.buckets is not None
        room = SAFETY * self.headroom_fn()
        largest = max(self.bucket_bytes)
        for n in range(wanted, 0, -1):
            b = self.buckets(2 * n)
            if b in self.bucket_bytes or self.bucket_bytes[largest] * b / largest <= room:
                return n
        return 1

    def calibrate(self, kind: Kind, call: Callable[[int], object], available: int) -> None:
        """Measure ``kind`` with ``call(1)`` and ``call(2)`` (one call of 1 and of 2 frames,
        results discarded) before the caller's own calls, where those would run a frame alone
        for long (inversion runs every step of a call's frames). Needs ``available`` >= 2."""
        if not self._measuring(kind) or available < 2:
            return
        for frames in (1, 2):
            with self.measure(kind, frames):
                call(frames)

    def run_in_calls(self, kind: Kind, items: Sequence[T], run: Callable[[Sequence[T]], None],
                     most: int | None = None) -> None:
        """``run`` over ``items`` (independent of each other) in calls of at most ``most`` and
        of as many as fit; a call that runs out of memory is retried smaller, so ``run`` must
        change no state before it returns."""
        done = 0
        while done < len(items):
            n = self.frames_per_call(kind, min(len(items) - done, most or len(items)))
            try:
                run(items[done : done + n])
            except Exception as exc:
                if n == 1 or not is_out_of_memory(exc):
                    raise
                self.out_of_memory(kind, n)
                continue
            done += n

    @contextmanager
    def measure(self, kind: Kind, frames: int, backend_device: torch.device | None = None) -> Iterator[None]:
        """Measure the call run inside on ``backend_device`` (default: the budget's device) while
        ``kind``'s bytes per frame are unknown: a 1-frame call's peak, then a 2-frame call's."""
        device = backend_device or self.device
        done = kind in self.one_frame_peak if frames == 1 else frames > 2
        if not self._measuring(kind) or device != self.device or done:
            yield
            return
        before = in_use(device)
        handle = open_window(device)
        try:
            yield
        finally:
            peak = max(0, close_window(device, handle) - before)
        if frames == 1:
            self.one_frame_peak[kind] = peak
        elif kind in self.one_frame_peak:
            per = peak - self.one_frame_peak[kind]
            self.bytes_per_frame[kind] = float(per if per > 0 else peak / 2)

    def out_of_memory(self, kind: Kind, frames: int) -> None:
        """A call of ``frames`` frames did not fit: later calls of ``kind`` take at most half."""
        self.ooms += 1
        self.ceiling[kind] = max(1, frames // 2)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------
# attention scores of a graph run in full (a check in ONNX Runtime)

#: The most one slice of a check run in ONNX Runtime may plan to hold in attention scores, whatever
#: the device has free: a check is not worth crowding out everything else on the machine.
CHECK_BUDGET = 8 * 2**30


def attention_score_bytes(heads: int, queries: int, keys: int, dtype_bytes: int, copies: int = 2) -> int:
    """Bytes one sample's attention layer holds where attention runs as softmax(Q K^T) in full, as an
    exported graph does in ONNX Runtime (PyTorch's and TensorRT's fused kernels never hold them):
    ``copies`` tensors (the scores and their softmax) of heads x queries x keys elements. SD2-depth's
    UNet at 896x896 in fp16: 5 heads x 12544 x 25088 (anchor || previous) x 2 bytes x 2 = 6.3 GB."""
    return copies * heads * queries * keys * dtype_bytes


def check_budget(device: torch.device, cap: int = CHECK_BUDGET) -> int:
    """Bytes one slice of a check run in ONNX Runtime on ``device`` may plan to take: ``cap``, or
    :data:`SAFETY` of what is free there (:func:`headroom`; the system's available memory on the
    CPU), whichever is less."""
    return max(1, min(cap, int(SAFETY * headroom(device))))


def samples_per_slice(per_sample: int, batch: int, budget: int) -> int:
    """Samples of a ``batch`` one run may take so that ``per_sample`` bytes each stay within
    ``budget`` (at least one: a sample cannot be split; all where nothing is charged per sample)."""
    if per_sample <= 0:
        return batch
    return max(1, min(batch, budget // per_sample))
