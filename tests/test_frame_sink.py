"""Finished frames are decoded and written beside the edit (p2v_fast.output.FrameSink), in
order, and a failure on either side stops both and leaves no output."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from p2v_fast.method.frame_sink import FrameSink, to_uint8
from p2v_fast.nets.backends import Backend


class _Decoder(Backend):
    """vae_decode only: latent [1,4,h,w] -> image [1,3,8h,8w] holding the latent's first value."""

    name = "fake"

    def __init__(self) -> None:
        super().__init__(torch.device("cpu"), torch.float32)
        self.thread_ids: set[int] = set()

    def vae_decode(self, latents):
        self.thread_ids.add(threading.get_ident())
        b, _, h, w = latents.shape
        return latents[:, :1, :1, :1].expand(b, 3, 8 * h, 8 * w).clone()

    def unet(self, *args, **kwargs):
        raise NotImplementedError

    def vae_encode(self, images):
        raise NotImplementedError

    def depth(self, pixel_values):
        raise NotImplementedError


def _latent(i: int) -> torch.Tensor:
    return torch.full((1, 4, 2, 2), -1.0 + i / 10)


def test_frames_arrive_in_order_decoded_as_inline() -> None:
    backend, got, threads = _Decoder(), [], set()

    def consume(index: int, frame: np.ndarray) -> None:
        threads.add(threading.get_ident())
        got.append((index, frame))

    with FrameSink(backend, consume, depth=2) as sink:
        for i in range(6):
            sink.submit(i, _latent(i))
    assert [i for i, _ in got] == list(range(6))
    for i, frame in got:
        expected = to_uint8(backend.vae_decode(_latent(i)))[0].numpy()
        assert frame.dtype == np.uint8 and frame.shape == (16, 16, 3)
        np.testing.assert_array_equal(frame, expected)
    assert threads and threading.get_ident() not in threads  # written in the writer thread
    assert sink.frames == 6 and sink.seconds["encode"] >= 0 and sink.seconds["decode"] > 0


def test_a_writer_error_reaches_the_edit() -> None:
    def consume(index: int, frame: np.ndarray) -> None:
        if index == 2:
            raise OSError("No space left on device")

    with pytest.raises(OSError, match="No space left"), FrameSink(_Decoder(), consume, depth=1) as sink:
        for i in range(50):
            sink.submit(i, _latent(i % 20))


def test_an_edit_error_cancels_the_writer() -> None:
    written: list[int] = []
    never = threading.Event()

    def consume(index: int, frame: np.ndarray) -> None:  # a slow writer
        never.wait(0.3)
        written.append(index)

    with pytest.raises(RuntimeError, match="edit failed"), FrameSink(_Decoder(), consume, depth=8) as sink:
        for i in range(5):
            sink.submit(i, _latent(i))
        raise RuntimeError("edit failed")
    assert len(written) <= 1  # the frame being written finishes; what was queued is dropped
    assert not sink._thread.is_alive()


def test_a_failed_edit_leaves_no_output(tmp_path, tiny_dir, monkeypatch) -> None:
    """The edit fails after frames were written: neither the output nor its partial file stays."""
    from p2v_fast.config import EditConfig
    from p2v_fast.method import edit as edit_module
    from p2v_fast.pipeline import edit_video
    from tests.helpers import sample_clip

    clip = sample_clip(tmp_path, n_frames=4, size=(64, 64), audio=False)
    cfg = EditConfig(prompt="a swan", model="tiny", size=64, steps=2, source_prompt="a clip", max_frames=4,
                     latent_update="off", schedule="sequential")
    real = edit_module.run_step
    calls = {"n": 0}

    def failing(frames, ctx):
        calls["n"] += 1
        if calls["n"] == 6:  # frame 2 of 4, after two frames were handed to the writer
            raise RuntimeError("device lost")
        real(frames, ctx)

    monkeypatch.setattr(edit_module, "run_step", failing)
    out = tmp_path / "out.mp4"
    with pytest.raises(RuntimeError, match="device lost"):
        edit_video(cfg, clip, out)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
