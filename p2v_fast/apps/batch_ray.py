"""`p2v batch --ray`: the jobs on Ray actors, one per GPU (or per N CPUs), each holding its models.

Ray is imported only here and only when a batch runs on it (the ``ray`` extra). The driver
keeps the schedule: an idle actor takes, in order, a job retried after another actor died, a
job on a clip it has worked on (its inversion is in its cache), a job on a clip no actor has
started, and, rather than idle, a job on a clip whose first job has finished elsewhere (the
inversion is on disk if the cache is shared). An actor that dies has its job retried once on
another actor; Ray restarts the dead actor once. Every job's inputs and outputs are absolute
paths that every node must be able to read and write (shared storage).

:func:`run_jobs_file` is `p2v batch` whole: the checks, then the jobs here or on Ray.

Progress: each actor runs jobs in one thread and answers ``poll`` from a second one (a threaded
actor), so the driver shows each running job's frames while it runs.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import logging
import os
import threading
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from p2v_fast.apps.batch import (
    BatchReporter,
    BatchResult,
    BatchWorker,
    Job,
    JobResult,
    NullReporter,
    check_summary_path,
    failure_message,
    load_jobs,
    run_batch,
    skipped,
    write_sidecar,
)
from p2v_fast.errors import BackendUnavailableError, InputError, P2VError, Terminated, one_line
from p2v_fast.files import write_json_atomic
from p2v_fast.media import writer
from p2v_fast.media.paths import check_report_path
from p2v_fast.text import plural

#: Variables passed from where `p2v batch` runs to its workers, when set (never tokens).
FORWARDED_ENV = ("P2V_CACHE", "HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                 "TOKENIZERS_PARALLELISM")
MAX_ATTEMPTS = 2  # a job whose actor died is retried once
#: Ray's switch for its token authentication ("token", the default of a new local cluster since
#: Ray 2.59, or "disabled").
RAY_AUTH_MODE = "RAY_AUTH_MODE"


class RayWorker:
    """The actor: one :class:`BatchWorker` (models loaded once) and its running job's progress."""

    def __init__(self, threads: int | None = None) -> None:
        if threads:
            import torch

            torch.set_num_threads(threads)
        self.worker = BatchWorker()
        # Ray may call `run` on either of its two threads; the edits all run on this one thread
        # (CUDA graphs and other per-thread state of a compiled UNet stay valid across jobs).
        self._edit_thread = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="p2v-edit")
        self._lock = threading.Lock()
        self._state: tuple[int, str, float] | None = None
        self._logs: list[tuple[int, str]] = []

    def describe(self) -> str:
        import ray

        gpus = ray.get_gpu_ids()
        return self.worker.name + (f" (GPU {','.join(map(str, gpus))})" if gpus else "")

    def pid(self) -> int:
        return os.getpid()

    def run(self, job: Job, attempt: int) -> tuple[JobResult, list[tuple[int, str]]]:
        """The job's result, and its log lines that no poll has taken yet."""
        def on_progress(stage: str, frames: float) -> None:
            with self._lock:
                self._state = (job.index, stage, frames)

        def on_log(message: str) -> None:
            with self._lock:
                self._logs.append((job.index, message))

        try:
            result = self._edit_thread.submit(self.worker.run, job, on_progress, on_log, attempt).result()
        finally:
            with self._lock:
                self._state = None
        return result, self.poll()[1]

    def poll(self) -> tuple[tuple[int, str, float] | None, list[tuple[int, str]]]:
        """The running job's (index, stage, frames) and the log lines since the last poll."""
        with self._lock:
            logs, self._logs = self._logs, []
            return self._state, logs


@dataclass
class _Pending:
    job: Job
    attempt: int = 1
    avoid: int | None = None  # the actor this job's last attempt died on


class ClipScheduler:
    """Which pending job an idle actor takes next (see the module docstring)."""

    def __init__(self, jobs: list[Job]) -> None:
        self.pending = [_Pending(j) for j in jobs]
        self.owner: dict[str, int] = {}  # clip -> the actor that took its first job
        self.finished: set[str] = set()  # clips with a finished job (their inversion is on disk)

    def assign(self, idle: list[int], alive: set[int]) -> list[tuple[int, _Pending]]:
        """Jobs for the ``idle`` actors (``alive``: every actor that is up, idle or busy). Each
        rule is tried for every idle actor before the next rule, so a clip's owner gets its
        clip's jobs before another actor would take one."""
        rules = (
            lambda a, p: p.attempt > 1 and (p.avoid != a or not alive - {a}),  # a retry: elsewhere if possible
            lambda a, p: p.attempt == 1 and self.owner.get(p.job.clip) == a,  # its own clip: cache hit
            lambda a, p: p.attempt == 1 and p.job.clip not in self.owner,  # a clip nobody has started
            lambda a, p: p.attempt == 1 and p.job.clip in self.finished,  # rather than idle: an inverted clip
        )
        free, out = list(idle), []
        for rule in rules:
            for a in list(free):
                p = next((p for p in self.pending if rule(a, p)), None)
                if p is not None:
                    self.pending.remove(p)
                    self.owner.setdefault(p.job.clip, a)
                    free.remove(a)
                    out.append((a, p))
        return out

    def retry(self, job: Job, attempt: int, avoid: int) -> None:
        self.pending.insert(0, _Pending(job, attempt, avoid))

    def done(self, job: Job) -> None:
        self.finished.add(job.clip)

    def release(self, actor: int) -> None:
        """``actor`` died: its clips are free for the others."""
        self.owner = {c: a for c, a in self.owner.items() if a != actor}


def worker_env() -> dict[str, str]:
    return {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}


def check_local_auth(environ: typing.Mapping[str, str] = os.environ) -> None:
    """Refuse to start a local Ray without its token authentication (Ray 2.59+ turns it on for a
    new local cluster unless ``RAY_AUTH_MODE`` says otherwise): a cluster without it runs code
    for any client that reaches its ports."""
    mode = environ.get(RAY_AUTH_MODE)
    if mode is not None and mode.strip().lower() != "token":
        raise InputError(f"{RAY_AUTH_MODE}={mode} turns off Ray's token authentication; p2v batch --ray does not "
                         f"start a local Ray without it (unset {RAY_AUTH_MODE} or set it to 'token')")


@contextlib.contextmanager
def _loopback_node() -> typing.Iterator[None]:
    """While a local Ray starts: its node takes 127.0.0.1, so its GCS server, raylet, workers and
    driver listen on the loopback only. Ray turns ``_node_ip_address="127.0.0.1"`` into the
    machine's own address, and with that every process listens on every interface (measured with
    ``ss -ltnp``, Ray 2.60); it keeps the loopback where clusters are off, its switch
    ``ray_constants.ENABLE_RAY_CLUSTER`` (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER``), read when the
    node's address is chosen."""
    from ray._private import ray_constants

    before = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before


@contextlib.contextmanager
def _no_token_notice() -> typing.Iterator[None]:
    """Without Ray's warning that it turned token authentication on for a new local cluster: p2v
    insists on it (:func:`check_local_auth`), so the line only interrupted the batch's output.
    (Setting ``RAY_AUTH_MODE=token`` instead, which silences it too, made the GCS fail to start
    when Ray had been imported before: its configuration is read at import.)"""
    log = logging.getLogger("ray._private.authentication.authentication_token_setup")

    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Token authentication is enabled")

    log.addFilter(keep)
    try:
        yield
    finally:
        log.removeFilter(keep)


def connect(address: str | None) -> bool:
    """Join the cluster at ``address`` or start a local Ray (token-authenticated, on the loopback
    address); False if Ray was already up."""
    import ray

    if ray.is_initialized():
        return False
    if not address:
        check_local_auth()
    try:
        quiet: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.WARNING}
        if address:
            ray.init(address=address, **quiet)
        else:
            with _loopback_node(), _no_token_notice():
                ray.init(include_dashboard=False, **quiet)
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = f"the Ray cluster at {address!r}" if address else "a local Ray"
        first = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise BackendUnavailableError(f"cannot start or reach {where}: {first}") from None
    return True


def actor_resources(cpus_per_worker: int | None, workers: int | None) -> tuple[dict[str, Any], int]:
    """Ray options for one actor, and how many actors to start (``workers`` or all that fit)."""
    import ray

    res = ray.cluster_resources()
    if cpus_per_worker is not None:
        if cpus_per_worker < 1:
            raise InputError(f"--ray-cpus-per-worker must be >= 1; got {cpus_per_worker}")
        fit, what = int(res.get("CPU", 0) // cpus_per_worker), plural(int(res.get("CPU", 0)), "CPU")
        options: dict[str, Any] = {"num_cpus": cpus_per_worker, "num_gpus": 0}
    else:
        fit = int(res.get("GPU", 0))
        what = plural(fit, "GPU")
        if fit == 0:
            raise InputError("the Ray cluster has no GPUs; pass --ray-cpus-per-worker N to run on CPUs")
        options = {"num_gpus": 1}
    if workers is not None and not 1 <= workers <= fit:
        raise InputError(f"--workers {workers}: the Ray cluster has room for 1 to {plural(fit, 'worker')} ({what})")
    return options, workers or fit


def check_devices(jobs: list[Job], cpus_per_worker: int | None) -> None:
    """A GPU worker sees its one GPU as ``cuda``; a CPU worker sees none."""
    ok = ("auto", "cpu") if cpus_per_worker else ("auto", "cuda", "cuda:0")
    bad = [j for j in jobs if j.cfg.device not in ok]
    if bad:
        kind = "CPU workers (--ray-cpus-per-worker)" if cpus_per_worker else "each Ray worker sees one GPU"
        raise InputError(f"job {bad[0].index}: device {bad[0].cfg.device!r} does not fit the Ray workers ({kind}); "
                         f"use {' or '.join(ok)}")


def _clean_after_death(job: Job) -> JobResult | None:
    """A dead actor's job: remove its partial files; the result if its output was already
    complete (finished just before the actor died), else None (to be retried)."""
    for out in job.paths.all:
        writer.partial_path(out).unlink(missing_ok=True)
    if job.output.exists() and not job.output_existed:
        result = JobResult.of(job, "done", "finished before its worker died", frames=job.n_frames)
        try:
            write_sidecar(job, result)
        except (OSError, P2VError) as exc:  # the output is done; a rerun will ask before redoing it
            result.detail += f"; job record not written ({failure_message(exc)})"
        return result
    sbs = job.paths.side_by_side
    if sbs is not None and sbs.exists() and not job.options.get("overwrite"):
        sbs.unlink()  # written by the dead attempt (a new one would refuse to replace it)
    return None


def run_batch_ray(jobs: list[Job], reporter: BatchReporter | None = None, *, address: str | None = None,
                  workers: int | None = None, cpus_per_worker: int | None = None, poll_s: float = 0.5,
                  start_timeout_s: float = 600.0) -> BatchResult:
    """Run ``jobs`` on Ray actors; see the module docstring."""
    try:
        import ray
    except ImportError:
        raise BackendUnavailableError("--ray needs Ray: pip install 'p2v-fast[ray]'") from None

    reporter = reporter or NullReporter()
    t0 = time.perf_counter()
    results = {j.index: skipped(j) for j in jobs if j.done}
    todo = [j for j in jobs if not j.done]
    check_devices(todo, cpus_per_worker)
    reporter.start(jobs)
    if not todo:
        return BatchResult([results[j.index] for j in jobs], time.perf_counter() - t0)
    started = connect(address)
    actors: dict[int, Any] = {}
    names: dict[int, str] = {}
    busy: dict[int, tuple[Job, int]] = {}
    interrupted = terminated = False
    try:
        options, n = actor_resources(cpus_per_worker, workers)
        env = worker_env()
        actor_cls = ray.remote(RayWorker).options(
            **options, max_concurrency=2, max_restarts=1, runtime_env={"env_vars": env} if env else None)
        actors = {i: actor_cls.remote(cpus_per_worker) for i in range(min(n, len(todo)))}
        each = plural(cpus_per_worker, "CPU") if cpus_per_worker else "1 GPU"
        res = ray.cluster_resources()
        reporter.log(f"Ray: {plural(len(actors), 'worker')} ({each} each); the cluster has "
                     f"{plural(round(res.get('CPU', 0)), 'CPU')}, {plural(round(res.get('GPU', 0)), 'GPU')}")
        _Driver(actors, names, busy, results, reporter, poll_s, start_timeout_s).run(todo)
    except KeyboardInterrupt as exc:
        interrupted, terminated = True, isinstance(exc, Terminated)
        for aid in list(actors):
            with contextlib.suppress(Exception):
                ray.kill(actors[aid], no_restart=True)
        for job, _ in busy.values():  # its output, if it was complete before the actor stopped, is kept
            results[job.index] = _clean_after_death(job) or JobResult.of(
                job, "interrupted", "interrupted; finished inversion frames are kept in the cache")
    finally:
        for actor in actors.values():
            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)
        if started:
            ray.shutdown()
    for j in todo:
        results.setdefault(j.index, JobResult.of(j, "not run", "interrupted before it started"))
    return BatchResult([results[j.index] for j in jobs], time.perf_counter() - t0, sorted(names.values()),
                       interrupted, terminated)


class _Driver:
    """The driver's loop: hand jobs to idle actors, collect results, poll progress, retry."""

    def __init__(self, actors: dict[int, Any], names: dict[int, str], busy: dict[int, tuple[Job, int]],
                 results: dict[int, JobResult], reporter: BatchReporter, poll_s: float, start_timeout_s: float):
        self.actors, self.names, self.busy, self.results = actors, names, busy, results
        self.reporter, self.poll_s, self.start_timeout_s = reporter, poll_s, start_timeout_s
        self.idle: set[int] = set()
        self.dead: dict[int, str] = {}

    def run(self, todo: list[Job]) -> None:
        import ray

        sched = ClipScheduler(todo)
        starting = {a.describe.remote(): aid for aid, a in self.actors.items()}
        running: dict[Any, int] = {}  # run ref -> actor
        polls: dict[Any, int] = {}
        last_poll = 0.0
        waiting_since = time.monotonic()
        while sched.pending or running:
            alive = self.idle | set(self.busy)
            for aid, p in sched.assign(sorted(self.idle), alive):
                self.idle.discard(aid)
                self.busy[aid] = (p.job, p.attempt)
                running[self.actors[aid].run.remote(p.job, p.attempt)] = aid
                self.reporter.job_started(p.job, self.names[aid])
            if alive or not starting:
                waiting_since = time.monotonic()
            if sched.pending and not running and not self.idle and (
                    not starting or time.monotonic() - waiting_since > self.start_timeout_s):
                why = "; ".join(sorted(set(self.dead.values()))) or (
                    f"none became ready within {self.start_timeout_s:.0f} s (is the cluster busy?)")
                for p in sched.pending:
                    self.results[p.job.index] = JobResult.of(p.job, "failed", f"no Ray worker left: {why}",
                                                             attempts=p.attempt - 1)
                    self.reporter.job_finished(p.job, self.results[p.job.index])
                return
            if time.monotonic() - last_poll >= self.poll_s:
                last_poll = time.monotonic()
                for aid in set(self.busy) - set(polls.values()):
                    polls[self.actors[aid].poll.remote()] = aid
            refs = [*running, *starting, *polls]
            if not refs:  # nothing in flight (cannot last: an idle actor takes any job then)
                time.sleep(self.poll_s)
                continue
            ready, _ = ray.wait(refs, num_returns=1, timeout=self.poll_s)
            if ready:
                ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
            for ref in ready:
                if ref in starting:
                    self._started(starting.pop(ref), ref)
                elif ref in polls:
                    self._polled(polls.pop(ref), ref)
                else:
                    aid = running.pop(ref)
                    restart = self._finished(aid, ref, sched)
                    if restart:
                        starting[self.actors[aid].describe.remote()] = aid

    def _started(self, aid: int, ref: Any) -> None:
        import ray
        from ray.exceptions import RayError

        try:
            self.names[aid] = ray.get(ref)
            self.idle.add(aid)
            self.dead.pop(aid, None)
        except RayError as e:
            self.dead[aid] = f"a worker could not start ({one_line(e)})"
            self.reporter.log(f"Ray worker {aid} is gone: {one_line(e)}")

    def _polled(self, aid: int, ref: Any) -> None:
        import ray
        from ray.exceptions import RayError

        try:
            state, logs = ray.get(ref)
        except RayError:
            return  # the actor died; its run call says so
        for index, message in logs:
            self.reporter.log(f"job {index}: {message}")
        current = self.busy.get(aid)
        if state is not None and current is not None and current[0].index == state[0]:
            self.reporter.job_progress(current[0], state[1], state[2])

    def _finished(self, aid: int, ref: Any, sched: ClipScheduler) -> bool:
        """Handle a finished run call; True if the actor died (and Ray may restart it)."""
        import ray
        from ray.exceptions import RayActorError, RayError

        job, attempt = self.busy.pop(aid)
        try:
            result, logs = ray.get(ref)
            for index, message in logs:
                self.reporter.log(f"job {index}: {message}")
        except RayActorError as e:
            sched.release(aid)
            name = self.names.get(aid, f"worker {aid}")
            self.dead[aid] = f"worker {name} died"
            result = _clean_after_death(job)
            if result is None and attempt < MAX_ATTEMPTS:
                self.reporter.log(f"job {job.index}: worker {name} died ({one_line(e)}); retrying on another worker")
                sched.retry(job, attempt + 1, aid)
                return True
            result = result or JobResult.of(job, "failed", f"its worker died on each of {plural(attempt, 'attempt')} "
                                                              f"(last: {name})", worker=name, attempts=attempt)
            self._record(job, result, sched)
            return True
        except RayError as e:
            result = JobResult.of(job, "failed", one_line(e), worker=self.names.get(aid), attempts=attempt)
        self.idle.add(aid)
        self._record(job, result, sched)
        return False

    def _record(self, job: Job, result: JobResult, sched: ClipScheduler) -> None:
        self.results[job.index] = result
        sched.done(job)
        self.reporter.job_finished(job, result)


def _own_summary(path: Path, jobs_file: Path) -> bool:
    """Whether ``path`` is the summary an earlier ``p2v batch --json`` wrote for this jobs file (a
    rerun replaces it without --overwrite, as it skips the jobs that are done)."""
    try:
        if not path.is_file() or path.stat().st_size > 64 * 2**20:
            return False
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("jobs_file") == str(jobs_file.resolve()) and "jobs" in data


def run_jobs_file(jobs_file: str | Path, *, json_path: str | Path | None = None, overwrite: bool = False,
                  ray: bool = False,
                  ray_address: str | None = None, ray_cpus_per_worker: int | None = None, workers: int | None = None,
                  display: Callable[[], typing.ContextManager[BatchReporter]] | None = None) -> BatchResult:
    """`p2v batch`: check the options and the whole jobs file (and ``json_path``) before any work,
    run the jobs here or on Ray (``ray``, implied by ``ray_address`` or ``ray_cpus_per_worker``),
    and write the summary to ``json_path`` (an existing file only with ``overwrite``). ``display``
    makes the reporter once the checks pass (so a bad file prints no progress block)."""
    ray = ray or ray_address is not None or ray_cpus_per_worker is not None
    if workers is not None and not ray:
        raise InputError("--workers needs --ray (without Ray the jobs run one after another in this process)")
    if ray_cpus_per_worker is not None and ray_cpus_per_worker < 1:
        raise InputError(f"--ray-cpus-per-worker must be >= 1; got {ray_cpus_per_worker}")
    check_report_path(json_path, Path(jobs_file), what="jobs file", overwrite=True)  # a file, not the jobs file
    jobs = load_jobs(jobs_file, local=not ray)
    if json_path is not None:
        check_summary_path(json_path, jobs_file, jobs)
        check_report_path(json_path, overwrite=overwrite or _own_summary(Path(json_path), Path(jobs_file)))
    with (display or (lambda: contextlib.nullcontext(NullReporter())))() as reporter:
        if ray:
            result = run_batch_ray(jobs, reporter, address=ray_address, workers=workers,
                                   cpus_per_worker=ray_cpus_per_worker)
        else:
            result = run_batch(jobs, reporter)
    if json_path is not None:
        write_json_atomic(Path(json_path), {"jobs_file": str(Path(jobs_file).resolve()), **result.to_dict()})
    return result
