"""Faults and bad input as a user meets them (issue 13): each ends in one `error:` line (or, for
a damaged cache, a one-line notice and a good result), the input untouched, no partial file
under a final name, and a later run that works."""

from __future__ import annotations

import errno
import hashlib
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from cli import app
from p2v_fast import video
from tests.helpers import one_line_error, sample_clip

runner = CliRunner()
FAST = ["--model", "tiny", "--size", "64", "--steps", "2", "--source-prompt", "a clip"]


def _p2v(*args: object):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def clip(tmp_path_factory, tiny_dir) -> Path:
    return sample_clip(tmp_path_factory.mktemp("clip"), n_frames=4, size=(96, 64))


@pytest.fixture()
def cache(tmp_path, monkeypatch, tiny_dir) -> Path:
    """An empty P2V_CACHE of this test's own (the tiny model linked in, not rebuilt)."""
    root = tmp_path / "cache"
    (root / "models").mkdir(parents=True)
    (root / "models" / tiny_dir.name).symlink_to(tiny_dir)
    monkeypatch.setenv("P2V_CACHE", str(root))
    return root


def _entry(cache: Path) -> Path:
    (entry,) = (cache / "inversions").iterdir()
    return entry


# --------------------------------------------------------------------------- 1. the inversion cache


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _nan(p: Path) -> None:
    t = load_file(p)
    t["x_T"][0, 0, 0, 0] = float("nan")
    save_file(t, p)


DAMAGE = {"truncated": _truncate, "empty": lambda p: p.write_bytes(b""), "missing": Path.unlink, "nan": _nan}


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_cache_entry_is_recomputed_with_a_notice(clip, cache, tmp_path, damage) -> None:
    r = _p2v("invert", clip, *FAST)
    assert r.exit_code == 0, r.output
    entry = _entry(cache)
    DAMAGE[damage](entry / "frame_000002.safetensors")
    out = tmp_path / "out.mp4"
    r = _p2v("edit", clip, "a swan", "-o", out, *FAST)
    assert r.exit_code == 0, r.output
    notices = [ln for ln in r.stderr.splitlines() if "is damaged" in ln]
    assert len(notices) == 1 and "frame 2" in notices[0] and "recomputing" in notices[0], r.stderr
    assert video.probe(out).n_frames == 4
    x_t = load_file(entry / "frame_000002.safetensors")["x_T"]
    assert torch.isfinite(x_t).all()
    r = _p2v("invert", clip, *FAST)  # the repaired entry is whole again: a plain hit
    assert r.exit_code == 0 and "cache hit" in r.output and "is damaged" not in r.output, r.output


def test_truncated_copy_of_a_video_is_one_line_and_max_frames_works(tmp_path, cache) -> None:
    full = tmp_path / "full.mp4"
    with video.VideoWriter(full, 12.0, (96, 64)) as w:  # faststart: the frame count is at the front
        for i in range(12):
            w.write(video.sample_frame(i, (96, 64)))
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size * 6 // 10])
    assert video.probe(cut).n_frames == 12  # the container still says 12
    decodable = len(list(video.read_frames(cut)))
    assert 0 < decodable < 12
    before = _digest(cut)
    r = _p2v("edit", cut, "a swan", "-o", tmp_path / "o.mp4", *FAST)
    msg = one_line_error(r)
    assert f"only {decodable} decode" in msg and f"--max-frames {decodable}" in msg
    assert not (tmp_path / "o.mp4").exists() and _digest(cut) == before
    r = _p2v("edit", cut, "a swan", "-o", tmp_path / "o.mp4", *FAST, "--max-frames", decodable)
    assert r.exit_code == 0, r.output


def test_two_inversions_of_one_clip_at_once_share_the_work(tiny_models, clip, tmp_path) -> None:
    """The second run waits for the first (the entry's lock) and then uses its result; neither
    reads a file the other deletes (which crashed 2 of 8 trials before)."""
    from p2v_fast.backends import TorchBackend
    from p2v_fast.config import EditConfig
    from p2v_fast.inversion import invert_clip, select_clip
    from p2v_fast.paths import FileLock

    cfg = EditConfig(model="tiny", size=64, steps=2, source_prompt="a clip", cache_dir=tmp_path / "c")
    sel = select_clip(clip, cfg)
    backend = TorchBackend(tiny_models)  # one backend (its UNet wrapper is not for two threads at once)
    root = invert_clip(cfg, sel, tiny_models, backend, "a clip", check=False).root
    one_inversion = backend.counter.unet_samples
    for p in root.iterdir():  # an empty entry again, its lock held by "another run"
        p.unlink()
    held = FileLock(root / ".lock")
    held.acquire()
    waiting = threading.Barrier(3)
    results: dict[int, bool] = {}

    class Log:
        def stage(self, description, total):
            return lambda n=1: None

        def log(self, message):
            if "waiting for another p2v run" in message:
                waiting.wait(timeout=60)


    def run(k: int) -> None:
        results[k] = invert_clip(cfg, sel, tiny_models, backend, "a clip", progress=Log(), check=False).cache_hit

    threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    waiting.wait(timeout=60)  # both runs wait on the lock
    held.release()
    for t in threads:
        t.join(timeout=120)
    assert sorted(results.values()) == [False, True]  # one inverted, the other waited and reused it
    assert backend.counter.unet_samples == 2 * one_inversion  # the first above, then one of the two
    assert not list(root.glob("encoded_*")) and (root / "meta.json").is_file()


def test_cache_write_out_of_space_is_one_line_and_keeps_only_whole_files(clip, cache, tmp_path, monkeypatch) -> None:
    """ENOSPC injected where the cache's bytes reach the disk (after part of the data is
    written): one line naming the folder, no temporary file left, and a rerun that works."""
    import p2v_fast.paths as paths

    real = paths._write_fd
    calls = {"n": 0}

    def fill_up(fd: int, data: bytes) -> None:
        calls["n"] += 1
        if calls["n"] < 3:
            return real(fd, data)
        real(fd, data[: len(data) // 2])  # the third cache file fills the disk halfway through
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(paths, "_write_fd", fill_up)
    r = _p2v("invert", clip, *FAST)
    msg = one_line_error(r)
    entry = _entry(cache)
    assert "no space left" in msg and str(entry) in msg
    assert not [p for p in entry.iterdir() if p.name.endswith(".tmp")]
    assert not (entry / "meta.json").exists()
    monkeypatch.setattr(paths, "_write_fd", real)
    r = _p2v("invert", clip, *FAST)
    assert r.exit_code == 0, r.output
    r = _p2v("invert", clip, *FAST)
    assert "cache hit" in r.output


# --------------------------------------------------------------------------- 8. signals


@pytest.mark.parametrize(("sig", "code", "word"), [("SIGTERM", 143, "terminated"), ("SIGINT", 130, "interrupted")])
def test_signal_while_writing_removes_the_partial_file(tmp_path, tiny_dir, sig, code, word) -> None:
    """The installed command, killed while it writes its output: one error line, the partial file
    and the output's lock removed, nothing under the final name; a rerun works."""
    import os
    import signal
    import subprocess
    import sys
    import time

    clip = sample_clip(tmp_path, n_frames=6, size=(64, 64), audio=False)
    out = tmp_path / "out.mp4"
    args = [sys.executable, "-m", "cli", "edit", str(clip), "a swan", "-o", str(out), "--model", "tiny",
            "--size", "64", "--steps", "30", "--source-prompt", "a clip", "--latent-update", "off"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, cwd=Path(__file__).parents[1], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    partial = tmp_path / ".out.partial.mp4"
    deadline = time.monotonic() + 120
    while not partial.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert partial.exists(), "the run ended before it wrote anything"
    proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines[-1].startswith("error: " + word) and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4"]
    r = _p2v("edit", clip, "a swan", "-o", out, *FAST)
    assert r.exit_code == 0, r.output
