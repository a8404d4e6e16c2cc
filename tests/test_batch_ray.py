"""`p2v batch --ray` on a local Ray of 2 CPUs started here (2 workers of 1 CPU each).

One Ray session serves the module (starting Ray and its workers costs seconds on 2 cores).
Ray is the ``ray`` extra; CI installs it, so these tests run there.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from pathlib import Path

import pytest

from p2v_fast.media import reader, samples, writer
from tests.helpers import p2v, write_jobs

ray = pytest.importorskip("ray", reason="Ray is the 'ray' extra: pip install -e '.[ray]'")
RAY = {"cpus_per_worker": 1, "workers": 2, "poll_s": 0.1}


@pytest.fixture(scope="module")
def ray_session(p2v_cache, tiny_dir):
    """A local Ray with 2 CPUs, no dashboard, a small object store; shut down after the module.
    Started after P2V_CACHE is set, so its workers find the tiny model in the test cache."""
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, object_store_memory=80 * 2**20,
             log_to_driver=False, logging_level=logging.WARNING)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def clips(tmp_path_factory, tiny_dir) -> Path:
    root = tmp_path_factory.mktemp("ray-clips")
    samples.make_sample_clip(root / "a.mp4", n_frames=3, size=(64, 64), with_audio=False)
    samples.make_sample_clip(root / "b.mp4", n_frames=2, size=(64, 64), with_audio=False)
    samples.make_sample_clip(root / "long.mp4", n_frames=16, size=(64, 64), with_audio=True)
    return root


def _three_jobs(folder: Path, clips: Path) -> Path:
    """Two prompts on a.mp4, one on b.mp4; an inversion cache of the folder's own."""
    folder.mkdir()
    return write_jobs(folder, [
        {"input": str(clips / "a.mp4"), "prompt": "a watercolor painting", "output": "a_water.mp4"},
        {"input": str(clips / "a.mp4"), "prompt": "an oil painting", "output": "a_oil.mp4"},
        {"input": str(clips / "b.mp4"), "prompt": "a pencil sketch", "output": "b_sketch.mp4",
         "latent_update": "detached"},
    ], {"source_prompt": "a ray test", "cache_dir": "cache"})


def test_ray_gives_the_same_frames_as_one_process(ray_session, clips, tmp_path, one_torch_thread) -> None:
    """Two Ray workers: the raw frames (before encoding) equal those of an in-process run, the
    two jobs on a.mp4 run on one worker with one inversion, and a rerun starts nothing."""
    from p2v_fast.apps.batch import load_jobs, run_batch
    from p2v_fast.apps.batch_ray import run_batch_ray

    local = run_batch(load_jobs(_three_jobs(tmp_path / "local", clips)))
    remote = run_batch_ray(load_jobs(_three_jobs(tmp_path / "ray", clips)), **RAY)
    assert [r.status for r in local.results] == [r.status for r in remote.results] == ["done"] * 3
    assert [r.frames_sha256 for r in remote.results] == [r.frames_sha256 for r in local.results]
    assert len({r.frames_sha256 for r in local.results}) == 3
    # (Raw frames, not the mp4s: libx264 once gave two bitstreams for equal frames on this
    # loaded machine, 6985 and 6993 bytes; encoding is not what this test is about.)
    rows = remote.results
    assert len(remote.workers) == 2 and len({r.worker for r in rows}) == 2
    assert rows[0].worker == rows[1].worker  # one clip, one worker: its cache
    assert sorted(r.inversion or "" for r in rows[:2]) == ["cache hit", "inverted"]
    assert len(list((tmp_path / "ray" / "cache" / "inversions").iterdir())) == 2

    again = run_batch_ray(load_jobs(tmp_path / "ray" / "jobs.yaml"), **RAY)
    assert [r.status for r in again.results] == ["skipped"] * 3 and again.workers == []


class KillMidWrite:
    """A batch reporter that SIGKILLs the worker running job ``index`` while that job's output
    is being written (its partial file exists), as a crash or a lost node would. PyAV creates
    the file at the first packet: with audio in the clip that is after ~1 s of video."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.killed: str | None = None
        self.lines: list[str] = []
        self.stop = threading.Event()
        self.partial_at_retry: bool | None = None

    def start(self, jobs) -> None:
        pass

    def job_started(self, job, worker: str) -> None:
        self.lines.append(f"job {job.index} on {worker}")
        if job.index == self.index and self.killed is not None:  # the retry: the dead attempt's file is gone
            self.partial_at_retry = writer.partial_path(job.output).exists()
        if job.index == self.index and self.killed is None:
            pid = int(worker.split(":")[1].split()[0])
            threading.Thread(target=self._watch, args=(writer.partial_path(job.output), pid), daemon=True).start()

    def _watch(self, partial: Path, pid: int) -> None:
        while not self.stop.wait(0.005):
            if partial.exists():
                os.kill(pid, signal.SIGKILL)
                self.killed = str(pid)
                return

    def job_progress(self, job, stage: str, frames: float) -> None:
        pass

    def job_finished(self, job, result) -> None:
        self.lines.append(f"job {job.index} {result.status}")
        if job.index == self.index:
            self.stop.set()

    def log(self, message: str) -> None:
        self.lines.append(message)


def test_a_killed_worker_has_its_job_retried_elsewhere(ray_session, clips, tmp_path) -> None:
    from p2v_fast.apps.batch import load_jobs, sidecar_path
    from p2v_fast.apps.batch_ray import run_batch_ray

    jobs = write_jobs(tmp_path, [
        {"input": str(clips / "long.mp4"), "prompt": "a long edit", "output": "long.mp4"},
        {"input": str(clips / "b.mp4"), "prompt": "a short edit", "output": "short.mp4"},
    ], {"source_prompt": "a kill test"})
    reporter = KillMidWrite(1)
    result = run_batch_ray(load_jobs(jobs), reporter, **RAY)
    assert reporter.killed, reporter.lines
    long, short = result.results
    assert (long.status, long.attempts, short.status) == ("done", 2, "done"), reporter.lines
    assert reporter.killed not in (long.worker or "")
    assert any("died" in line and "retrying" in line for line in reporter.lines)
    assert reporter.partial_at_retry is False
    assert reader.probe(tmp_path / "long.mp4").n_frames == 16
    assert sidecar_path(tmp_path / "long.mp4").exists()
    assert not list(tmp_path.glob(".*partial*"))


def test_a_bad_job_on_ray_is_reported_and_the_others_finish(ray_session, clips, tmp_path) -> None:
    (tmp_path / "not-a-model").mkdir()
    jobs = write_jobs(tmp_path, [
        {"input": str(clips / "a.mp4"), "prompt": "good", "output": "good.mp4"},
        {"input": str(clips / "b.mp4"), "prompt": "bad", "output": "bad.mp4", "model": "not-a-model"},
        {"input": str(clips / "b.mp4"), "prompt": "also good", "output": "good2.mp4"},
    ], {"source_prompt": "a bad-job test", "max_frames": 2})
    summary = tmp_path / "s.json"
    r = p2v("batch", str(jobs), "--ray-cpus-per-worker", "1", "--workers", "2",
            "--json", str(summary), catch_exceptions=False)
    assert r.exit_code == 1, r.output
    rows = json.loads(summary.read_text())["jobs"]
    assert [row["status"] for row in rows] == ["done", "failed", "done"]
    assert "not-a-model" in rows[1]["detail"] and "Traceback" not in r.output
    assert (tmp_path / "good.mp4").exists() and (tmp_path / "good2.mp4").exists()
    assert not (tmp_path / "bad.mp4").exists()


@pytest.mark.parametrize(("args", "device", "message"), [
    (["--ray"], "auto", "the Ray cluster has no GPUs; pass --ray-cpus-per-worker"),
    (["--ray-cpus-per-worker", "1", "--workers", "3"], "auto", "room for 1 to 2 workers (2 CPUs)"),
    (["--ray-cpus-per-worker", "1"], "cuda:1", "device 'cuda:1' does not fit the Ray workers"),
])
def test_ray_worker_options_that_cannot_fit_are_one_line(ray_session, clips, tmp_path, args, device, message) -> None:
    jobs = write_jobs(tmp_path, [{"input": str(clips / "b.mp4"), "prompt": "x", "device": device}])
    r = p2v("batch", str(jobs), *args, catch_exceptions=False)
    assert r.exit_code == 2 and message in r.output.replace("\n", " ") and "Traceback" not in r.output
    assert not list(clips.glob("b.p2v*"))  # where the job's default output would be
