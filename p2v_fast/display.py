"""Progress on a console: rich bars on a terminal, plain lines at an interval in a log.

Implementations of :class:`p2v_fast.progress.Progress` and :class:`p2v_fast.apps.batch.BatchReporter`
that draw on a :class:`rich.console.Console` (the CLI passes its stderr console).
:func:`progress_for` and :func:`batch_display` choose by whether the console is a terminal.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from p2v_fast.text import clock, plural

#: Seconds between progress lines when the console is not a terminal (a log file, CI).
PROGRESS_INTERVAL_S = 10.0


class RichProgress:
    """Progress on a terminal: rich bars with ETA, shown from the first stage on (a run that
    fails before any stage prints no empty bar block)."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.bars = Progress(
            TextColumn("[bold]{task.description:<16}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self.started = False

    def stage(self, description: str, total: int | None) -> Callable[[int], None]:
        if not self.started:
            self.bars.start()
            self.started = True
        task = self.bars.add_task(escape(description), total=total)

        def advance(n: int = 1) -> None:
            self.bars.advance(task, n)

        return advance

    def log(self, message: str) -> None:
        style = "yellow" if message.startswith("warning:") else "dim"
        self.console.print(escape(message), style=style, highlight=False, soft_wrap=True)

    def __enter__(self) -> RichProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.started:
            self.bars.stop()


class LogProgress:
    """Progress when the console is not a terminal (a log file, a pipe, CI): plain lines, one
    when a stage starts, then one every :data:`PROGRESS_INTERVAL_S` seconds at most (done/total,
    elapsed, time left), and one when it ends."""

    def __init__(self, interval: float | None = None, clock: Callable[[], float] = time.monotonic,
                 console: Console | None = None) -> None:
        self.interval = PROGRESS_INTERVAL_S if interval is None else interval
        self.clock = clock
        self.console = console or Console(stderr=True)

    def _line(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)

    def stage(self, description: str, total: int | None) -> Callable[[int], None]:
        t0 = self.clock()
        state = {"done": 0, "shown": t0}
        self._line(f"{description}: started" + (f", 0/{total}" if total else ""))  # the units vary: frames, steps...

        def advance(n: int = 1) -> None:
            state["done"] += n
            done, now = state["done"], self.clock()
            if total and done >= total:
                if done - n < total:
                    self._line(f"{description}: {done}/{total} done in {clock(now - t0)}")
                return
            if now - state["shown"] < self.interval:
                return
            state["shown"] = now
            if total:
                left = (now - t0) * (total - done) / max(done, 1)
                self._line(f"{description}: {done}/{total} ({100 * done // total}%), {clock(now - t0)} elapsed, "
                           f"about {clock(left)} left")
            else:
                self._line(f"{description}: {done} done, {clock(now - t0)} elapsed")

        return advance

    def log(self, message: str) -> None:
        self._line(message)

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def progress_for(console: Console) -> RichProgress | LogProgress:
    """Bars on a terminal, plain lines at an interval otherwise (so a log shows progress too)."""
    return RichProgress(console) if console.is_terminal else LogProgress(console=console)


class RichBatchReporter:
    """A batch on a terminal: the jobs overall (ETA from frames edited per second) and a bar per
    running job."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.credit: dict[int, float] = {}  # job -> frames counted as done overall
        self.tasks: dict[int, Any] = {}
        self.finished = 0

    def start(self, jobs: list) -> None:
        todo = [j for j in jobs if not j.done]
        self.n_todo = len(todo)
        if len(jobs) > len(todo):
            self.log(f"{len(jobs) - len(todo)} of {plural(len(jobs), 'job')} already done (outputs complete): skipped")
        self.overall = self.progress.add_task(f"jobs 0/{len(todo)}", total=max(sum(j.n_frames for j in todo), 1),
                                              visible=bool(todo))

    def job_started(self, job, worker: str) -> None:
        self.log(f"job {job.index} ({job.label}) on {worker}")
        if job.index in self.tasks:
            self.progress.remove_task(self.tasks.pop(job.index))
        self.credit[job.index] = 0.0
        self.tasks[job.index] = self.progress.add_task(f"  job {job.index} starting", total=job.n_frames)
        self._overall()

    def job_progress(self, job, stage: str, frames: float) -> None:
        if job.index in self.tasks:
            self.progress.update(self.tasks[job.index], description=f"  job {job.index} {stage}", completed=frames)
        if stage == "edit":
            self.credit[job.index] = frames
            self._overall()

    def job_finished(self, job, result) -> None:
        if job.index in self.tasks:
            self.progress.remove_task(self.tasks.pop(job.index))
        self.credit[job.index] = job.n_frames
        self.finished += 1
        style = "green" if result.status == "done" else "red"
        self.progress.console.print(f"[{style}]job {job.index} {result.status}[/{style}] in {result.seconds:.1f} s: "
                                    f"{escape(result.output if result.status == 'done' else result.detail)}",
                                    highlight=False, soft_wrap=True)
        self._overall()

    def log(self, message: str) -> None:
        self.progress.console.print(f"[dim]{escape(message)}[/dim]", highlight=False, soft_wrap=True)

    def _overall(self) -> None:
        self.progress.update(self.overall, description=f"jobs {self.finished}/{self.n_todo}",
                             completed=sum(self.credit.values()))


class LogBatchReporter:
    """A batch in a log (the console not a terminal): a line when a job starts and ends, and for
    a running job one every :data:`PROGRESS_INTERVAL_S` seconds at most."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, console: Console | None = None) -> None:
        self.clock = clock
        self.console = console or Console(stderr=True)
        self.shown: dict[int, float] = {}

    def start(self, jobs: list) -> None:
        todo = [j for j in jobs if not j.done]
        if len(jobs) > len(todo):
            self.log(f"{len(jobs) - len(todo)} of {plural(len(jobs), 'job')} already done (outputs complete): skipped")
        self.log(f"{plural(len(todo), 'job')} to run, {plural(sum(j.n_frames for j in todo), 'frame')}")

    def job_started(self, job, worker: str) -> None:
        self.shown[job.index] = self.clock()
        self.log(f"job {job.index} ({job.label}) on {worker}")

    def job_progress(self, job, stage: str, frames: float) -> None:
        now = self.clock()
        if now - self.shown.get(job.index, now) >= PROGRESS_INTERVAL_S:
            self.shown[job.index] = now
            self.log(f"job {job.index} {stage}: {frames:.0f}/{plural(job.n_frames, 'frame')}")

    def job_finished(self, job, result) -> None:
        what = result.output if result.status == "done" else result.detail
        self.log(f"job {job.index} {result.status} in {result.seconds:.1f} s: {what}")

    def log(self, message: str) -> None:
        self.console.print(message, markup=False, highlight=False, soft_wrap=True)


@contextlib.contextmanager
def batch_display(console: Console) -> Iterator[RichBatchReporter | LogBatchReporter]:
    """The batch reporter for ``console``: bars on a terminal (shown while the block runs), lines
    otherwise."""
    if not console.is_terminal:
        yield LogBatchReporter(console=console)
        return
    bars = Progress(TextColumn("[bold]{task.description:<22}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("frames"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                    console=console)
    with bars:
        yield RichBatchReporter(bars)
