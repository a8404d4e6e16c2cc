"""Finished frames to the writers, overlapped with the edit.

The edit loop hands each finished latent to a :class:`FrameSink` and goes on with the next
tick. What follows runs beside the UNet, not after it:

- VAE decode and the conversion to uint8 (on the device). On CUDA with the torch backend they
  run on a side stream that waits for the latent's producer, and the uint8 frame is copied into
  pinned host memory without blocking the host; elsewhere they run inline (a CPU has no second
  engine to overlap with, and graph backends bring their own streams).
- The copy's wait, and H.264 encoding (PyAV releases the GIL), in a writer thread.

A bounded queue keeps at most ``depth`` frames between the two, so memory stays constant and a
slow writer slows the edit instead of growing a backlog. The consumer (``consume(index, frame)``)
runs in the writer thread, in frame order; its first error stops the sink and is raised in the
edit's thread. Outputs stay atomic: the sink is closed (drained or cancelled) before the
writers' own ``with`` blocks finish or abort.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

import numpy as np
import torch

from p2v_fast.nets.backends import Backend, TorchBackend

_STOP = object()


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[B,3,H,W] in [-1,1] -> [B,H,W,3] uint8, on the images' device."""
    arr = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return arr.permute(0, 2, 3, 1).contiguous()


class FrameSink:
    """Decode finished latents and hand uint8 ``[H, W, 3]`` frames to ``consume`` in a thread.

    Use as a context manager; :meth:`submit` each finished latent ([1,4,h,w]) in order.
    ``seconds`` holds the busy time of each side: ``decode`` (device time of VAE decode and
    conversion, CUDA events on the side stream, or wall time inline) and ``encode`` (the
    consumer's wall time in the writer thread).
    """

    def __init__(self, backend: Backend, consume: Callable[[int, np.ndarray], None], depth: int = 4) -> None:
        self.backend = backend
        self.consume = consume
        self.side_stream = (torch.cuda.Stream(backend.device)
                            if backend.device.type == "cuda" and isinstance(backend, TorchBackend) else None)
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max(1, depth))
        self._error: BaseException | None = None
        self._cancel = threading.Event()
        self._thread = threading.Thread(target=self._run, name="p2v-writer", daemon=True)
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self.seconds = {"decode": 0.0, "encode": 0.0}
        self.frames = 0

    def __enter__(self) -> FrameSink:
        self._thread.start()
        return self

    def submit(self, index: int, latent: torch.Tensor) -> None:
        """Decode ``latent`` (asynchronously on CUDA) and queue it for the writer thread."""
        self._raise_if_failed()
        if self.side_stream is None:
            t0 = time.perf_counter()
            frame: Any = to_uint8(self.backend.vae_decode(latent))[0].cpu().numpy()
            self.seconds["decode"] += time.perf_counter() - t0
            done = None
        else:
            main, side = torch.cuda.current_stream(self.backend.device), self.side_stream
            side.wait_stream(main)  # the latent is ready on the side stream
            latent.record_stream(side)  # and its memory is not reused before the side is done
            with torch.cuda.stream(side):
                start, done = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record(side)
                pixels = to_uint8(self.backend.vae_decode(latent))[0]
                frame = torch.empty(pixels.shape, dtype=torch.uint8, pin_memory=True)
                frame.copy_(pixels, non_blocking=True)
                done.record(side)
            self._events.append((start, done))
        self._put((index, frame, done))

    def _put(self, item: Any) -> None:
        while True:
            self._raise_if_failed()
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _run(self) -> None:
        try:
            while True:
                item = self._queue.get()
                if item is _STOP or self._cancel.is_set():
                    return
                index, frame, done = item
                if done is not None:
                    done.synchronize()  # this thread waits for the copy, the edit's does not
                    frame = frame.numpy()
                t0 = time.perf_counter()
                self.consume(index, frame)
                self.seconds["encode"] += time.perf_counter() - t0
                self.frames += 1
        except BaseException as exc:  # handed to the edit's thread
            self._error = exc

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def close(self, cancel: bool = False) -> None:
        """Drain the queue and join the writer thread (``cancel``: drop what is queued)."""
        if not self._thread.is_alive():
            return
        if cancel:
            self._cancel.set()
        while self._thread.is_alive():
            try:
                self._queue.put(_STOP, timeout=0.1)
                break
            except queue.Full:
                if cancel:  # make room: nothing queued will be written
                    try:
                        self._queue.get_nowait()
                    except queue.Empty:
                        pass
        self._thread.join()
        if self._events:
            self._events[-1][1].synchronize()
            self.seconds["decode"] = sum(a.elapsed_time(b) for a, b in self._events) / 1000.0

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close(cancel=exc_type is not None)
        if exc_type is None:
            self._raise_if_failed()
