"""`p2v`: edit a video from a text prompt with Pix2Video (SD2-depth), fast.

The CLI only parses options, calls one library function and renders its result. Every
:class:`~p2v_fast.errors.P2VError` becomes one ``error:`` line and a non-zero exit.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from typer.core import TyperGroup

try:  # typer >= 0.20 carries its own copy of click
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover - older typer on click
    from click import exceptions as click_errors  # type: ignore[no-redef]


class _Group(TyperGroup):
    """The app's command group: usage errors from the option parser (a missing argument, an
    unknown option, a value of the wrong type) are one ``error:`` line, like every other error."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["standalone_mode"] = False
        try:
            rv = super().main(*args, **kwargs)
        except click_errors.NoArgsIsHelpError as exc:  # bare `p2v`: the help text
            exc.show()
            sys.exit(exc.exit_code)
        except click_errors.UsageError as exc:
            where = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
            console.print(f"[bold red]error:[/bold red] {escape(exc.format_message())}{escape(where)}",
                          highlight=False, soft_wrap=True)
            sys.exit(exc.exit_code)
        except click_errors.ClickException as exc:
            console.print(f"[bold red]error:[/bold red] {escape(exc.format_message())}", highlight=False,
                          soft_wrap=True)
            sys.exit(exc.exit_code)
        except typer.Abort:
            console.print("[bold red]error:[/bold red] aborted", highlight=False)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(
    name="p2v",
    cls=_Group,
    help="Edit a video from a text prompt with Pix2Video on Stable Diffusion 2 depth.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
out_console = Console()

#: Seconds between progress lines when stderr is not a terminal (a log file, CI).
PROGRESS_INTERVAL_S = 10.0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("p2v-fast")
    except PackageNotFoundError:
        from p2v_fast import __version__

        return __version__


def _print_version(value: bool) -> None:
    if value:
        out_console.print(f"p2v-fast {_version()}", highlight=False)
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Edit a video from a text prompt with Pix2Video on Stable Diffusion 2 depth."""


class RichProgress:
    """p2v_fast.progress.Progress on a terminal: rich bars with ETA, shown from the first stage
    on (a run that fails before any stage prints no empty bar block)."""

    def __init__(self) -> None:
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
        console.print(escape(message), style=style, highlight=False, soft_wrap=True)

    def __enter__(self) -> RichProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.started:
            self.bars.stop()


def _clock(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class LogProgress:
    """p2v_fast.progress.Progress when stderr is not a terminal (a log file, a pipe, CI): plain
    lines, one when a stage starts, then one every :data:`PROGRESS_INTERVAL_S` seconds at most
    (done/total, elapsed, time left), and one when it ends."""

    def __init__(self, interval: float | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = PROGRESS_INTERVAL_S if interval is None else interval
        self.clock = clock

    def _line(self, text: str) -> None:
        console.print(text, markup=False, highlight=False, soft_wrap=True)

    def stage(self, description: str, total: int | None) -> Callable[[int], None]:
        t0 = self.clock()
        state = {"done": 0, "shown": t0}
        self._line(f"{description}: started" + (f", {total} steps" if total else ""))

        def advance(n: int = 1) -> None:
            state["done"] += n
            done, now = state["done"], self.clock()
            if total and done >= total:
                if done - n < total:
                    self._line(f"{description}: {done}/{total} done in {_clock(now - t0)}")
                return
            if now - state["shown"] < self.interval:
                return
            state["shown"] = now
            if total:
                left = (now - t0) * (total - done) / max(done, 1)
                self._line(f"{description}: {done}/{total} ({100 * done // total}%), {_clock(now - t0)} elapsed, "
                           f"about {_clock(left)} left")
            else:
                self._line(f"{description}: {done} done, {_clock(now - t0)} elapsed")

        return advance

    def log(self, message: str) -> None:
        self._line(message)

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def _progress() -> RichProgress | LogProgress:
    """Bars on a terminal, plain lines at an interval otherwise (so a log shows progress too)."""
    return RichProgress() if console.is_terminal else LogProgress()


def _on_sigterm(signum: int, frame: Any) -> None:
    from p2v_fast.errors import Terminated

    raise Terminated()


def _error(message: str, code: int) -> typer.Exit:
    console.print(f"[bold red]error:[/bold red] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn library errors (and Ctrl-C, SIGTERM) into one line and an exit code, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from p2v_fast.errors import P2VError

        try:
            return fn(*args, **kwargs)
        except P2VError as exc:
            raise _error(str(exc), exc.exit_code) from None
        except KeyboardInterrupt as exc:
            from p2v_fast.errors import Terminated

            what, code = ("terminated (SIGTERM)", 143) if isinstance(exc, Terminated) else ("interrupted", 130)
            raise _error(f"{what}; no partial output was kept, finished inversion frames are kept in the cache",
                         code) from None
        except MemoryError:
            raise _error("out of memory; try a smaller --size or --max-frames", 1) from None
        except RuntimeError as exc:  # torch.OutOfMemoryError is one
            from p2v_fast.memory import is_out_of_memory

            if not is_out_of_memory(exc):
                raise
            raise _error("out of memory even at one frame per UNet call; try a smaller --size, --dtype fp16 or "
                         "--latent-update detached", 1) from None

    return wrapper


# Options shared by edit and invert ---------------------------------------------------------
Model = Annotated[str, typer.Option(help="Hub id, local diffusers folder, or 'tiny' (random weights, offline).")]
Size = Annotated[int, typer.Option(help="Short side of the working size (multiple of 64).")]
Start = Annotated[int, typer.Option(help="First source frame (0-based).")]
MaxFrames = Annotated[int | None, typer.Option("--max-frames", help="Edit at most this many frames.")]
Stride = Annotated[int, typer.Option(help="Take every N-th frame.")]
Steps = Annotated[int, typer.Option(help="DDIM steps (paper: 50).")]
GuidanceScale = Annotated[float, typer.Option("--guidance-scale", help="Classifier-free guidance.")]
SourcePrompt = Annotated[str | None, typer.Option("--source-prompt", help="Inversion prompt (default: BLIP caption).")]
DepthNorm = Annotated[str, typer.Option("--depth-norm", help="Depth min-max per 'frame' (paper) or per 'clip'.")]
Device = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N.")]
Dtype = Annotated[str, typer.Option(help="auto, fp32, fp16, bf16.")]
Backend = Annotated[str, typer.Option(help="torch, onnxruntime, tensorrt or auto.")]
Engines = Annotated[Path | None, typer.Option(help="Folder of exported engines (non-torch backends).")]
Schedule = Annotated[str, typer.Option(help="wavefront (batched frames) or sequential (Algorithm 1); same result.")]
BatchFrames = Annotated[int | None, typer.Option(
    "--batch-frames", help="Wavefront: most frames in flight (default: up to 16, in calls that fit in memory).")]
InvertBatch = Annotated[int | None, typer.Option(
    "--invert-batch", help="Frames per UNet call during inversion (default: up to 16, as fit in memory).")]
Fps = Annotated[float | None, typer.Option(
    help="Frame rate of an image-folder input (default 24); a video keeps its own.")]


InvertDtype = Annotated[str, typer.Option(
    "--invert-dtype", help="Precision of the DDIM inversion: fp32 (default, whatever --dtype is; fp16 engines "
    "invert on PyTorch), fp16, bf16, or 'same' (the edit's --dtype and backend).")]
Resize = Annotated[str, typer.Option(
    help="Framing: crop (short side --size, aspect kept, centre-cropped), stretch (squashed to --size x --size, "
    "as the paper), pad (fitted in --size x --size, letterboxed; the output drops the bars).")]
Threads = Annotated[int | None, typer.Option(
    help="CPU threads for PyTorch (default: one per core; OpenMP threads wait passively, see docs/performance.md).")]


def _print_rows(rows: list[tuple[str, str]]) -> None:
    """Label / value lines on stdout, values whole (never cut to the terminal's width) and as typed."""
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        out_console.print(f"{key:<{width}}  {value}", markup=False, highlight=False, soft_wrap=True)


def _n(count: int, noun: str) -> str:
    """'1 frame', '2 frames'."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    """PyTorch's CPU threads for a command that takes no EditConfig (whose ``threads`` the
    library applies itself): ``n``, or its default (one per physical core). Either way OpenMP's
    idle threads sleep rather than spin (:func:`main` sets OMP_WAIT_POLICY=PASSIVE before torch
    loads, unless the environment sets it)."""
    from p2v_fast.config import check_threads
    from p2v_fast.runtime import torch_threads

    check_threads(n)

    with torch_threads(n):
        yield


def _config(**kw: Any):
    from p2v_fast.config import EditConfig

    return EditConfig(**kw)


@app.command()
@user_errors
def edit(
    input: Annotated[Path, typer.Argument(help="Video (mp4, mov, webm, gif, ...) or folder of images.")],
    prompt: Annotated[str, typer.Argument(help="Target prompt, e.g. 'a crochet swan on the lake'.")],
    output: Annotated[Path | None, typer.Option(
        "-o", "--output", help="Output video: .mp4, .mov, .mkv or .webm (default: INPUT.p2v.mp4 beside the input; "
        "with --preview a .png).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output file.")] = False,
    preview: Annotated[bool, typer.Option(help="Edit only the anchor frame and write a PNG.")] = False,
    side_by_side: Annotated[bool, typer.Option("--side-by-side", help="Also write input|output video.")] = False,
    model: Model = "stabilityai/stable-diffusion-2-depth",
    size: Size = 512,
    resize: Resize = "crop",
    start: Start = 0,
    max_frames: MaxFrames = None,
    stride: Stride = 1,
    steps: Steps = 50,
    guidance_scale: GuidanceScale = 7.5,
    negative_prompt: Annotated[str, typer.Option(
        "--negative-prompt", help="What to steer away from: replaces the empty prompt of classifier-free "
        "guidance (e.g. 'blurry, low quality').")] = "",
    source_prompt: SourcePrompt = None,
    depth_norm: DepthNorm = "frame",
    latent_update: Annotated[
        str, typer.Option("--latent-update", help="autograd (paper eq. 1), detached, off.")
    ] = "autograd",
    update_steps: Annotated[
        int | None, typer.Option("--update-steps", help="Guided update on the first N steps (default: half).")
    ] = None,
    update_weight: Annotated[float, typer.Option("--update-weight", help="delta of eq. 1 at 512x512.")] = 100.0,
    refs: Annotated[str, typer.Option(help="Attention references: anchor+prev, anchor, prev, none.")] = "anchor+prev",
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    device: Device = "auto",
    dtype: Dtype = "auto",
    backend: Backend = "torch",
    engines: Engines = None,
    schedule: Schedule = "wavefront",
    batch_frames: BatchFrames = None,
    invert_batch: InvertBatch = None,
    invert_dtype: InvertDtype = "fp32",
    compile: Annotated[bool, typer.Option(
        "--compile", help="torch.compile the UNet's calls without gradients (CUDA graphs on GPU).")] = False,
    channels_last: Annotated[bool, typer.Option("--channels-last", help="Channels-last UNet memory format.")] = False,
    cuda_graph: Annotated[bool, typer.Option(
        "--cuda-graph", help="tensorrt: replay engines as CUDA graphs (export them with --static-batch).")] = False,
    fps: Fps = None,
    json_path: Annotated[Path | None, typer.Option(
        "--json", help="Also write the result here: paths, timings, UNet calls and the guided update's size per "
        "step and frame.")] = None,
    threads: Threads = None,
) -> None:
    """Edit INPUT so that it matches PROMPT, consistently across frames."""
    from p2v_fast.pipeline import edit_video

    cfg = _config(
        prompt=prompt, source_prompt=source_prompt, negative_prompt=negative_prompt, model=model, device=device,
        dtype=dtype, backend=backend, engines=engines, size=size, start=start, max_frames=max_frames, stride=stride,
        steps=steps, guidance_scale=guidance_scale, seed=seed, depth_norm=depth_norm, refs=refs,
        latent_update=latent_update, update_steps=update_steps, update_weight=update_weight,
        schedule=schedule, batch_frames=batch_frames, invert_batch=invert_batch, compile=compile,
        channels_last=channels_last, resize=resize, invert_dtype=invert_dtype, cuda_graph=cuda_graph, fps=fps,
        threads=threads,
    )
    with _progress() as progress:
        result = edit_video(cfg, input, output, overwrite=overwrite, preview=preview, side_by_side=side_by_side,
                            progress=progress, json_path=json_path)
    from p2v_fast.inversion import describe_reconstruction
    from p2v_fast.video import format_fps

    rows = [("output", str(result.output))]
    if result.side_by_side:
        rows.append(("side by side", str(result.side_by_side)))
    if result.strip:
        rows.append(("strip", str(result.strip)))
    rate = "variable frame rate (the source's timestamps)" if result.variable_rate else f"{format_fps(result.fps)} fps"
    rows.append(("frames", f"{_n(result.n_frames, 'frame')} at {result.size[0]}x{result.size[1]}, {rate}"))
    caption = " (BLIP caption: random weights in the tiny model, so word salad)" if (
        source_prompt is None and model == "tiny") else " (BLIP caption)" if source_prompt is None else ""
    rows.append(("source prompt", repr(result.source_prompt) + caption))
    inv = "cache hit (no inversion work)" if result.inversion_cache_hit else f"{result.seconds_inversion:.1f} s"
    rows.append(("inversion", f"{inv}; {describe_reconstruction(result.reconstruction)}"))
    rows.append(("edit", f"{result.seconds_edit:.1f} s, {result.seconds_per_frame:.2f} s/frame"))
    rows.append(("total", f"{result.seconds_total:.1f} s"))
    _print_rows(rows)
    if json_path is not None:
        out_console.print(f"wrote {json_path}", markup=False, highlight=False, soft_wrap=True)


@app.command()
@user_errors
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the sample clip and the edit.")] = Path("samples"),
    frames: Annotated[int, typer.Option(help="Frames in the sample clip.")] = 16,
    size: Size = 128,
    steps: Steps = 50,
    threads: Threads = None,
) -> None:
    """Offline end-to-end run: make a sample clip and edit it with the tiny random-weight model.

    The output looks like noise (the weights are random); the run proves every stage works
    without downloads. Use a real --model with `p2v edit` for real edits.
    """
    from p2v_fast import video
    from p2v_fast.errors import InputError
    from p2v_fast.pipeline import edit_video

    cfg = _config(prompt="a crochet swan on the lake", model="tiny", size=size, steps=steps,
                  source_prompt="a sample clip", threads=threads)  # checked before the sample clip is made
    if frames < 1:
        raise InputError(f"--frames must be >= 1; got {frames}")
    if out.exists() and not out.is_dir():
        raise InputError(f"--out '{out}' is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    clip = out / "sample.mp4"
    if not clip.exists():
        video.make_sample_clip(clip, n_frames=frames, size=(256, 192), fps=12.0, with_audio=True)
    console.print(f"sample clip: {clip} ({_n(frames, 'frame')}, with audio)", markup=False, highlight=False,
                  soft_wrap=True)
    with _progress() as progress:
        result = edit_video(cfg, clip, out / "sample.p2v.mp4", overwrite=True, side_by_side=True,
                            progress=progress)
    out_console.print(
        f"edited {_n(result.n_frames, 'frame')} in {result.seconds_total:.1f} s "
        f"({result.seconds_per_frame:.2f} s/frame): {result.output}, {result.side_by_side}, {result.strip}",
        markup=False, highlight=False, soft_wrap=True,
    )


@app.command()
@user_errors
def ui(
    host: Annotated[str, typer.Option(help="Address to serve on (default: this machine only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to serve on.")] = 7860,
    auth: Annotated[str | None, typer.Option(help="USER:PASS the page asks for.")] = None,
    share: Annotated[bool, typer.Option(help="Also a public link through Gradio's share server (needs internet).")
                     ] = False,
    out: Annotated[Path, typer.Option(help="Folder for uploads, outputs and their job records.")] = Path("p2v-ui"),
    model: Model = "stabilityai/stable-diffusion-2-depth",
    device: Device = "auto",
    dtype: Dtype = "auto",
    engines: Annotated[Path, typer.Option(help="Folder whose engine folders the page offers.")] = Path("engines"),
    max_upload_mb: Annotated[int, typer.Option("--max-upload-mb", help="Largest upload, in MB.")] = 200,
    threads: Threads = None,
) -> None:
    """Open the web page to restyle a clip (Gradio; install the extra: pip install 'p2v-fast[ui]')."""
    import importlib.util

    from p2v_fast.config import check_threads
    from p2v_fast.errors import BackendUnavailableError, InputError

    if importlib.util.find_spec("gradio") is None:
        raise BackendUnavailableError("p2v ui needs Gradio: pip install 'p2v-fast[ui]'")
    from p2v_fast.renders import UISettings
    from p2v_fast.ui import launch, parse_auth

    check_threads(threads)
    if not 1 <= port <= 65535:
        raise InputError(f"--port must be between 1 and 65535; got {port}")
    if max_upload_mb < 1:
        raise InputError(f"--max-upload-mb must be >= 1; got {max_upload_mb}")
    if out.exists() and not out.is_dir():
        raise InputError(f"--out '{out}' is a file, not a folder")
    _config(model=model, device=device, dtype=dtype)  # a bad value is one line before anything loads
    settings = UISettings(out_dir=out, model=model, device=device, dtype=dtype, engines_root=engines,
                          threads=threads, max_upload_mb=max_upload_mb)
    launch(settings, host=host, port=port, auth=parse_auth(auth), share=share,
           on_line=lambda m: console.print(m, markup=False, highlight=False, soft_wrap=True))


@app.command()
@user_errors
def invert(
    input: Annotated[Path, typer.Argument(help="Video or folder of images.")],
    model: Model = "stabilityai/stable-diffusion-2-depth",
    size: Size = 512,
    resize: Resize = "crop",
    start: Start = 0,
    max_frames: MaxFrames = None,
    stride: Stride = 1,
    steps: Steps = 50,
    source_prompt: SourcePrompt = None,
    depth_norm: DepthNorm = "frame",
    device: Device = "auto",
    dtype: Dtype = "auto",
    backend: Backend = "torch",
    engines: Engines = None,
    invert_batch: InvertBatch = None,
    invert_dtype: InvertDtype = "fp32",
    fps: Fps = None,
    threads: Threads = None,
) -> None:
    """DDIM-invert INPUT into the cache, so later edits of it skip inversion."""
    from p2v_fast.inversion import describe_reconstruction
    from p2v_fast.pipeline import invert_video
    from p2v_fast.runtime import describe_runtime

    cfg = _config(model=model, device=device, dtype=dtype, backend=backend, engines=engines, size=size, start=start,
                  max_frames=max_frames, stride=stride, steps=steps, source_prompt=source_prompt,
                  depth_norm=depth_norm, latent_update="off", invert_batch=invert_batch, resize=resize,
                  invert_dtype=invert_dtype, fps=fps, threads=threads)
    with _progress() as progress:
        prep = invert_video(cfg, input, progress)
    inv, sel = prep.inverted, prep.selection
    state = "cache hit (nothing to do)" if inv.cache_hit else f"{prep.seconds:.1f} s"
    out_console.print(f"inverted {_n(sel.n_frames, 'frame')} at {sel.size[0]}x{sel.size[1]} ({sel.resize}) on "
                      f"{describe_runtime(inv.runtime)}: {state}; cache {inv.root}", markup=False, soft_wrap=True,
                      highlight=False)
    out_console.print(f"reconstruction: {describe_reconstruction(inv.reconstruction)}", markup=False,
                      soft_wrap=True, highlight=False)


class RichBatchReporter:
    """p2v_fast.batch.BatchReporter rendered with rich: the jobs overall (ETA from frames edited
    per second) and a bar per running job."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.credit: dict[int, float] = {}  # job -> frames counted as done overall
        self.tasks: dict[int, Any] = {}
        self.finished = 0

    def start(self, jobs: list) -> None:
        todo = [j for j in jobs if not j.done]
        self.n_todo = len(todo)
        if len(jobs) > len(todo):
            self.log(f"{len(jobs) - len(todo)} of {len(jobs)} jobs already done (outputs complete): skipped")
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
    """p2v_fast.batch.BatchReporter in a log (stderr not a terminal): a line when a job starts and
    ends, and for a running job one every :data:`PROGRESS_INTERVAL_S` seconds at most."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.shown: dict[int, float] = {}

    def start(self, jobs: list) -> None:
        todo = [j for j in jobs if not j.done]
        if len(jobs) > len(todo):
            self.log(f"{len(jobs) - len(todo)} of {len(jobs)} jobs already done (outputs complete): skipped")
        self.log(f"{len(todo)} jobs to run, {sum(j.n_frames for j in todo)} frames")

    def job_started(self, job, worker: str) -> None:
        self.shown[job.index] = self.clock()
        self.log(f"job {job.index} ({job.label}) on {worker}")

    def job_progress(self, job, stage: str, frames: float) -> None:
        now = self.clock()
        if now - self.shown.get(job.index, now) >= PROGRESS_INTERVAL_S:
            self.shown[job.index] = now
            self.log(f"job {job.index} {stage}: {frames:.0f}/{job.n_frames} frames")

    def job_finished(self, job, result) -> None:
        what = result.output if result.status == "done" else result.detail
        self.log(f"job {job.index} {result.status} in {result.seconds:.1f} s: {what}")

    def log(self, message: str) -> None:
        console.print(message, markup=False, highlight=False, soft_wrap=True)


def _batch_table(result, jobs_file: Path) -> Table:
    counts = ", ".join(f"{result.count(s)} {s}" for s in ("done", "skipped", "failed", "interrupted", "not run")
                       if result.count(s))
    table = Table(title=f"p2v batch {jobs_file.name}: {counts} in {result.seconds:.1f} s")
    for col in ("job", "status", "frames", "seconds", "output", "detail"):
        table.add_column(col, justify="right" if col in ("job", "frames", "seconds") else "left",
                         overflow="fold")
    colour = {"done": "green", "skipped": "cyan"}
    for r in result.results:
        ran = r.status == "done"
        table.add_row(str(r.job), f"[{colour.get(r.status, 'red')}]{r.status}[/]", str(r.frames) if r.frames else "-",
                      f"{r.seconds:.1f}" if ran else "-", escape(_short(r.output)), escape(r.detail))
    return table


def _short(path: str) -> str:
    try:
        return str(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return path


@app.command()
@user_errors
def batch(
    jobs: Annotated[Path, typer.Argument(help="Jobs file (YAML or JSON): 'defaults' and a list of 'jobs', each "
                                              "with `p2v edit` options under their long names with underscores.")],
    json_path: Annotated[Path | None, typer.Option("--json", help="Also write the summary to this JSON file.")] = None,
    ray: Annotated[bool, typer.Option("--ray", help="Run the jobs on Ray, one worker per GPU.")] = False,
    ray_address: Annotated[str | None, typer.Option(
        "--ray-address", help="Join this Ray cluster (e.g. auto, or HEAD_IP:6379); implies --ray. "
                              "Default: start a local Ray.")] = None,
    ray_cpus_per_worker: Annotated[int | None, typer.Option(
        "--ray-cpus-per-worker", help="CPU-only cluster: one worker per N CPUs; implies --ray.")] = None,
    workers: Annotated[int | None, typer.Option(
        help="Ray workers (default: one per GPU in the cluster, or per --ray-cpus-per-worker CPUs).")] = None,
) -> None:
    """Edit many clips from one jobs file: models load once per worker, each clip inverts once.

    Running the same command again skips the jobs whose output is complete."""
    from p2v_fast.batch import BatchFileError, check_summary_path, load_jobs, run_batch
    from p2v_fast.errors import InputError
    from p2v_fast.files import write_json_atomic
    from p2v_fast.paths import check_output_file

    ray = ray or ray_address is not None or ray_cpus_per_worker is not None
    if workers is not None and not ray:
        raise InputError("--workers needs --ray (without Ray the jobs run one after another in this process)")
    if ray_cpus_per_worker is not None and ray_cpus_per_worker < 1:
        raise InputError(f"--ray-cpus-per-worker must be >= 1; got {ray_cpus_per_worker}")
    if json_path is not None:
        check_output_file(json_path)
    try:
        job_list = load_jobs(jobs)
    except BatchFileError as e:
        for line in e.lines:
            console.print(f"[bold red]error:[/bold red] {escape(line)}", highlight=False, soft_wrap=True)
        raise typer.Exit(e.exit_code) from None
    if json_path is not None:
        check_summary_path(json_path, jobs, job_list)
    progress = Progress(TextColumn("[bold]{task.description:<22}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("frames"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                        console=console)
    with progress if console.is_terminal else contextlib.nullcontext():
        reporter: RichBatchReporter | LogBatchReporter = (
            RichBatchReporter(progress) if console.is_terminal else LogBatchReporter())
        if ray:
            from p2v_fast.batch_ray import run_batch_ray

            result = run_batch_ray(job_list, reporter, address=ray_address, workers=workers,
                                   cpus_per_worker=ray_cpus_per_worker)
        else:
            result = run_batch(job_list, reporter)
    out_console.print(_batch_table(result, jobs))
    if json_path is not None:
        write_json_atomic(json_path, {"jobs_file": str(jobs.resolve()), **result.to_dict()})
        out_console.print(f"wrote {json_path}", markup=False, soft_wrap=True, highlight=False)
    if result.exit_code:
        raise typer.Exit(result.exit_code)


ClipModel = Annotated[
    str, typer.Option("--clip-model", help="CLIP for the metrics: hub id, local folder, or 'tiny' (random, offline).")
]
Flow = Annotated[str, typer.Option(help="Optical flow for Pixel-MSE: dis (OpenCV, no weights) or raft (paper).")]


@app.command("eval")
@user_errors
def eval_(
    edited: Annotated[Path, typer.Argument(help="The edited video (or folder of frames).")],
    source: Annotated[Path, typer.Option("--source", help="The video it was edited from.")],
    prompt: Annotated[str, typer.Option("--prompt", help="The edit (target) prompt, for CLIP-Text.")],
    json_path: Annotated[Path | None, typer.Option("--json", help="Also write the scores to this JSON file.")] = None,
    clip_model: ClipModel = "openai/clip-vit-large-patch14",
    flow: Flow = "dis",
    size: Annotated[
        int | None, typer.Option(help="Compare at this short side (default: the edited video's size).")
    ] = None,
    start: Annotated[int, typer.Option(help="First source frame the edit was made from.")] = 0,
    max_frames: Annotated[int | None, typer.Option("--max-frames", help="--max-frames the edit used.")] = None,
    stride: Annotated[int, typer.Option(help="--stride the edit used.")] = 1,
    resize: Annotated[str, typer.Option(
        help="--resize the edit used: how source frames map onto the edited frames (crop and pad: cover and "
        "centre-crop, pad's output having no bars; stretch: squashed).")] = "crop",
    threads: Threads = None,
) -> None:
    """Score EDITED against its source: CLIP-Text, CLIP-Image, Pixel-MSE (the paper's Table 2)."""
    from p2v_fast.errors import InputError
    from p2v_fast.evaluate import evaluate_video
    from p2v_fast.files import write_json_atomic
    from p2v_fast.paths import check_output_file

    if json_path is not None:
        check_output_file(json_path)
        for video_path in (edited, source):  # the report never replaces a video it scores
            if Path(json_path).resolve() == Path(video_path).resolve():
                raise InputError(f"--json '{json_path}' is the video '{video_path}'; choose another --json path")
    with _threads(threads), _progress() as progress:
        result = evaluate_video(edited, source, prompt, clip_model=clip_model, flow=flow, size=size, start=start,
                                max_frames=max_frames, stride=stride, resize=resize, progress=progress)
    table = Table(title=f"{_n(result.n_frames, 'frame')} at {result.size[0]}x{result.size[1]}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("paper (ours, DAVIS 512²)", justify="right", style="dim")
    table.add_row("CLIP-Text ↑", f"{result.clip_text:.4f}", "0.2891")
    table.add_row("CLIP-Image ↑", f"{result.clip_image:.4f}", "0.9767")
    table.add_row("Pixel-MSE ↓ (0-255)", f"{result.pixel_mse:.2f}", "228.62")
    table.add_row("pixels masked (occluded)", f"{100 * result.masked_fraction:.1f} %", "")
    table.caption = escape(f"CLIP {result.clip_model}, flow {result.flow}")
    out_console.print(table)
    if json_path is not None:
        write_json_atomic(json_path, result.to_dict())
        out_console.print(f"wrote {json_path}", markup=False, soft_wrap=True, highlight=False)


@app.command()
@user_errors
def ablate(
    input: Annotated[Path, typer.Argument(help="Video or folder of images.")],
    prompt: Annotated[str, typer.Argument(help="Target prompt.")],
    out: Annotated[Path | None, typer.Option("--out", help="Output folder (default: INPUT.ablation/ beside it).")] = (
        None
    ),
    settings: Annotated[
        str | None,
        typer.Option(help="Comma-separated subset of: ours, no-update, anchor, prev, per-frame, detached "
                          "(default: the first five, the paper's)."),
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace the outputs of an earlier ablation in --out.")] = False,
    clip_model: ClipModel = "openai/clip-vit-large-patch14",
    flow: Flow = "dis",
    sheet_frames: Annotated[int, typer.Option("--sheet-frames", help="Frames per contact-sheet row.")] = 4,
    model: Model = "stabilityai/stable-diffusion-2-depth",
    size: Size = 512,
    resize: Resize = "crop",
    start: Start = 0,
    max_frames: MaxFrames = None,
    stride: Stride = 1,
    steps: Steps = 50,
    guidance_scale: GuidanceScale = 7.5,
    source_prompt: SourcePrompt = None,
    depth_norm: DepthNorm = "frame",
    update_weight: Annotated[float, typer.Option("--update-weight", help="delta of eq. 1 at 512x512.")] = 100.0,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    device: Device = "auto",
    dtype: Dtype = "auto",
    backend: Backend = "torch",
    engines: Engines = None,
    invert_dtype: InvertDtype = "fp32",
    fps: Fps = None,
    threads: Threads = None,
) -> None:
    """Run the paper's ablations on INPUT and print one table like its Table 2."""
    from p2v_fast.ablation import METRICS, format_metric, run_ablation

    cfg = _config(prompt=prompt, source_prompt=source_prompt, model=model, device=device, dtype=dtype,
                  backend=backend, engines=engines, size=size, start=start, max_frames=max_frames, stride=stride,
                  steps=steps, guidance_scale=guidance_scale, seed=seed, depth_norm=depth_norm,
                  update_weight=update_weight, resize=resize, invert_dtype=invert_dtype, fps=fps, threads=threads)
    with _threads(threads), _progress() as progress:  # the metrics too, not only the edits
        result = run_ablation(cfg, input, out, settings=settings, clip_model=clip_model, flow=flow,
                              overwrite=overwrite, sheet_frames=sheet_frames, progress=progress)
    best = result.best()
    table = Table(title=escape(f"Pix2Video ablation: {_n(result.n_frames, 'frame')} at "
                               f"{result.size[0]}x{result.size[1]}, {result.steps} steps, {result.model}"))
    table.add_column("setting", no_wrap=True)
    for _, header, _ in METRICS:
        table.add_column(header, justify="right")
    for r in result.rows:
        cells = []
        for name, _, _ in METRICS:
            text = format_metric(getattr(r, name), name)
            cells.append(f"[bold]{text}[/bold]" if best.get(name) == r.key else text)
        table.add_row(r.label, *cells)
    table.caption = (f"CLIP {escape(result.clip_model)}, flow {result.flow}; s/frame excludes inversion. "
                     "Paper (DAVIS 512²): ours 0.2891 / 0.9767 / 228.62, w/o update 0.2893 / 0.9740 / 371.18")
    out_console.print(table)
    out_console.print(f"table: {result.table_md}\njson: {result.table_json}\ncontact sheet: {result.contact_sheet}",
                      markup=False, soft_wrap=True, highlight=False)


@app.command()
@user_errors
def bench(
    model: Annotated[str | None, typer.Option(help="Hub id, local folder or 'tiny' (default: --arch sd2-depth).")] = (
        None
    ),
    arch: Annotated[str | None, typer.Option(help="sd2-depth: the full-size architecture, random weights.")] = None,
    size: Annotated[
        int | None, typer.Option(help="Short side (multiple of 64); default 512, or 128 for --model tiny.")
    ] = None,
    steps: Annotated[int | None, typer.Option(help="DDIM steps (default 50, the paper's).")] = None,
    frames: Annotated[int | None, typer.Option(
        help="Frames in the synthetic clip (1 anchor + propagated; default 4).")] = None,
    backend: Annotated[list[str] | None, typer.Option("--backend", help="Repeatable (default: torch).")] = None,
    latent_update: Annotated[
        list[str] | None, typer.Option("--latent-update", help="Repeatable (default: autograd, detached, off).")
    ] = None,
    schedule: Annotated[
        list[str] | None, typer.Option("--schedule", help="Repeatable (default: sequential, wavefront).")
    ] = None,
    batch_frames: BatchFrames = None,
    invert_batch: InvertBatch = None,
    invert_dtype: InvertDtype = "fp32",
    dtype: Dtype = "auto",
    device: Device = "auto",
    engines: Engines = None,
    repeats: Annotated[int, typer.Option(help="Timed runs per stage.")] = 3,
    warmup: Annotated[int, typer.Option(help="Untimed runs per stage first.")] = 1,
    threads: Annotated[int | None, typer.Option(help="CPU threads (default: torch's).")] = None,
    speedups: Annotated[list[str] | None, typer.Option(
        "--speedups", help="Repeatable: time eager, sdpa-math, channels-last, compile, fp16, bf16 UNet calls "
        "each on its own (alone unless --backend is given too).")] = None,
    compile: Annotated[bool, typer.Option(
        "--compile", help="torch.compile the torch backend's UNet calls without gradients (warmed up untimed).")
    ] = False,
    plan: Annotated[bool, typer.Option(
        "--plan", help="Only simulate the wavefront (ticks, UNet calls, peak features per cap) for --frames x "
        "--steps at --size; no weights, no timing.")] = False,
    protocol: Annotated[str | None, typer.Option(
        "--protocol", help="v2v120: 120 frames at 512x512, 50 steps, end to end per latent-update mode, against "
        "the peers' reported times. --frames/--size/--steps override it (labelled: not the protocol).")] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="Also write the full report here.")] = None,
) -> None:
    """Time depth, inversion, anchor and propagated frames and VAE decode, in seconds per frame."""
    from benchmarks.bench import BenchOptions, run_bench
    from benchmarks.report import print_report
    from p2v_fast.config import LATENT_UPDATES, SCHEDULES

    if json_path is not None:
        from p2v_fast.paths import check_json_path

        check_json_path(json_path)
    if plan and protocol is not None:
        from p2v_fast.errors import InputError

        raise InputError("--plan simulates the wavefront and --protocol runs the edit; give one of them")
    if protocol is not None:
        _bench_protocol(protocol, model, arch, size, steps, frames, backend, latent_update, dtype, device, engines,
                        threads, compile, invert_dtype, json_path)
        return
    if size is None:  # the tiny model at 512 takes ~45 min on 2 CPU cores; its timings mean little anyway
        size = 128 if model == "tiny" else 512
    steps = 50 if steps is None else steps
    frames = 4 if frames is None else frames
    opts = BenchOptions(
        model=model, arch=arch, size=size, steps=steps, frames=frames, compile=compile,
        backends=tuple(backend or (() if speedups else ("torch",))),
        latent_updates=tuple(latent_update or LATENT_UPDATES), schedules=tuple(schedule or SCHEDULES),
        batch_frames=batch_frames, invert_batch=invert_batch, invert_dtype=invert_dtype, dtype=dtype, device=device,
        engines=engines,
        repeats=repeats, warmup=warmup,
        threads=threads, json_path=json_path, speedups=tuple(speedups or ()),
    )  # every option checked, --plan or not
    if plan:
        from benchmarks.plan import CAPS, plan_report, plan_table

        report = plan_report(frames, steps, size, dtype, caps=(batch_frames,) if batch_frames else CAPS,
                             arch=arch, model=model)
        _wide().print(plan_table(report))
        if json_path is not None:
            from p2v_fast.files import write_json_atomic

            write_json_atomic(json_path, report)
        return
    with _progress() as progress:
        report = run_bench(opts, progress)
    print_report(out_console, report)
    if json_path is not None:
        out_console.print(f"wrote {json_path}", markup=False, highlight=False, soft_wrap=True)


def _bench_protocol(name: str, model, arch, size, steps, frames, backend, latent_update, dtype, device, engines,
                    threads, compile, invert_dtype, json_path) -> None:
    """`p2v bench --protocol NAME`: see benchmarks/protocol.py."""
    from benchmarks.protocol import ProtocolOptions, protocol_table, run_protocol
    from p2v_fast.config import LATENT_UPDATES
    from p2v_fast.files import write_json_atomic

    overrides = {k: v for k, v in (("frames", frames), ("size", size), ("steps", steps)) if v is not None}
    if backend and len(backend) > 1:
        from p2v_fast.errors import InputError

        raise InputError("--protocol runs one backend; give --backend once")
    opts = ProtocolOptions(name=name, model=model, arch=arch, device=device, dtype=dtype,
                           backend=(backend or ["torch"])[0], engines=engines,
                           latent_updates=tuple(latent_update or LATENT_UPDATES), compile=compile,
                           invert_dtype=invert_dtype, overrides=overrides)
    if not opts.faithful:
        console.print(f"[yellow]not the protocol[/yellow]: {overrides} overrides {name}'s fixed workload; "
                      "the report says so")
    with _threads(threads):
        report = run_protocol(opts, log=lambda m: console.print(f"[dim]{escape(m)}[/dim]"))
    _wide().print(protocol_table(report))
    if json_path is not None:
        write_json_atomic(json_path, report)
        out_console.print(f"wrote {json_path}")


def _wide() -> Console:
    """``out_console``, or, when the output is not a terminal (a pipe, a log), one 200 columns
    wide: rich's default 80 would squash a wide table."""
    if out_console.is_terminal:
        return out_console
    return Console(file=out_console.file, width=max(out_console.width, 200), color_system=None)


@app.command("export")
@user_errors
def export_(
    model: Model = "stabilityai/stable-diffusion-2-depth",
    size: Annotated[int | None, typer.Option(help="Square size (height = width), the profile's opt size.")] = None,
    height: Annotated[int | None, typer.Option(help="Opt height in pixels (default: --size or 512).")] = None,
    width: Annotated[int | None, typer.Option(help="Opt width in pixels (default: --size or 512).")] = None,
    min_size: Annotated[int | None, typer.Option("--min-size", help="Smallest height/width accepted.")] = None,
    max_size: Annotated[int | None, typer.Option("--max-size", help="Largest height/width accepted.")] = None,
    out: Annotated[Path, typer.Option(help="Engine folder.")] = Path("engines"),
    format: Annotated[str, typer.Option("--format", help="onnx (graphs only) or tensorrt (graphs + engines).")] = (
        "tensorrt"
    ),
    precision: Annotated[str, typer.Option(help="fp16 or fp32 (UNet, VAE; DPT stays fp32).")] = "fp16",
    workspace: Annotated[float | None, typer.Option(help="TensorRT builder workspace limit in GB.")] = None,
    max_batch: Annotated[int, typer.Option("--max-batch", help="Most samples per call (frames x 2 CFG).")] = 8,
    opt_batch: Annotated[int | None, typer.Option(
        "--opt-batch", help="Batch TensorRT tunes for (default: --max-batch, what the wavefront sends).")] = None,
    static_batch: Annotated[bool, typer.Option(
        "--static-batch", help="Engines for --max-batch only (smaller calls padded); needed by --cuda-graph.")] = False,
    opset: Annotated[int, typer.Option(help="ONNX opset.")] = 18,
    exporter: Annotated[str, typer.Option(
        help="torchscript (dynamic batch and size) or dynamo (torch.export; one fixed size).")] = "torchscript",
    device: Device = "auto",
    force: Annotated[bool, typer.Option(help="Redo every stage, even when its artifact is current.")] = False,
) -> None:
    """Export the networks to ONNX (validated against PyTorch) and build TensorRT engines."""
    from export import ExportOptions, export_engines

    opt = 512 if size is None else size
    options = ExportOptions(model=model, out=out, format=format, precision=precision, height=height or opt,
                            width=width or opt, min_size=min_size, max_size=max_size, max_batch=max_batch,
                            opt_batch=opt_batch, static_batch=static_batch, opset=opset, exporter=exporter,
                            workspace_gb=workspace,
                            device=device, force=force)
    with _progress() as progress:
        report = export_engines(options, progress)
    table = Table(title=escape(f"{report.folder} ({options.profile().describe()}, {precision})"))
    for col, justify in (("network", "left"), ("file", "left"), ("size", "right"), ("seconds", "right"),
                         ("status", "left"), ("max rel err", "left")):
        table.add_column(col, justify=justify, no_wrap=col != "max rel err")  # type: ignore[arg-type]
    for r in report.rows:
        table.add_row(r.network, escape(r.file.name), f"{r.bytes / 2**20:.1f} MB", f"{r.seconds:.1f}", r.status,
                      escape(r.detail))
    out_console.print(table)
    out_console.print(f"manifest: {report.manifest} ({report.seconds:.1f} s in all)", markup=False, soft_wrap=True)


@app.command()
@user_errors
def info(
    engines: Engines = None,
    model: Annotated[str | None, typer.Option(
        help="Check --engines against this model (default: the one they were exported from).")] = None,
) -> None:
    """Versions, devices, which runtimes (CUDA, ONNX Runtime, TensorRT) are usable, and whether the
    engines found match this machine and model."""
    from p2v_fast.system import engines_report, system_report

    table = Table(title="p2v-fast", show_header=True)
    table.add_column("component")
    table.add_column("status")
    for name, status in system_report() + engines_report(engines, model):
        table.add_row(escape(name), escape(status))
    out_console.print(table)


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    signal.signal(signal.SIGTERM, _on_sigterm)  # clean up (partial files, locks) as on Ctrl-C
    # OpenMP (libgomp) reads this once, when torch loads: idle threads sleep instead of spinning,
    # which on a busy CPU made a tiny edit 6-27x slower (docs/performance.md, "CPU threads").
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    app()


if __name__ == "__main__":
    main()
