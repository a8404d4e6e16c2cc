"""Damaged state is recomputed or refused in one line, never a traceback on every run (issue 27,
item 8): malformed inversion cache entries, an unwritable cache, damaged batch job records and a
corrupted tiny model."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest

from p2v_fast.config import EditConfig
from p2v_fast.errors import OutputError
from p2v_fast.method.inversion_cache import claim_entry, entry_problems
from p2v_fast.progress import NullProgress
from tests.helpers import one_line_error, sample_clip
from tests.helpers import p2v as _p2v

FAST = ["--model", "tiny", "--size", "64", "--steps", "2", "--source-prompt", "a clip"]
HW = (8, 8)


@pytest.fixture(scope="module")
def clip(tmp_path_factory, tiny_dir) -> Path:
    return sample_clip(tmp_path_factory.mktemp("clip"), n_frames=2, size=(64, 64), audio=False)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, tiny_dir, clip) -> Path:
    """One whole inversion entry of ``clip`` (2 frames at 8x8 latents), made once."""
    root = tmp_path_factory.mktemp("pristine")
    cfg = EditConfig(model="tiny", size=64, steps=2, source_prompt="a clip", cache_dir=root)
    from p2v_fast.pipeline import invert_video

    invert_video(cfg, clip)
    (entry,) = (root / "inversions").iterdir()
    return entry


def _meta(entry: Path, change) -> None:
    meta = json.loads((entry / "meta.json").read_text())
    (entry / "meta.json").write_text(json.dumps(change(meta)) if callable(change) else change)


def _frame_is_a_folder(entry: Path) -> None:
    (entry / "frame_000001.safetensors").unlink()
    (entry / "frame_000001.safetensors").mkdir()
    (entry / "frame_000001.safetensors" / "x").write_text("x")


DAMAGE = {
    "meta is a list": lambda e: _meta(e, "[]"),
    "record is a string": lambda e: _meta(e, lambda m: {**m, "files": {**m["files"], "frame_000001.safetensors": "x"}}),
    "files is a string": lambda e: _meta(e, lambda m: {**m, "files": "x"}),
    "n_frames is 1e400": lambda e: _meta(e, json.dumps({"n_frames": 1}).replace("1}", "1e400}")),
    "n_frames is a list": lambda e: _meta(e, lambda m: {**m, "n_frames": [2]}),
    "latent_hw is a string": lambda e: _meta(e, lambda m: {**m, "latent_hw": "8x8"}),
    "meta is a folder": lambda e: ((e / "meta.json").unlink(), (e / "meta.json").mkdir()),
    "frame is a folder": _frame_is_a_folder,
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_malformed_entry_is_a_damaged_entry_not_an_exception(pristine, tmp_path, damage) -> None:
    entry = tmp_path / pristine.name
    shutil.copytree(pristine, entry)
    DAMAGE[damage](entry)
    problem, _ = entry_problems(entry, 2, HW)
    assert problem is not None and problem != "missing"
    lock = claim_entry(entry, 2, HW, NullProgress())  # the damage removed: the entry is refilled
    assert lock is not None
    lock.release()
    assert not (entry / "meta.json").exists()
    assert not (entry / "frame_000001.safetensors").is_dir()


def test_an_entry_that_is_a_file_is_replaced(pristine, tmp_path) -> None:
    entry = tmp_path / pristine.name
    entry.write_text("not a folder")
    assert entry_problems(entry, 2, HW)[0] == "not a folder"
    lock = claim_entry(entry, 2, HW, NullProgress())
    assert lock is not None and entry.is_dir()
    lock.release()


def test_a_damaged_meta_is_recomputed_end_to_end(clip, pristine, own_cache) -> None:
    cache = own_cache
    shutil.copytree(pristine, cache / "inversions" / pristine.name)
    _meta(cache / "inversions" / pristine.name, lambda m: {**m, "files": "x"})
    r = _p2v("invert", clip, *FAST)
    assert r.exit_code == 0, r.output
    assert "malformed meta.json (files is 'x')" in r.output and "recomputing" in r.output
    r = _p2v("invert", clip, *FAST)
    assert r.exit_code == 0 and "cache hit" in r.output, r.output


def test_a_cache_folder_that_is_a_file_is_one_line(clip, tmp_path) -> None:
    from p2v_fast.pipeline import invert_video

    afile = tmp_path / "cache"
    afile.write_text("x")
    cfg = EditConfig(model="tiny", size=64, steps=2, source_prompt="a clip", cache_dir=afile)
    with pytest.raises(OutputError, match=r"cannot write the inversion cache under .*set P2V_CACHE"):
        invert_video(cfg, clip)


def test_a_read_only_cache_is_one_line(clip, tmp_path, monkeypatch, tiny_dir) -> None:
    """Tests run as root here, which writes anywhere: the kernel's refusal is injected."""
    cache = tmp_path / "ro"
    (cache / "models").mkdir(parents=True)
    (cache / "models" / tiny_dir.name).symlink_to(tiny_dir)
    monkeypatch.setenv("P2V_CACHE", str(cache))
    real = Path.mkdir

    def read_only(self, *a, **k):
        if str(self).startswith(str(cache / "inversions")):
            raise PermissionError(errno.EROFS, "Read-only file system", str(self))
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", read_only)
    error = one_line_error(_p2v("edit", clip, "a swan", "-o", tmp_path / "o.mp4", *FAST))
    assert "cannot write the inversion cache" in error and "Read-only file system" in error


# --------------------------------------------------------------------------- batch job records


@pytest.fixture(scope="module")
def done_batch(tmp_path_factory, tiny_dir, clip) -> Path:
    """A folder with a jobs file whose one job has run: its output and its record beside it."""
    import yaml

    root = tmp_path_factory.mktemp("batch")
    (root / "jobs.yaml").write_text(yaml.safe_dump({"jobs": [{
        "input": str(clip), "prompt": "x", "output": "o.mp4", "model": "tiny", "size": 64, "steps": 2,
        "source_prompt": "a clip"}]}))
    r = _p2v("batch", root / "jobs.yaml")
    assert r.exit_code == 0, r.output
    return root


def _record(folder: Path, **changes) -> None:
    path = folder / ".o.mp4.p2v-job.json"
    text = json.dumps({**json.loads(path.read_text()), **changes})
    path.write_text(text.replace('"frames": "INF"', '"frames": 1e400'))


@pytest.mark.parametrize("frames", ["abc", "INF", [1]])
def test_a_malformed_job_record_is_no_record(done_batch, tmp_path, monkeypatch, frames) -> None:
    from tests.helpers import no_model_loads

    no_model_loads(monkeypatch)
    shutil.copytree(done_batch, tmp_path / "b")
    _record(tmp_path / "b", frames=frames)
    r = _p2v("batch", tmp_path / "b" / "jobs.yaml")
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert r.output.startswith("error: jobs.yaml: job 1: output") and "was not made by p2v batch" in r.output


def test_an_intact_record_is_skipped_and_a_truncated_output_is_not(done_batch, tmp_path, monkeypatch) -> None:
    from tests.helpers import no_model_loads

    no_model_loads(monkeypatch)
    folder = tmp_path / "b"
    shutil.copytree(done_batch, folder)
    record = json.loads((folder / ".o.mp4.p2v-job.json").read_text())
    assert record["output"] == {"bytes": (folder / "o.mp4").stat().st_size, "sha256": record["output"]["sha256"]}
    r = _p2v("batch", folder / "jobs.yaml")
    assert r.exit_code == 0 and "skipped" in r.output, r.output
    out = folder / "o.mp4"
    out.write_bytes(out.read_bytes()[: out.stat().st_size // 2])
    r = _p2v("batch", folder / "jobs.yaml")
    assert r.exit_code == 2, r.output
    assert "(truncated or changed since); delete it or set overwrite: true" in r.output.replace("\n", " ")


# --------------------------------------------------------------------------- the tiny model's cache


def test_a_corrupted_tiny_model_is_rebuilt(tmp_path, tiny_dir) -> None:
    from p2v_fast.weights.tiny import tiny_model_dir, tiny_problem

    target = tmp_path / "models" / tiny_dir.name
    shutil.copytree(tiny_dir, target)
    assert tiny_problem(target) is None
    (weights,) = target.glob("unet/*.safetensors")
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])
    assert tiny_problem(target) == f"unet/{weights.name} damaged"
    assert tiny_model_dir(tmp_path) == target
    assert tiny_problem(target) is None and weights.read_bytes() == good  # rebuilt, the same seeded weights
    assert [p.name for p in (tmp_path / "models").iterdir()] == [tiny_dir.name]  # nothing left aside


def test_a_tiny_model_damaged_past_its_records_names_the_folder_to_delete(tmp_path, tiny_dir, monkeypatch) -> None:
    from p2v_fast.errors import ModelLoadError
    from p2v_fast.weights.models import load_models

    target = tmp_path / "models" / tiny_dir.name
    shutil.copytree(tiny_dir, target)
    info = json.loads((target / "p2v_tiny.json").read_text())
    del info["files"]  # as a set built before the records were kept
    (target / "p2v_tiny.json").write_text(json.dumps(info))
    (weights,) = target.glob("unet/*.safetensors")
    weights.write_bytes(b"garbage")
    monkeypatch.setenv("P2V_CACHE", str(tmp_path))
    with pytest.raises(ModelLoadError, match="delete that folder and p2v rebuilds it"):
        load_models("tiny")


def test_a_batch_cache_dir_that_is_a_file_is_refused_at_validation(clip, tmp_path, monkeypatch) -> None:
    import yaml

    from tests.helpers import no_model_loads

    no_model_loads(monkeypatch)
    (tmp_path / "afile").write_text("x")
    (tmp_path / "jobs.yaml").write_text(yaml.safe_dump({"jobs": [{
        "input": str(clip), "prompt": "x", "model": "tiny", "size": 64, "cache_dir": "afile"}]}))
    r = _p2v("batch", tmp_path / "jobs.yaml")
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert "job 1: cache_dir" in r.output and "is a file, not a folder" in r.output
