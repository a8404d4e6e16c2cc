"""`p2v batch` in one process: the jobs file, one inversion per clip, resuming, failures.

The Ray runs are in tests/test_batch_ray.py.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest

from p2v_fast.media import reader, samples
from tests.helpers import no_model_loads, write_jobs
from tests.helpers import p2v as _p2v


@pytest.fixture(scope="module")
def clips(tmp_path_factory, tiny_dir) -> Path:
    """``a.mp4`` (3 frames) and ``frames/`` (2 images) in one folder."""
    root = tmp_path_factory.mktemp("clips")
    samples.make_sample_clip(root / "a.mp4", n_frames=3, size=(64, 64), with_audio=False)
    samples.make_sample_frames_folder(root / "frames", n=2, size=(96, 64))
    return root


def test_every_edit_option_is_a_job_key() -> None:
    """The keys come from EditConfig and edit_video: an option `p2v edit` gains is accepted (but
    its click context and --dry-run, which runs nothing)."""
    from cli import edit
    from p2v_fast.apps.batch import job_key_types

    keys = job_key_types()
    assert set(inspect.signature(edit).parameters) - {"ctx", "dry_run"} <= set(keys)
    assert {"progress", "runtime"}.isdisjoint(keys)


def test_three_jobs_one_inversion_per_clip_then_nothing_recomputed(clips, tmp_path, monkeypatch) -> None:
    src = clips / "a.mp4"
    jobs = write_jobs(clips, [
        {"input": "a.mp4", "prompt": "a watercolor painting"},
        {"input": "a.mp4", "prompt": "an oil painting"},
        {"input": "frames", "prompt": "a pencil sketch", "latent_update": "detached"},
    ], {"source_prompt": "batch test one"}, name="three.yaml")
    summary = tmp_path / "summary.json"
    before = src.read_bytes()
    import p2v_fast.nets.runtime
    import p2v_fast.pipeline

    loads = []
    load_runtime = p2v_fast.nets.runtime.load_runtime
    for module in (p2v_fast.nets.runtime, p2v_fast.pipeline):
        monkeypatch.setattr(module, "load_runtime", lambda cfg: loads.append(cfg) or load_runtime(cfg))
    r = _p2v("batch", jobs, "--json", summary)
    assert r.exit_code == 0, r.output
    outs = [clips / "a.p2v.a-watercolor-painting.mp4", clips / "a.p2v.an-oil-painting.mp4", clips / "frames.p2v.mp4"]
    rows = json.loads(summary.read_text())["jobs"]
    assert [row["status"] for row in rows] == ["done"] * 3
    assert [Path(row["output"]) for row in rows] == outs
    assert [reader.probe(o).n_frames for o in outs] == [3, 3, 2]
    assert sorted(row["inversion"] for row in rows[:2]) == ["cache hit", "inverted"]  # one inversion of a.mp4
    assert rows[2]["inversion"] == "inverted"
    assert len({row["worker"] for row in rows}) == 1
    assert len(loads) == 1  # one model set for the three jobs (latent_update detached included)
    assert src.read_bytes() == before
    assert not list(clips.glob(".*partial*"))

    # The same command again: every output is complete, so nothing runs (no model is loaded).
    stamps = [(o.stat().st_mtime_ns, o.read_bytes()) for o in outs]
    no_model_loads(monkeypatch)
    r = _p2v("batch", jobs, "--json", summary)
    assert r.exit_code == 0, r.output
    assert "3 of 3 jobs already done" in r.output
    assert [row["status"] for row in json.loads(summary.read_text())["jobs"]] == ["skipped"] * 3
    assert [(o.stat().st_mtime_ns, o.read_bytes()) for o in outs] == stamps
    monkeypatch.undo()

    # An output deleted to be remade: its strip (made by this batch) is replaced, not refused.
    outs[2].unlink()
    r = _p2v("batch", jobs, "--json", summary)
    assert r.exit_code == 0, r.output
    assert [row["status"] for row in json.loads(summary.read_text())["jobs"]] == ["skipped", "skipped", "done"]
    assert outs[2].exists() and not list(clips.glob(".*partial*"))


def test_changed_settings_are_refused_until_overwrite(clips, tmp_path) -> None:
    jobs = write_jobs(tmp_path, [{"input": str(clips / "a.mp4"), "prompt": "a swan", "output": "out/swan.mp4",
                                  "max_frames": 1}], {"source_prompt": "batch test two"})
    assert _p2v("batch", jobs).exit_code == 0
    out = tmp_path / "out" / "swan.mp4"  # the folder was created
    made = out.read_bytes()
    jobs = write_jobs(tmp_path, [{"input": str(clips / "a.mp4"), "prompt": "a swan", "output": "out/swan.mp4",
                                  "max_frames": 1, "seed": 7}], {"source_prompt": "batch test two"})
    r = _p2v("batch", jobs)
    assert r.exit_code == 2
    assert "error:" in r.output and "seed: 0, now 7" in r.output and "overwrite: true" in r.output
    assert out.read_bytes() == made
    jobs = write_jobs(tmp_path, [{"input": str(clips / "a.mp4"), "prompt": "a swan", "output": "out/swan.mp4",
                                  "max_frames": 1, "seed": 7, "overwrite": True}], {"source_prompt": "batch test two"})
    r = _p2v("batch", jobs)
    assert r.exit_code == 0, r.output
    assert "1 done" in r.output
    r = _p2v("batch", jobs)  # overwrite redoes an output made elsewhere, never this job's own
    assert r.exit_code == 0 and "1 skipped" in r.output


def test_a_bad_job_is_reported_and_the_others_finish(clips, tmp_path) -> None:
    empty_model = tmp_path / "not-a-model"
    empty_model.mkdir()
    jobs = write_jobs(tmp_path, [
        {"input": str(clips / "a.mp4"), "prompt": "a red car", "output": "good1.mp4"},
        {"input": str(clips / "a.mp4"), "prompt": "a blue car", "output": "bad.mp4", "model": "not-a-model"},
        {"input": str(clips / "frames"), "prompt": "a green car", "output": "good2.mp4"},
    ], {"source_prompt": "batch test three", "max_frames": 2})
    summary = tmp_path / "s.json"
    r = _p2v("batch", jobs, "--json", summary)
    assert r.exit_code == 1, r.output
    rows = json.loads(summary.read_text())["jobs"]
    assert [row["status"] for row in rows] == ["done", "failed", "done"]
    assert "not-a-model" in rows[1]["detail"]
    assert "failed" in r.output and "Traceback" not in r.output
    assert (tmp_path / "good1.mp4").exists() and (tmp_path / "good2.mp4").exists()
    assert not (tmp_path / "bad.mp4").exists() and not list(tmp_path.glob(".*partial*"))


def test_the_whole_file_is_validated_before_any_work(clips, tmp_path, monkeypatch) -> None:
    no_model_loads(monkeypatch)
    jobs = write_jobs(tmp_path, [
        {"input": str(clips / "a.mp4"), "prompt": "fine", "output": "ok.mp4"},
        {"input": str(clips / "a.mp4"), "promt": "typo"},
        {"input": "missing.mp4", "prompt": "x"},
        {"input": str(clips / "a.mp4"), "prompt": "one", "output": "same.mp4"},
        {"input": str(clips / "frames"), "prompt": "two", "output": "same.mp4"},
        {"input": str(clips / "a.mp4"), "prompt": "y", "steps": "four"},
        {"input": str(clips / "a.mp4"), "prompt": "z", "output": str(clips / "a.mp4")},
    ])
    r = _p2v("batch", jobs)
    assert r.exit_code == 2
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert all(ln.startswith("error: jobs.yaml: job ") for ln in lines), r.output
    assert [ln.split(":")[2].strip() for ln in lines] == ["job 2", "job 3", "job 5", "job 6", "job 7"]
    text = " ".join(lines)
    assert "unknown key 'promt' (did you mean 'prompt'?)" in text
    assert "does not exist" in text and "as job 4 does" in text and "steps must be an integer" in text
    assert "is an input of this batch" in text
    assert "Traceback" not in r.output
    assert not list(tmp_path.glob("*.mp4"))


@pytest.mark.parametrize(("text", "message"), [
    ("jobs: []", "'jobs' must be a non-empty list"),
    ("jobs: [{input: CLIP, prompt: x}]\nextra: 1", "unknown top-level key 'extra'"),
    ("jobs: [{input: CLIP, prompt: x}", "not valid YAML"),
    ("defaults: {sizes: 64}\njobs: [{input: CLIP, prompt: x}]", "defaults: unknown key 'sizes'"),
])
def test_a_malformed_jobs_file_is_one_line(clips, tmp_path, monkeypatch, text, message) -> None:
    no_model_loads(monkeypatch)
    path = tmp_path / "jobs.yaml"
    path.write_text(text.replace("CLIP", str(clips / "a.mp4")))
    r = _p2v("batch", path)
    assert r.exit_code == 2
    assert r.output.startswith("error:") and message in r.output and "Traceback" not in r.output
    assert len([ln for ln in r.output.splitlines() if ln.strip()]) == 1, r.output


@pytest.mark.parametrize(("jobs", "message"), [
    ([{"output": "out.txt"}], "a video output must end in .mp4"),
    ([{"preview": True, "output": "p.mp4"}], "--preview writes a PNG image"),
    ([{"input": "frames", "output": "frames/o.mp4"}], "inside the input image folder"),
    ([{"fps": 10}], "--fps is for an image-folder input"),
    ([{"output": "a" * 250 + ".mp4"}], "too long for the file system"),
    ([{"output": "x.mkv", "side_by_side": True}, {"output": "x.side-by-side.mkv"}], "as job 1 does"),
    ([{"output": "y.mp4"}, {"output": "y.strip.png"}], "as job 1 does"),
    ([{"output": "j1.mp4", "json_path": "r.json"}, {"output": "j2.mp4", "json_path": "r.json"}], "as job 1 does"),
    ([{"json_path": 5}], "json_path must be a path"),
])
def test_each_job_is_checked_as_p2v_edit_checks_it(clips, monkeypatch, jobs, message) -> None:
    """What `p2v edit` would refuse before loading a model, validation refuses for every job:
    the file names it writes (side-by-side, strip, JSON report included) and the input's options."""
    no_model_loads(monkeypatch)
    full = [{"input": "a.mp4", "prompt": f"p{i}", **j} for i, j in enumerate(jobs)]
    r = _p2v("batch", write_jobs(clips, full, name="checks.yaml"))
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: checks.yaml: job "), r.output
    assert message in r.output.replace("\n", " ")


def test_yaml_off_is_the_option_value_and_json_path_is_relative(clips, tmp_path, monkeypatch) -> None:
    from p2v_fast.apps.batch import load_jobs

    no_model_loads(monkeypatch)
    path = tmp_path / "jobs.yaml"
    path.write_text(f"jobs:\n  - {{input: {clips / 'a.mp4'}, prompt: x, model: tiny, size: 64, latent_update: off, "
                    "json_path: r.json, output: o.mp4}\n")
    (job,) = load_jobs(path)
    assert job.cfg.latent_update == "off" and job.options["json_path"] == tmp_path / "r.json"


@pytest.mark.parametrize("target", ["jobs", "input", "output"])
def test_the_summary_never_replaces_the_jobs_file_an_input_or_an_output(clips, tmp_path, monkeypatch,
                                                                        target) -> None:
    no_model_loads(monkeypatch)
    jobs = write_jobs(tmp_path, [{"input": str(clips / "a.mp4"), "prompt": "x", "output": "o.mp4"}])
    path = {"jobs": jobs, "input": clips / "a.mp4", "output": tmp_path / "o.mp4"}[target]
    before = path.read_bytes() if path.exists() else None
    r = _p2v("batch", jobs, "--json", path)
    assert r.exit_code == 2 and r.output.startswith("error: --json"), r.output
    assert (path.read_bytes() if path.exists() else None) == before


def test_json_jobs_file_and_missing_file(clips, tmp_path, monkeypatch) -> None:
    from p2v_fast.apps.batch import load_jobs

    no_model_loads(monkeypatch)
    path = tmp_path / "jobs.json"
    path.write_text(json.dumps({"jobs": [{"input": str(clips / "a.mp4"), "prompt": "x", "preview": True,
                                          "size": 64, "engines": "eng"}]}))
    (job,) = load_jobs(path)
    assert job.n_frames == 1 and job.output == clips / "a.p2v-preview.png"
    assert job.cfg.engines == tmp_path / "eng"  # paths are relative to the jobs file
    r = _p2v("batch", tmp_path / "nope.yaml")
    assert r.exit_code == 2 and "does not exist" in r.output


def test_clip_scheduler_keeps_a_clip_on_its_actor() -> None:
    """Jobs on one clip go to the actor that took its first job; another actor takes one only
    once that first job has finished (its inversion is on disk), and a retry goes elsewhere."""
    from p2v_fast.apps.batch_ray import ClipScheduler

    class J:
        def __init__(self, index: int, clip: str) -> None:
            self.index, self.clip = index, clip

    a1, a2, b1 = J(1, "a"), J(2, "a"), J(3, "b")
    s = ClipScheduler([a1, a2, b1])  # type: ignore[list-item]
    got = {a: p.job.index for a, p in s.assign([0, 1], {0, 1})}
    assert got == {0: 1, 1: 3}
    s.done(b1)  # type: ignore[arg-type]
    assert s.assign([1], {0, 1}) == []  # a's first job still runs on actor 0: wait, do not invert twice
    s.retry(a1, 2, avoid=0)  # type: ignore[arg-type]
    s.release(0)
    assert [(a, p.job.index, p.attempt) for a, p in s.assign([0, 1], {0, 1})] == [(1, 1, 2)]
    s.done(a1)  # type: ignore[arg-type]
    assert [(a, p.job.index) for a, p in s.assign([0], {0, 1})] == [(0, 2)]
