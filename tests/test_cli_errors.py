"""Faults and bad input as a user meets them: each ends in one `error:` line (or, for
a damaged cache, a one-line notice and a good result), the input untouched, no partial file
under a final name, and a later run that works."""

from __future__ import annotations

import errno
import shutil
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from p2v_fast.media import reader, samples, writer
from tests.helpers import digest as _digest
from tests.helpers import one_line_error, sample_clip
from tests.helpers import p2v as _p2v

FAST = ["--model", "tiny", "--size", "64", "--steps", "2", "--source-prompt", "a clip"]



@pytest.fixture(scope="module")
def clip(tmp_path_factory, tiny_dir) -> Path:
    return sample_clip(tmp_path_factory.mktemp("clip"), n_frames=4, size=(96, 64))


@pytest.fixture()
def cache(own_cache: Path) -> Path:
    """An empty P2V_CACHE of this test's own (conftest's own_cache: the tiny model linked in)."""
    return own_cache


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
    assert reader.probe(out).n_frames == 4
    x_t = load_file(entry / "frame_000002.safetensors")["x_T"]
    assert torch.isfinite(x_t).all()
    r = _p2v("invert", clip, *FAST)  # the repaired entry is whole again: a plain hit
    assert r.exit_code == 0 and "cache hit" in r.output and "is damaged" not in r.output, r.output


def test_truncated_copy_of_a_video_is_one_line_and_max_frames_works(tmp_path, cache) -> None:
    full = tmp_path / "full.mp4"
    sound = sample_clip(tmp_path, n_frames=12, size=(96, 64))  # for its audio
    with writer.VideoWriter(full, 12.0, (96, 64), audio_source=sound) as w:  # faststart: the frame count is
        for i in range(12):                                                  # at the front
            w.write(samples.sample_frame(i, (96, 64)))
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size * 6 // 10])
    assert reader.probe(cut).n_frames == 12  # the container still says 12
    decodable = len(list(reader.read_frames(cut)))
    assert 0 < decodable < 12
    before = _digest(cut)
    r = _p2v("edit", cut, "a swan", "-o", tmp_path / "o.mp4", *FAST)
    msg = one_line_error(r)
    assert f"only {decodable} decode" in msg and f"--max-frames {decodable}" in msg
    assert not (tmp_path / "o.mp4").exists() and _digest(cut) == before
    r = _p2v("edit", cut, "a swan", "-o", tmp_path / "o.mp4", *FAST, "--max-frames", decodable)
    assert r.exit_code == 0, r.output  # the audio's damaged tail too is cut, not fatal
    assert reader.probe(tmp_path / "o.mp4").has_audio


def test_two_inversions_of_one_clip_at_once_share_the_work(tiny_models, clip, tmp_path) -> None:
    """The second run waits for the first (the entry's lock) and then uses its result; neither
    reads a file the other deletes (which crashed 2 of 8 trials before)."""
    from p2v_fast.config import EditConfig
    from p2v_fast.files import FileLock
    from p2v_fast.media.clip_selection import select_clip
    from p2v_fast.method.inversion import invert_clip
    from p2v_fast.nets.backends import TorchBackend

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
    import p2v_fast.files as files

    real = files._write_fd
    calls = {"n": 0}

    def fill_up(fd: int, data: bytes) -> None:
        calls["n"] += 1
        if calls["n"] < 3:
            return real(fd, data)
        real(fd, data[: len(data) // 2])  # the third cache file fills the disk halfway through
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files, "_write_fd", fill_up)
    r = _p2v("invert", clip, *FAST)
    msg = one_line_error(r)
    entry = _entry(cache)
    assert "no space left" in msg and str(entry) in msg
    assert not [p for p in entry.iterdir() if p.name.endswith(".tmp")]
    assert not (entry / "meta.json").exists()
    monkeypatch.setattr(files, "_write_fd", real)
    r = _p2v("invert", clip, *FAST)
    assert r.exit_code == 0, r.output
    r = _p2v("invert", clip, *FAST)
    assert "cache hit" in r.output


# --------------------------------------------------------------------------- 8. signals


def test_sigterm_while_writing_removes_the_partial_file(tmp_path, tiny_dir) -> None:
    """The installed command, terminated while it writes its output (before: a hidden
    .out.partial.mp4 was left): one error line, the partial file and the output's lock
    removed, nothing under the final name; a rerun works."""
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
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines[-1].startswith("error: terminated (SIGTERM)") and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4"]
    r = _p2v("edit", clip, "a swan", "-o", out, *FAST)
    assert r.exit_code == 0, r.output


def test_ctrl_c_is_one_line_and_keeps_nothing_partial(clip, tmp_path, monkeypatch) -> None:
    from p2v_fast.media.writer import VideoWriter

    real = VideoWriter.write

    def interrupted(self, frame):
        real(self, frame)
        raise KeyboardInterrupt

    monkeypatch.setattr(VideoWriter, "write", interrupted)
    r = _p2v("edit", clip, "a swan", "-o", tmp_path / "o.mp4", *FAST)
    assert r.exit_code == 130 and one_line_error(r).startswith("error: interrupted")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- 2. a full disk


def test_output_out_of_space_is_one_line_and_removes_the_partial_file(clip, tmp_path, monkeypatch) -> None:
    """ENOSPC injected where the writer hands packets to FFmpeg (the third frame): one line naming
    the folder, no partial file, nothing under the final name; a rerun works."""
    from p2v_fast.media.writer import VideoWriter

    real = VideoWriter._io
    calls = {"n": 0}

    def full(self, what, fn, *args):
        if what == "write" and self.out_path.name == "out.mp4":
            calls["n"] += 1
            if calls["n"] == 3:
                def fn(*a):
                    raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, what, fn, *args)

    monkeypatch.setattr(VideoWriter, "_io", full)
    out = tmp_path / "out.mp4"
    r = _p2v("edit", clip, "a swan", "-o", out, *FAST)
    msg = one_line_error(r)
    assert "no space left" in msg and f"'{tmp_path}'" in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    monkeypatch.setattr(VideoWriter, "_io", real)
    r = _p2v("edit", clip, "a swan", "-o", out, *FAST)
    assert r.exit_code == 0, r.output


def test_file_size_limit_from_the_kernel_is_one_line(tmp_path, tiny_dir) -> None:
    """A real write failure from the kernel (RLIMIT_FSIZE: EFBIG once the output passes 12 kB),
    through PyAV, in the installed command: one line, nothing partial left."""
    import os
    import resource
    import signal
    import subprocess
    import sys

    clip = sample_clip(tmp_path, n_frames=6, size=(96, 64))
    out = tmp_path / "out" / "big.mp4"
    out.parent.mkdir()

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (12_000, 12_000))

    proc = subprocess.run([sys.executable, "-m", "cli", "edit", str(clip), "a swan", "-o", str(out), *FAST],
                          cwd=Path(__file__).parents[1], env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, preexec_fn=limit, timeout=300)
    assert proc.returncode == 1, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("error: file too large for") and "Traceback" not in proc.stderr, proc.stderr
    assert list(out.parent.iterdir()) == []


# --------------------------------------------------------------------------- 3, 5, 6, 9: refused at once

BAD = [
    (["--guidance-scale", "nan"], "--guidance-scale must be a finite number"),
    (["--guidance-scale", "inf"], "--guidance-scale must be a finite number"),
    (["--update-weight", "nan"], "--update-weight must be a finite number"),
    (["--update-weight", "inf"], "--update-weight must be a finite number"),
    (["--seed", str(2**64)], "--seed must be between 0 and 2**64 - 1"),
    (["--seed", "-1"], "--seed must be between 0 and 2**64 - 1"),
    (["--stride", "100"], "--stride 100 is longer than the clip"),
    (["--stride", str(10**6)], "is longer than the clip"),
    (["--device", "meta"], "--device 'meta' is not supported"),
    (["--size", "4096"], "over the limit of 2048 pixels per side; the largest --size that fits"),
    (["-o", "{tmp}/x.txt"], "a video output must end in .mp4, .m4v, .mov, .mkv, .webm"),
    (["-o", "{tmp}/noext"], "has no extension"),
    (["--preview", "-o", "{tmp}/x.mp4"], "--preview writes a PNG image"),
    (["-o", "{tmp}/" + "o" * 300 + ".mp4"], "is too long for the file system"),
    (["-o", "{tmp}/" + "o" * 240 + ".mp4"], "is too long for the file system"),  # its .partial name is
    (["-o", "{tmp}/fifo.mp4", "--overwrite"], "is not a regular file"),
    (["--fps", "30"], "--fps is for an image-folder input"),
]


@pytest.mark.parametrize(("args", "message"), BAD, ids=[" ".join(a)[:40] for a, _ in BAD])
def test_bad_values_are_one_line_before_any_work(clip, tmp_path, args, message) -> None:
    import os

    os.mkfifo(tmp_path / "fifo.mp4")
    before = _digest(clip)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if "-o" not in args:
        argv += ["-o", str(tmp_path / "out.mp4")]
    r = _p2v("edit", clip, "a swan", *FAST, *argv)
    assert message in one_line_error(r)
    assert "backend:" not in r.stderr  # refused before the models load
    assert _digest(clip) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo.mp4"]


def test_working_size_of_an_extreme_aspect_ratio_is_refused(tmp_path, tiny_dir) -> None:
    tall = tmp_path / "tall.mp4"
    with writer.VideoWriter(tall, 12.0, (16, 1000)) as w:
        for _ in range(2):
            w.write(samples.sample_frame(0, (16, 1000)))
    msg = one_line_error(_p2v("edit", tall, "a swan", "-o", tmp_path / "o.mp4", "--model", "tiny"))
    assert "512x32000" in msg and "no --size fits this 16x1000 source" in msg


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_fifo_or_device_input_is_refused_at_once(tmp_path, tiny_dir, kind) -> None:
    import os

    path = Path("/dev/zero") if kind == "device" else tmp_path / "in.mp4"
    if kind == "fifo":
        os.mkfifo(path)  # reading it would block forever
    msg = one_line_error(_p2v("edit", path, "a swan", "-o", tmp_path / "o.mp4", *FAST))
    assert "is not a regular file or a folder" in msg


def test_output_inside_the_input_image_folder_is_refused(tmp_path, tiny_dir) -> None:
    frames = samples.make_sample_frames_folder(tmp_path / "frames", 3, (96, 64))
    before = sorted(p.name for p in frames.iterdir())
    for extra in (["-o", frames / "out.mp4"], ["--preview", "-o", frames / "p.png"]):
        msg = one_line_error(_p2v("edit", frames, "a swan", *FAST, *extra))
        assert "is inside the input image folder" in msg
    assert sorted(p.name for p in frames.iterdir()) == before
    msg = one_line_error(_p2v("ablate", frames, "a swan", *FAST, "--out", frames, "--clip-model", "tiny"))
    assert "is the input image folder" in msg


# --------------------------------------------------------------------------- 4. rich markup in user text


def test_markup_in_prompts_and_paths_is_printed_as_is(clip, tmp_path) -> None:
    folder = tmp_path / "d[red]" / "x[" / "y]"  # a path that reads as the markup '[/y]' and '[red]'
    folder.mkdir(parents=True)
    (folder / "c[").mkdir()
    src = folder / "c[/x].mp4"
    src.write_bytes(clip.read_bytes())
    out = folder / "o[bold].mp4"
    r = _p2v("edit", src, "a [/x] swan [red]", "-o", out, *FAST[:-1], "a [/x] clip [bold]")
    assert r.exit_code == 0, r.output
    assert "'a [/x] clip [bold]'" in r.stdout and str(src) in r.stderr and str(out) in r.stdout
    r = _p2v("invert", src, *FAST[:-1], "a [/x] clip [bold]")
    assert r.exit_code == 0 and str(src) in r.output, r.output


# --------------------------------------------------------------------------- 6. the container


@pytest.mark.parametrize(("suffix", "container", "codecs"), [
    (".webm", "matroska,webm", {"vp9", "opus"}),
    (".mkv", "matroska,webm", {"h264", "aac"}),
    (".mov", "mov,mp4,m4a,3gp,3g2,mj2", {"h264", "aac"}),
])
def test_output_container_follows_the_extension(clip, tmp_path, suffix, container, codecs) -> None:
    import av

    out = tmp_path / f"out{suffix}"
    r = _p2v("edit", clip, "a swan", "-o", out, *FAST, "--side-by-side")
    assert r.exit_code == 0, r.output
    for path in (out, tmp_path / f"out.side-by-side{suffix}"):  # the side-by-side too, with its audio
        with av.open(str(path)) as c:
            assert c.format.name == container
            assert {s.codec_context.name for s in c.streams} == codecs
            assert sum(1 for _ in c.decode(video=0)) == 4


# --------------------------------------------------------------------------- 7, 8. other files


def test_existing_strip_is_kept_without_overwrite(clip, tmp_path) -> None:
    out = tmp_path / "o.mp4"
    strip = tmp_path / "o.strip.png"
    strip.write_bytes(b"keep me")
    msg = one_line_error(_p2v("edit", clip, "a swan", "-o", out, *FAST))
    assert "o.strip.png' exists; pass --overwrite" in msg
    assert strip.read_bytes() == b"keep me" and not out.exists()
    r = _p2v("edit", clip, "a swan", "-o", out, *FAST, "--overwrite")
    assert r.exit_code == 0 and strip.read_bytes()[:4] == b"\x89PNG"


def test_a_second_run_writing_the_same_output_is_refused(clip, tmp_path) -> None:
    from p2v_fast.files import OutputClaim

    out = tmp_path / "o.mp4"
    first = OutputClaim(out).acquire(overwrite=False)  # another run is writing o.mp4
    msg = one_line_error(_p2v("edit", clip, "a swan", "-o", out, *FAST))
    assert "another p2v run is writing" in msg
    first.release()
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    r = _p2v("edit", clip, "a swan", "-o", out, *FAST)
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.mp4", "o.strip.png"]  # the lock is gone


# --------------------------------------------------------------------------- 9. variable frame rate


def _vfr_clip(path: Path) -> list[float]:
    """12 frames at 24 fps, then 12 at 8 fps, with a 10 ms click at each frame's time."""
    from fractions import Fraction

    import av
    import numpy as np

    times = [i / 24 if i < 12 else 0.5 + (i - 12) / 8 for i in range(24)]
    rate = 48000
    with av.open(str(path), "w") as c:
        vs = c.add_stream("libx264", rate=12)
        vs.width, vs.height, vs.pix_fmt = 64, 64, "yuv420p"
        vs.codec_context.time_base = Fraction(1, 1000)
        a = c.add_stream("aac", rate=rate)
        a.layout = "mono"
        for i, t in enumerate(times):
            f = av.VideoFrame.from_ndarray(samples.sample_frame(i, (64, 64)), format="rgb24").reformat(format="yuv420p")
            f.pts, f.time_base = round(t * 1000), Fraction(1, 1000)
            c.mux(vs.encode(f))
        c.mux(vs.encode(None))
        snd = np.zeros(round((times[-1] + 0.125) * rate), np.float32)
        for t in times:
            s = round(t * rate)
            snd[s : s + 480] = 0.5 * np.sin(2 * np.pi * 1000 * np.arange(480) / rate)
        fr = av.AudioFrame.from_ndarray(snd[None], format="flt", layout="mono")
        fr.sample_rate, fr.pts, fr.time_base = rate, 0, Fraction(1, rate)
        c.mux(a.encode(fr))
        c.mux(a.encode(None))
    return times


def _drift_ms(path: Path, stride: int = 1) -> tuple[int, float]:
    """Frames, and the largest gap between a frame's time and its click's in ``path``."""
    import av
    import numpy as np

    with av.open(str(path)) as c:
        vt = sorted(float(p.pts * p.time_base) for p in c.demux(video=0) if p.pts is not None)
    with av.open(str(path)) as c:
        chunks, t0 = [], None
        for f in c.decode(audio=0):
            t0 = float(f.time) if t0 is None else t0
            chunks.append(f.to_ndarray()[0])
        snd, rate = np.concatenate(chunks), c.streams.audio[0].rate
    loud = np.abs(snd) > 0.1
    onsets = [t0 + i / rate for i in range(1, len(loud)) if loud[i] and not loud[max(0, i - 200) : i].any()]
    pairs = [(vt[k], onsets[k * stride]) for k in range(len(vt)) if k * stride < len(onsets)]
    assert len(pairs) == len(vt)  # every frame's click is in the output
    return len(vt), 1000 * max(abs(a - v) for v, a in pairs)


@pytest.mark.parametrize(("extra", "stride"), [([], 1), (["--start", "3", "--stride", "2"], 2)])
def test_variable_frame_rate_keeps_the_source_timestamps(tmp_path, tiny_dir, extra, stride) -> None:
    """Re-timed to a constant rate, the audio drifted by up to 396 ms on this clip (and its last
    click was cut); with the source's timestamps, every click is within 1 ms of its frame."""
    src = tmp_path / "vfr.mp4"
    _vfr_clip(src)
    assert _drift_ms(src)[1] < 1
    out = tmp_path / "o.mp4"
    r = _p2v("edit", src, "a swan", "-o", out, *FAST, "--latent-update", "off", *extra)
    assert r.exit_code == 0, r.output
    assert "variable frame rate" in r.stdout
    n, drift = _drift_ms(out, stride)
    assert n == (24 if stride == 1 else 11) and drift < 5, drift


# --------------------------------------------------------------------------- 9. usage errors


@pytest.mark.parametrize(("args", "message"), [
    (["edit", "x.mp4"], "error: Missing argument 'prompt'. (see 'p2v edit --help')"),
    (["edit", "x.mp4", "p", "--steps", "abc"], "error: Invalid value for '--steps'"),
    (["edit", "x.mp4", "p", "--bogus"], "error: No such option: --bogus"),
    (["bogus"], "error: No such command 'bogus'."),
])
def test_usage_errors_are_one_line(args, message) -> None:
    r = _p2v(*args)
    assert r.exit_code == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(message), r.stderr
    assert "╭" not in r.output and "Usage:" not in r.output


# --------------------------------------------------------------------------- 10. offline


def test_default_clip_model_with_the_hub_unreachable_fails_at_once(tmp_path, tiny_dir) -> None:
    """`p2v eval` and `p2v ablate` with the default CLIP model, the hub pointed at a closed
    loopback port (in a subprocess: huggingface_hub reads it at import): one line, at once
    (before: ~23 s of retries and a message cut off mid-sentence)."""
    import os
    import subprocess
    import sys
    import time

    clip = sample_clip(tmp_path, n_frames=3, size=(64, 64), audio=False)
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"))  # an empty hub cache
    root = Path(__file__).parents[1]
    # The same imports without the hub call, timed on the same (perhaps busy) machine: the bound is
    # relative to it, so load does not fail the test while ~23 s of retries still would.
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import cli, transformers, diffusers; import p2v_fast.quality.metrics"],
                   cwd=root, env=env, check=True, timeout=300)
    baseline = time.perf_counter() - t0
    for args in (["eval", str(clip), "--source", str(clip), "--prompt", "a swan"],):
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "cli", *args], cwd=root, env=env,
                              capture_output=True, text=True, timeout=300)
        seconds = time.perf_counter() - t0
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert proc.returncode == 1 and len(lines) == 1, proc.stderr
        assert "openai/clip-vit-large-patch14" in lines[0] and lines[0].endswith("(random weights, for testing only)")
        assert seconds < 1.5 * baseline + 10, (seconds, baseline)  # imports take a few seconds; no retries


def test_ablate_with_an_uncached_clip_model_offline_fails_before_editing(clip, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = _p2v("ablate", clip, "a swan", *FAST, "--out", tmp_path / "abl", "--clip-model", "p2v-test-no-such/clip")
    msg = one_line_error(r)
    assert "'p2v-test-no-such/clip' is not in the local Hugging Face cache and offline mode" in msg
    assert "--clip-model tiny" in msg and "backend:" not in r.stderr  # before any edit


def test_raft_weights_offline_or_unreachable_fail_at_once(tmp_path, monkeypatch) -> None:
    """RAFT's weights come from download.pytorch.org into torch hub's folder: offline, or with
    the host not answering, one line at once (torchvision itself would wait without a timeout).
    The host is a closed loopback port, so nothing leaves this machine."""
    import time

    from p2v_fast.errors import ModelLoadError
    from p2v_fast.weights.hub import fetch_url_file

    url = "http://127.0.0.1:9/models/raft_large_C_T_SKHT_V2-ff5fadd5.pth"
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    t0 = time.perf_counter()
    with pytest.raises(ModelLoadError) as e:
        fetch_url_file(url, tmp_path / "checkpoints", "RAFT's weights", "use --flow dis (no weights needed)")
    assert time.perf_counter() - t0 < 5
    assert "127.0.0.1:9 cannot be reached" in str(e.value) and "--flow dis" in str(e.value)
    assert "\n" not in str(e.value)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="offline mode"):
        fetch_url_file(url, tmp_path / "checkpoints", "RAFT's weights", "use --flow dis")
    cached = tmp_path / "checkpoints" / "raft_large_C_T_SKHT_V2-ff5fadd5.pth"
    cached.write_bytes(b"weights")  # in the cache: no network needed at all
    assert fetch_url_file(url, tmp_path / "checkpoints", "RAFT's weights", "use --flow dis") == cached


# --------------------------------------------------------------------------- 11, 14, 15. what a new user sees


def test_progress_in_a_log_is_plain_lines(clip, tmp_path) -> None:
    """Not a terminal (CliRunner, a log file): plain lines when each stage starts and ends (and
    every PROGRESS_INTERVAL_S in between), no bars, no blank line before an error."""
    r = _p2v("edit", clip, "a swan", "-o", tmp_path / "o.mp4", *FAST, "--depth-norm", "clip")  # not cached yet
    assert r.exit_code == 0
    for line in ("encode + depth: started, 0/4", "inversion: 8/8 done in", "edit: started, 0/8",
                 "edit: 8/8 done in"):
        assert line in r.stderr, r.stderr
    assert "━" not in r.output
    r = _p2v("edit", tmp_path / "missing.mp4", "a swan", *FAST)
    assert r.stderr.startswith("error:")  # nothing (no empty progress block) before it


def test_log_progress_lines_at_an_interval() -> None:
    import cli

    now = [0.0]
    lines: list[str] = []
    progress = cli.LogProgress(interval=10.0, clock=lambda: now[0])
    progress._line = lines.append  # type: ignore[method-assign]
    advance = progress.stage("edit", 100)
    for _ in range(99):
        now[0] += 0.5
        advance(1)
    now[0] += 0.5
    advance(1)
    assert lines[0] == "edit: started, 0/100"  # before: "100 steps", for a total of frames or frame-steps too
    assert lines[1] == "edit: 20/100 (20%), 0:00:10 elapsed, about 0:00:40 left"
    assert len(lines) == 1 + 4 + 1 and lines[-1] == "edit: 100/100 done in 0:00:50"
    progress.stage("encode + depth", 1)(1)  # a preview's one frame: before, "started, 1 steps"
    assert lines[-2:] == ["encode + depth: started, 0/1", "encode + depth: 1/1 done in 0:00:00"]


def test_edit_json_keeps_the_full_update_numbers(clip, tmp_path) -> None:
    import json

    out = tmp_path / "o.mp4"
    r = _p2v("edit", clip, "a swan", "-o", out, *FAST, "--json", tmp_path / "o.json")
    assert r.exit_code == 0, r.output
    line = next(ln for ln in r.stderr.splitlines() if ln.startswith("guided latent update"))
    assert len(line) < 300 and "{" not in line  # one short line, not a dict of 16-digit floats
    data = json.loads((tmp_path / "o.json").read_text())
    assert data["config"]["prompt"] == "a swan" and data["n_frames"] == 4
    assert list(data["update_rms_per_step"]) == ["0"]  # 2 steps, the first guided
    assert len(data["update_rms_per_step_and_frame"]["0"]) == 3  # frames 2-4
    assert data["update_rms_per_step"]["0"] == pytest.approx(sum(data["update_rms_per_step_and_frame"]["0"]) / 3)


def test_small_things(tmp_path, tiny_dir) -> None:
    import av

    r = _p2v("--version")
    assert r.exit_code == 0 and r.stdout.startswith("p2v-fast ")
    r = _p2v("edit", "--help", env={"COLUMNS": "200"})
    assert "What to steer away from" in r.stdout  # --negative-prompt has help
    # 29.97 fps is printed as the source states it; one frame is "1 frame"
    ntsc = tmp_path / "ntsc.mp4"
    with writer.VideoWriter(ntsc, 30000 / 1001, (64, 64)) as w:
        w.write(samples.sample_frame(0, (64, 64)))
    r = _p2v("edit", ntsc, "a swan", "-o", tmp_path / "o.mp4", *FAST)
    assert r.exit_code == 0, r.output
    assert "1 frame at 64x64, 29.97 fps" in r.stdout
    # an image folder plays at --fps
    frames = samples.make_sample_frames_folder(tmp_path / "frames", 2, (64, 64))
    r = _p2v("edit", frames, "a swan", "-o", tmp_path / "f.mp4", *FAST, "--fps", "30")
    assert r.exit_code == 0, r.output
    with av.open(str(tmp_path / "f.mp4")) as c:
        assert c.streams.video[0].average_rate == 30
    # the tiny model's caption is labelled as the noise it is
    r = _p2v("edit", frames, "a swan", "-o", tmp_path / "c.mp4", *FAST[:-2])
    assert r.exit_code == 0, r.output
    assert "random weights" in r.stdout and "word salad" in r.stderr


def test_demo_threads_must_be_positive() -> None:
    assert "--threads must be >= 1" in one_line_error(_p2v("demo", "--threads", "0"))


# --------------------------------------------------------------------------- review: options refused before any work

REFUSED = [
    (["edit", "{clip}", "x", *FAST, "-o", "{tmp}/o.mp4", "--json", "{tmp}/o.mp4"], "is a file the edit writes"),
    (["edit", "{clip}", "x", *FAST, "-o", "{tmp}/o.mp4", "--json", "{tmp}/o.strip.png"], "is a file the edit writes"),
    (["edit", "{clip}", "x", *FAST, "--json", "{clip}"], "choose another --json path"),
    (["edit", "{clip}", "x", *FAST, "--threads", "2147483648"], "--threads must be at most"),
    (["edit", "{clip}", "x", *FAST, "--preview", "--side-by-side"], "--side-by-side is for a video edit"),
    (["eval", "{tmp}/e.mp4", "--source", "{clip}", "--prompt", "x", "--json", "{clip}"], "is the video"),
    (["demo", "--out", "{clip}"], "is a file, not a folder"),
    (["demo", "--frames", "0", "--out", "{tmp}/demo"], "--frames must be >= 1"),
    (["demo", "--frames", "100000000", "--out", "{tmp}/demo"], "--frames must be at most 1000"),
    (["bench", "--plan", "--frames", "0"], "--frames must be >= 1"),
    (["bench", "--plan", "--latent-update", "bogus"], "--latent-update must be one of"),
    (["bench", "--plan", "--size", "4096"], "over the limit of 2048"),
    (["bench", "--plan", "--frames", "100000000"], "--plan needs --frames from 1 to"),
    (["bench", "--plan", "--protocol", "v2v120"], "give one of them"),
    (["bench", "--model", "tiny", "--protocol", "v2v120", "--invert-dtype", "fp8"], "--invert-dtype must be one of"),
    (["bench", "--model", "tiny", "--protocol", "v2v120", "--frames", "0"], "--frames must be >= 1"),
    (["edit", "{clip}", "x", *FAST, "--max-memory", "12 apples"], "--max-memory: '12 apples' is not a size"),
    (["edit", "{clip}", "x", *FAST, "--max-memory", "10k"], "--max-memory: '10k' is below 1 MiB"),
    (["bench", "--model", "tiny", "--protocol", "v2v120", "--max-memory", "lots"], "--max-memory"),
]


@pytest.mark.parametrize(("args", "message"), REFUSED)
def test_options_that_cannot_work_are_refused_before_any_work(clip, tmp_path, args, message) -> None:
    shutil.copy(clip, tmp_path / "e.mp4")
    before = {p.name: _digest(p) for p in tmp_path.iterdir()}
    r = _p2v(*[a.format(clip=clip, tmp=tmp_path) for a in args])
    assert r.exit_code == 2, r.output
    assert message in one_line_error(r)
    assert {p.name: _digest(p) for p in tmp_path.iterdir()} == before  # nothing written, nothing replaced


def test_a_folder_frame_rate_too_small_to_write_is_refused(tmp_path) -> None:
    from p2v_fast.media.samples import make_sample_frames_folder

    folder = make_sample_frames_folder(tmp_path / "frames", n=2, size=(64, 64))
    r = _p2v("edit", folder, "x", *FAST, "--fps", "1e-10", "-o", tmp_path / "o.mp4")
    assert r.exit_code == 2 and "--fps must be a frame rate between" in one_line_error(r)


def test_tf32_inversion_off_cuda_is_refused_before_any_model_loads(clip, tmp_path, monkeypatch) -> None:
    import p2v_fast.weights.models

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(p2v_fast.weights.models, "load_models", refuse)
    r = _p2v("edit", clip, "x", *FAST, "--invert-dtype", "tf32", "-o", tmp_path / "o.mp4")
    assert r.exit_code == 2 and "--invert-dtype tf32" in one_line_error(r)
    assert not (tmp_path / "o.mp4").exists()


# --------------------------------------------------------------------------- --json: the rule for outputs (issue 27)

JSON_EXISTING = [
    ["edit", "{clip}", "x", *FAST, "-o", "{tmp}/o.mp4"],
    ["demo", "--out", "{tmp}/demo", "--frames", "2", "--size", "64", "--steps", "1"],
    ["invert", "{clip}", *FAST],
    ["batch", "{tmp}/jobs.yaml"],
    ["eval", "{clip}", "x", "-o", "{tmp}/e.mp4"],
    ["ablate", "{clip}", "x", *FAST, "--out", "{tmp}/abl"],
    ["bench", "--plan"],
    ["export", "--model", "tiny", "--format", "onnx", "--engines", "{tmp}/eng"],
    ["info"],
]


@pytest.mark.parametrize("args", JSON_EXISTING, ids=[a[0] for a in JSON_EXISTING])
def test_json_never_replaces_an_existing_file_without_overwrite(clip, tmp_path, args) -> None:
    """Before: `p2v edit --json notes.txt` replaced the notes, on every command."""
    (tmp_path / "notes.txt").write_text("my notes")
    shutil.copy(clip, tmp_path / "e.mp4")
    (tmp_path / "jobs.yaml").write_text(f"jobs: [{{input: {clip}, prompt: x, output: {tmp_path}/j.mp4}}]\n")
    before = {p.name: _digest(p) for p in tmp_path.iterdir()}
    r = _p2v(*[a.format(clip=clip, tmp=tmp_path) for a in args], "--json", tmp_path / "notes.txt")
    assert r.exit_code == 2, r.output
    assert f"--json '{tmp_path / 'notes.txt'}' exists; pass --overwrite to replace it" in one_line_error(r)
    assert {p.name: _digest(p) for p in tmp_path.iterdir()} == before  # nothing written, nothing replaced


def test_json_replaces_a_file_with_overwrite_but_never_a_video_or_a_manifest(clip, tmp_path) -> None:
    """Before: `p2v bench --json clip.mp4` replaced a video and `p2v info --engines X --json
    X/manifest.json` the manifest it had just checked."""
    import json

    (tmp_path / "notes.txt").write_text("old")
    r = _p2v("bench", "--plan", "--frames", "2", "--steps", "2", "--json", tmp_path / "notes.txt", "--overwrite")
    assert r.exit_code == 0, r.output
    assert isinstance(json.loads((tmp_path / "notes.txt").read_text()), dict)  # the plan's report
    video_copy = shutil.copy(clip, tmp_path / "clip.mp4")
    r = _p2v("bench", "--plan", "--json", video_copy)
    assert r.exit_code == 2 and "exists; pass --overwrite" in one_line_error(r)
    engines = tmp_path / "eng"
    engines.mkdir()
    (engines / "manifest.json").write_text('{"format_version": 2}')
    for args in (["info", "--engines", engines], ["bench", "--plan", "--engines", engines],
                 ["export", "--model", "tiny", "--format", "onnx", "--engines", engines]):
        for name in ("manifest.json", "summary.json"):
            r = _p2v(*args, "--json", engines / name, "--overwrite")
            assert r.exit_code == 2, r.output
            assert f"is in the engine folder '{engines}'" in one_line_error(r)
    assert (engines / "manifest.json").read_text() == '{"format_version": 2}'
    assert sorted(p.name for p in engines.iterdir()) == ["manifest.json"]


@pytest.mark.parametrize(("json_path", "message"), [
    ("jobs.yaml", "output '{tmp}/jobs.yaml' is the jobs file itself"),
    ("notes.txt", "'{tmp}/notes.txt' exists and was not made by p2v batch; delete it or set overwrite: true"),
    ("j.strip.png", "json_path '{tmp}/j.strip.png' is a file the job writes itself"),  # was "as job 1 does"
])
def test_a_jobs_json_path_is_an_output_like_the_others(clip, tmp_path, json_path, message) -> None:
    """Before: a job's json_path replaced the jobs file itself, or any existing file."""
    (tmp_path / "notes.txt").write_text("my notes")
    jobs = tmp_path / "jobs.yaml"
    jobs.write_text(f"jobs: [{{input: {clip}, prompt: x, output: j.mp4, json_path: {json_path}}}]\n")
    before = {p.name: _digest(p) for p in tmp_path.iterdir()}
    r = _p2v("batch", jobs)
    assert r.exit_code == 2, r.output
    assert message.format(tmp=tmp_path) in one_line_error(r)
    assert {p.name: _digest(p) for p in tmp_path.iterdir()} == before


def test_a_memory_budget_spent_before_the_edit_is_said(clip, tmp_path) -> None:
    """Before: `--max-memory 2MB` on the CPU ran one frame per call without a word."""
    r = _p2v("edit", clip, "x", *FAST, "--max-memory", "2MB", "-o", tmp_path / "o.mp4")
    assert r.exit_code == 0, r.output
    assert "--max-memory 2 MiB is already exceeded before the first UNet call" in r.stderr
    r = _p2v("edit", clip, "x", *FAST, "--max-memory", "1TB", "-o", tmp_path / "p.mp4")
    assert r.exit_code == 0 and "already exceeded" not in r.stderr
