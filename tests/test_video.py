"""Video/image-folder probing, streaming reads, atomic H.264+AAC writing (PyAV, CPU only)."""

from __future__ import annotations

import inspect
import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from p2v_fast.errors import InputError
from p2v_fast.media.framing import side_by_side, working_size
from p2v_fast.media.reader import VideoInfo, probe, read_frames, selected_count
from p2v_fast.media.samples import make_sample_clip, make_sample_frames_folder, sample_frame
from p2v_fast.media.writer import VideoWriter, save_png

N, SIZE, FPS = 24, (256, 192), 12.0


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One sample clip per container, written once for the whole module."""
    d = tmp_path_factory.mktemp("clips")
    out = {
        "mp4": make_sample_clip(d / "s.mp4", N, SIZE, FPS),
        "mov": make_sample_clip(d / "s.mov", N, SIZE, FPS),
        "mkv": make_sample_clip(d / "s.mkv", N, SIZE, FPS),
        "gif": make_sample_clip(d / "s.gif", N, SIZE, FPS, with_audio=False),
        "silent": make_sample_clip(d / "silent.mp4", N, SIZE, FPS, with_audio=False),
        "long": make_sample_clip(d / "long.mp4", 60, SIZE, FPS),  # 5 s
        "folder": make_sample_frames_folder(d / "frames", 12, SIZE),
    }
    try:
        out["webm"] = make_sample_clip(d / "s.webm", N, SIZE, FPS)
    except InputError:
        pass  # this PyAV build has no VP9/VP8 or Opus encoder
    return out


def streams(path: Path) -> dict[str, float]:
    """Duration in seconds of each stream type in ``path``."""
    with av.open(str(path)) as c:
        return {s.type: float(s.duration * s.time_base) for s in c.streams}


# --------------------------------------------------------------------------- probe


@pytest.mark.parametrize(
    ("kind", "fps", "audio"),
    [
        ("mp4", 12.0, True),
        ("mov", 12.0, True),
        ("mkv", 12.0, True),
        ("webm", 12.0, True),
        ("gif", 12.5, False),
        ("silent", 12.0, False),
    ],
)
def test_probe_containers(clips: dict[str, Path], kind: str, fps: float, audio: bool) -> None:
    if kind not in clips:
        pytest.skip(f"no encoder for {kind}")
    info = probe(clips[kind])
    assert (info.width, info.height, info.n_frames) == (*SIZE, N)
    assert info.fps == pytest.approx(fps)  # gif delays are whole centiseconds: 8 cs
    assert info.has_audio is audio and not info.is_folder
    frames = list(read_frames(clips[kind]))
    assert len(frames) == N
    err = np.mean([np.abs(f.astype(int) - sample_frame(i)).mean() for i, f in enumerate(frames)])
    assert err < (20 if kind == "gif" else 8)  # gif: 3-3-2 bit palette


def test_probe_folder_natural_sort(clips: dict[str, Path]) -> None:
    info = probe(clips["folder"])
    assert info == VideoInfo(clips["folder"], *SIZE, 24.0, 12, False, True)
    assert probe(clips["folder"], folder_fps=30).fps == 30.0
    frames = list(read_frames(clips["folder"]))
    # frame_10.png must come after frame_9.png, and PNG is lossless
    for i in (1, 9, 11):
        np.testing.assert_array_equal(frames[i], sample_frame(i, SIZE))


def test_probe_rotated_video(tmp_path: Path) -> None:
    path = tmp_path / "phone.mp4"
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=12)
        s.width, s.height, s.pix_fmt = 256, 192, "yuv420p"
        s.set_display_rotation(-90)  # what phones write for portrait video
        for i in range(3):
            f = av.VideoFrame.from_ndarray(sample_frame(i), format="rgb24")
            f.pts = i
            c.mux(s.encode(f))
        c.mux(s.encode(None))
    info = probe(path)
    assert (info.width, info.height, info.n_frames) == (192, 256, 3)
    first = next(read_frames(path))
    assert first.shape == (256, 192, 3)
    assert np.abs(first.astype(int) - np.rot90(sample_frame(0), -1)).mean() < 8


def test_bad_inputs(tmp_path: Path, clips: dict[str, Path]) -> None:
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n" * 20)
    noise = tmp_path / "noise.mov"
    noise.write_bytes(np.random.default_rng(0).bytes(4096))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    cases = {
        tmp_path / "missing.mp4": "does not exist",
        text: "not a readable video",
        noise: "not a readable video",
        empty: "no .png",
    }
    for path, words in cases.items():
        with pytest.raises(InputError, match=words) as e:
            probe(path)
        assert str(path) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(InputError, match=r"start frame 30 .*24 frames"):
        read_frames(clips["mp4"], start=30)  # raised at call time, not at first next()


def test_zero_frame_video(tmp_path: Path) -> None:
    path = tmp_path / "zero.mkv"
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=12)
        s.width, s.height, s.pix_fmt = 64, 64, "yuv420p"
        c.start_encoding()
    with pytest.raises(InputError, match=r"zero\.mkv"):
        probe(path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read anything")
def test_unreadable_file(tmp_path: Path, clips: dict[str, Path]) -> None:
    path = tmp_path / "locked.mp4"
    path.write_bytes(clips["mp4"].read_bytes())
    path.chmod(0)
    with pytest.raises(InputError, match="permission"):
        probe(path)


# --------------------------------------------------------------------------- sizes & selection


def test_working_size() -> None:
    assert working_size(1920, 1080) == (896, 512)
    assert working_size(1080, 1920) == (512, 896)
    assert working_size(640, 480) == (704, 512)
    assert working_size(512, 512) == (512, 512)
    assert working_size(3000, 100, short_side=64) == (1920, 64)
    assert working_size(100, 90, short_side=768) == (832, 768)
    for bad in (500, 0, -64):
        with pytest.raises(InputError, match=str(bad)):
            working_size(1920, 1080, short_side=bad)
    with pytest.raises(InputError, match="0x1080"):
        working_size(0, 1080)


def test_selected_count(clips: dict[str, Path]) -> None:
    info = probe(clips["mp4"])
    assert selected_count(info) == 24
    assert selected_count(info, start=5, stride=2) == 10  # 5, 7, ..., 23
    assert selected_count(info, start=5, stride=2, max_frames=3) == 3
    assert selected_count(info, start=23) == 1
    for kwargs, words in [
        ({"start": 24}, "start frame 24"),
        ({"stride": 0}, "stride"),
        ({"start": -1}, "-1"),
        ({"max_frames": 0}, "max frames"),
    ]:
        with pytest.raises(InputError, match=words):
            selected_count(info, **kwargs)


def test_read_frames_selection_and_resize(clips: dict[str, Path]) -> None:
    gen = read_frames(clips["mp4"], start=3, stride=4, max_frames=4)
    assert inspect.isgenerator(gen)  # streaming, nothing decoded yet
    everything = list(read_frames(clips["mp4"]))
    picked = list(gen)
    assert len(picked) == 4
    for got, i in zip(picked, (3, 7, 11, 15), strict=True):
        np.testing.assert_array_equal(got, everything[i])
    assert len(list(read_frames(clips["mp4"], start=20, stride=3))) == 2  # 20, 23

    square = next(read_frames(clips["mp4"], size=(128, 128)))
    assert square.shape == (128, 128, 3) and square.dtype == np.uint8
    # cover + centre crop: 256x192 -> 171x128, middle 128 columns
    centre = everything[0][:, 32:224]
    assert np.abs(square.astype(int)[::8, ::8] - centre[::12, ::12][:16, :16]).mean() < 40
    wide = next(read_frames(clips["folder"], size=(320, 128)))
    assert wide.shape == (128, 320, 3)


# --------------------------------------------------------------------------- writing


def test_writer_round_trip_with_audio_window(tmp_path: Path, clips: dict[str, Path]) -> None:
    out = tmp_path / "out" / "edit.mp4"  # missing folder is created
    fps = 30000 / 1001
    with VideoWriter(out, fps, SIZE, audio_source=clips["long"], audio_start=1.5, audio_duration=2.0) as w:
        for f in read_frames(clips["long"], max_frames=90 // 4):
            for _ in range(4):
                w.write(f)  # 88 frames = 2.94 s of video, audio window is 2.0 s
    info = probe(out)
    assert (info.width, info.height, info.n_frames, info.has_audio) == (*SIZE, 88, True)
    assert Fraction(info.fps).limit_denominator(1001) == Fraction(30000, 1001)
    dur = streams(out)
    assert dur["video"] == pytest.approx(88 / fps, abs=0.01)
    assert dur["audio"] == pytest.approx(2.0, abs=0.05)
    assert sorted(os.listdir(out.parent)) == ["edit.mp4"]


def test_writer_audio_clipped_to_video_and_absent_without_source(tmp_path: Path, clips: dict[str, Path]) -> None:
    frames = list(read_frames(clips["long"], max_frames=30))  # 2.5 s at 12 fps
    cases = [
        ("all.mp4", clips["long"], 2.5),
        ("none.mp4", None, None),
        ("silent.mp4", clips["silent"], None),
        ("folder.mp4", clips["folder"], None),
    ]
    for name, source, audio_s in cases:
        with VideoWriter(tmp_path / name, FPS, SIZE, audio_source=source) as w:
            for f in frames:
                w.write(f)
        dur = streams(tmp_path / name)
        assert dur["video"] == pytest.approx(2.5, abs=0.01)
        if audio_s is None:
            assert "audio" not in dur
        else:
            assert dur["audio"] == pytest.approx(audio_s, abs=0.05)
        got = list(read_frames(tmp_path / name))
        assert len(got) == 30 and np.abs(got[7].astype(int) - frames[7]).mean() < 6


def test_writer_is_atomic(tmp_path: Path, clips: dict[str, Path]) -> None:
    out = tmp_path / "result.mp4"
    frame = sample_frame(0)
    with (
        pytest.raises(RuntimeError, match="boom"),
        VideoWriter(out, FPS, SIZE, audio_source=clips["mp4"]) as w,
    ):
        for _ in range(60):  # enough for x264 to emit packets and the file to exist
            w.write(frame)
        assert (tmp_path / ".result.partial.mp4").exists() and not out.exists()
        raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []

    out.write_bytes(b"previous result")
    with pytest.raises(ValueError, match="shape"), VideoWriter(out, FPS, SIZE) as w:
        w.write(frame[:100])  # wrong size
    assert out.read_bytes() == b"previous result"  # an old file is never clobbered
    assert sorted(os.listdir(tmp_path)) == ["result.mp4"]


def test_writer_bad_arguments(tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(InputError, match="a_file"):
        VideoWriter(blocker / "out.mp4", FPS, SIZE)  # parent "folder" is a file
    with pytest.raises(InputError, match="255x192"):
        VideoWriter(tmp_path / "o.mp4", FPS, (255, 192))
    with pytest.raises(InputError, match="fps"):
        VideoWriter(tmp_path / "o.mp4", 0, SIZE)


def test_save_png_and_side_by_side(tmp_path: Path) -> None:
    a, b = sample_frame(0, (64, 48)), sample_frame(1, (32, 24))
    both = side_by_side(a, b)
    assert both.shape == (48, 128, 3) and both.dtype == np.uint8
    np.testing.assert_array_equal(both[:, :64], a)
    path = save_png(tmp_path / "pair.png", both)
    assert os.listdir(tmp_path) == ["pair.png"]
    folder_info = probe(tmp_path)
    assert (folder_info.width, folder_info.height, folder_info.n_frames) == (128, 48, 1)
    np.testing.assert_array_equal(next(read_frames(tmp_path)), both)
    assert path == tmp_path / "pair.png"


# --------------------------------------------------------------------------- timing, containers


def test_output_timing_constant_and_variable(tmp_path: Path, clips: dict[str, Path]) -> None:
    from p2v_fast.media.reader import output_timing

    info = probe(clips["mp4"])
    t = output_timing(info, start=3, count=5, stride=2)
    assert (t.fps, t.start, t.duration, t.frame_times) == (6.0, pytest.approx(0.25), pytest.approx(10 / 12), None)
    folder = output_timing(probe(clips["folder"], folder_fps=30), start=0, count=4)
    assert (folder.fps, folder.start, folder.duration) == (30, 0, pytest.approx(4 / 30))

    vfr = tmp_path / "vfr.mkv"
    times = [0.0, 0.05, 0.1, 0.3, 0.5, 0.7, 0.75]
    with av.open(str(vfr), "w") as c:
        s = c.add_stream("libx264", rate=10)
        s.width, s.height, s.pix_fmt = 64, 64, "yuv420p"
        s.codec_context.time_base = Fraction(1, 1000)
        for i, ts in enumerate(times):
            f = av.VideoFrame.from_ndarray(sample_frame(i, (64, 64)), format="rgb24").reformat(format="yuv420p")
            f.pts, f.time_base = round(ts * 1000), Fraction(1, 1000)
            c.mux(s.encode(f))
        c.mux(s.encode(None))
    t = output_timing(probe(vfr), start=1, count=3, stride=2)  # frames 1, 3, 5
    assert t.variable and t.start == pytest.approx(0.05)
    # to where frame 7 would start: frame 6 (0.75 s) plus a mean frame (0.75 / 6 s)
    assert t.frame_times == pytest.approx((0.0, 0.25, 0.65)) and t.duration == pytest.approx(0.825)


def test_writer_refuses_unknown_extensions(tmp_path: Path) -> None:
    for name in ("x.txt", "x", "x.gif", "x.avi"):
        with pytest.raises(InputError, match=r"must end in \.mp4, \.m4v, \.mov, \.mkv, \.webm"):
            VideoWriter(tmp_path / name, FPS, SIZE)
    assert os.listdir(tmp_path) == []


def test_working_size_limit() -> None:
    assert working_size(1920, 1080, 1152) == (2048, 1152)
    with pytest.raises(InputError, match=r"3648x2048 \(--size 2048\) is over the limit of 2048.*largest --size that "
                                         r"fits this 1920x1080 source is 1152"):
        working_size(1920, 1080, 2048)
    with pytest.raises(InputError, match="no --size fits"):
        working_size(16, 1000, 64)


def test_media_is_split_by_concept() -> None:
    """Framing geometry, reading, writing and sample clips are four modules (once one file of 924
    lines), each importing only the ones below it: framing <- reader <- writer <- samples."""
    import ast

    media = Path(__file__).resolve().parents[1] / "p2v_fast" / "media"
    order = ["framing", "reader", "writer", "samples"]
    for i, name in enumerate(order):
        tree = ast.parse((media / f"{name}.py").read_text(encoding="utf-8"))
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        above = {f"p2v_fast.media.{m}" for m in order[i + 1:]} | {"p2v_fast.media.video"}
        assert not imported & above, (name, imported & above)
        assert len((media / f"{name}.py").read_text(encoding="utf-8").splitlines()) < 450, name
    framing = ast.parse((media / "framing.py").read_text(encoding="utf-8"))
    assert not [n for n in ast.walk(framing) if isinstance(n, ast.Import) and any(a.name == "av" for a in n.names)]
    assert not (media / "video.py").exists()
