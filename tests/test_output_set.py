"""What is kept is what is said (issue 27, item 6): the files of an edit (video, side-by-side,
strip, JSON report) are written under temporary names and renamed together at the end; a full disk
or an interrupt at any point before leaves none of them, and a failure while renaming undoes the
renames (a replaced file is put back)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from tests.helpers import one_line_error, p2v, sample_clip

FAST = ["--model", "tiny", "--size", "64", "--steps", "2", "--source-prompt", "a clip"]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def clip(tmp_path_factory, tiny_dir) -> Path:
    return sample_clip(tmp_path_factory.mktemp("clip"), n_frames=2, size=(64, 64), audio=False)


def _edit(clip: Path, folder: Path, *extra: str):
    return p2v("edit", clip, "a swan", "-o", folder / "o.mp4", "--side-by-side", "--json", folder / "o.json",
               *FAST, *extra)


def test_a_full_disk_while_the_strip_is_written_keeps_nothing(clip, tmp_path, monkeypatch) -> None:
    import p2v_fast.files as files

    real = files._write_fd

    def full(fd, data):
        if bytes(data[:8]) == PNG:  # the strip: after both videos are complete
            os.close(fd)
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, data)

    monkeypatch.setattr(files, "_write_fd", full)
    msg = one_line_error(_edit(clip, tmp_path))
    assert "no space left" in msg and "nothing partial was kept" in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # as said: no video, side-by-side or temporary
    monkeypatch.setattr(files, "_write_fd", real)
    r = _edit(clip, tmp_path)  # the rerun is not refused as an existing output
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.json", "o.mp4", "o.side-by-side.mp4", "o.strip.png"]


@pytest.mark.parametrize("signal", [KeyboardInterrupt, "SIGTERM"])
def test_an_interrupt_after_the_last_frame_keeps_nothing(clip, tmp_path, monkeypatch, signal) -> None:
    """Ctrl-C or SIGTERM after `edit: N/N done`, while the report is written (the videos and the
    strip are finished by then)."""
    import p2v_fast.files as files
    from p2v_fast.errors import Terminated

    real = files.write_json_atomic

    def interrupted(path, obj):
        raise KeyboardInterrupt if signal is KeyboardInterrupt else Terminated()

    monkeypatch.setattr(files, "write_json_atomic", interrupted)
    r = _edit(clip, tmp_path)
    assert r.exit_code == (130 if signal is KeyboardInterrupt else 143)
    assert "no partial output was kept" in one_line_error(r)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    monkeypatch.setattr(files, "write_json_atomic", real)


def test_a_failed_rename_undoes_the_others_and_puts_replaced_files_back(tmp_path, monkeypatch) -> None:
    from p2v_fast.files import OutputSet

    old = tmp_path / "a.mp4"
    old.write_text("the user's earlier result")
    outputs = OutputSet()
    for name in ("a.mp4", "b.png", "c.json"):
        outputs.stage(tmp_path / name).write_text(f"new {name}")
    real, calls = os.replace, []

    def flaky(src, dst):
        calls.append(dst)
        if Path(dst).name == "c.json":
            raise KeyboardInterrupt  # between the renames
        real(src, dst)

    monkeypatch.setattr(os, "replace", flaky)
    with pytest.raises(KeyboardInterrupt):
        outputs.commit()
    monkeypatch.setattr(os, "replace", real)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mp4"]  # no new file, no temporary, no backup
    assert old.read_text() == "the user's earlier result"


def test_a_commit_renames_every_file_and_leaves_nothing_else(tmp_path) -> None:
    from p2v_fast.files import OutputSet

    (tmp_path / "a.mp4").write_text("old")
    with OutputSet() as outputs:
        for name in ("a.mp4", "b.png"):
            outputs.stage(tmp_path / name).write_text(f"new {name}")
        assert outputs.commit() == [tmp_path / "a.mp4", tmp_path / "b.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mp4", "b.png"]
    assert (tmp_path / "a.mp4").read_text() == "new a.mp4"
    with OutputSet() as outputs:  # never committed: nothing but the earlier files
        outputs.stage(tmp_path / "c.png").write_text("x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mp4", "b.png"]
