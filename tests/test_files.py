"""p2v_fast/files.py: lock files are never followed through links."""

from __future__ import annotations

from pathlib import Path

import pytest

from p2v_fast.errors import OutputError
from p2v_fast.files import FileLock, OutputClaim


@pytest.mark.parametrize("dangling", [True, False])
def test_a_lock_file_that_is_a_link_is_refused_and_its_target_untouched(tmp_path: Path, dangling: bool) -> None:
    target = tmp_path / "elsewhere" / "target"
    target.parent.mkdir()
    if not dangling:
        target.write_text("keep")
    lock = tmp_path / ".lock"
    lock.symlink_to(target)
    with pytest.raises(OutputError, match="is a symbolic link"):
        FileLock(lock).acquire()
    assert target.exists() != dangling  # a dangling link's target is not created
    if not dangling:
        assert target.read_text() == "keep"
    assert lock.is_symlink()


def test_an_output_claim_lock_that_is_a_link_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "made-by-p2v"
    (tmp_path / ".out.mp4.lock").symlink_to(target)
    with pytest.raises(OutputError, match="symbolic link"):
        OutputClaim(tmp_path / "out.mp4").acquire(overwrite=False)
    assert not target.exists()


def test_a_plain_lock_is_taken_and_released(tmp_path: Path) -> None:
    claim = OutputClaim(tmp_path / "out.mp4").acquire(overwrite=False)
    assert (tmp_path / ".out.mp4.lock").is_file()
    claim.release()
    assert not (tmp_path / ".out.mp4.lock").exists()
