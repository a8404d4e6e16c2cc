"""`p2v`: edit a video from a text prompt with Pix2Video (SD2-depth), fast.

The CLI only parses options, calls one library function and renders its result. Every
:class:`~p2v_fast.errors.P2VError` becomes one ``error:`` line and a non-zero exit.
"""

from __future__ import annotations

import contextlib
import functools
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperCommand, TyperGroup

from benchmarks.options import DEFAULT_FRAMES, PLAN_FRAMES, BenchRequest
from p2v_fast import report
from p2v_fast.config import (
    BACKENDS,
    DEFAULT_CLIP_MODEL,
    DEPTH_NORMS,
    DTYPES,
    FLOW_METHODS,
    INJECTIONS,
    INVERT_DTYPES,
    LATENT_UPDATES,
    OUTPUT_SIZES,
    PAPER,
    REFS,
    RESIZES,
    SCHEDULES,
    TIMESTEP_GRIDS,
    EditConfig,
    check_choice,
    cpu_policy,
    paper_options,
)
from p2v_fast.display import LogProgress, RichProgress, batch_display, progress_for
from p2v_fast.errors import P2VError
from p2v_fast.nets.export_options import EXPORTERS, FORMATS, ExportOptions
from p2v_fast.nets.specs import PRECISIONS
from p2v_fast.text import size_text

try:  # typer >= 0.20 carries its own copy of click
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover - older typer on click
    from click import exceptions as click_errors  # type: ignore[no-redef]


#: --help's panels (issue 28 item 5), shown in this order after the options of none ("Options").
PANELS = INPUT_PANEL, METHOD_PANEL, SPEED_PANEL, OUTPUT_PANEL = (
    "Input and framing", "The method", "Precision and speed", "Output")


def _as_flag(param: Any) -> Any:
    """``param``, shown as a flag in --help if it is one: Typer's rich help gives a boolean flag a
    ``<bool>`` type, as if it took a value (its plain help does not)."""
    if getattr(param, "is_flag", False) and param.metavar is None:
        param.metavar = ""
    return param


#: A command with fewer options shows them in one list: a few read best together.
PANELS_FROM = 20


class _HelpLayout:
    """--help of a command or group: flags as flags; with :data:`PANELS_FROM` options or more, the
    options grouped by panel in :data:`PANELS`' order."""

    params: list[Any]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[call-arg]
        order = {name: i for i, name in enumerate(PANELS, start=1)}
        grouped = len(self.params) >= PANELS_FROM
        for param in self.params:
            _as_flag(param)
            if not grouped and getattr(param, "rich_help_panel", None) in order:
                param.rich_help_panel = None
        self.params.sort(key=lambda p: order.get(getattr(p, "rich_help_panel", None) or "", 0))  # stable

    def get_help_option(self, ctx: Any) -> Any:
        return _as_flag(super().get_help_option(ctx))  # type: ignore[misc]


class _Command(_HelpLayout, TyperCommand):
    """A command of the app (its --help as :class:`_HelpLayout` lays it out)."""


class _Typer(typer.Typer):
    """The app: a command is a :class:`_Command` unless it names another class."""

    def command(self, *args: Any, cls: type[TyperCommand] | None = None, **kwargs: Any) -> Any:
        return super().command(*args, cls=cls or _Command, **kwargs)


class _Group(_HelpLayout, TyperGroup):
    """The app's command group: usage errors from the option parser (a missing argument, an
    unknown option, a value of the wrong type) are one ``error:`` line, like every other error."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["standalone_mode"] = False
        try:
            rv = super().main(*args, **kwargs)
        except click_errors.NoArgsIsHelpError as exc:  # bare `p2v`: the help text
            exc.show()
            sys.exit(exc.exit_code)
        except P2VError as exc:  # a value the option's parser refused (a choice not offered)
            console.print(f"[bold red]error:[/bold red] {escape(str(exc))}", highlight=False, soft_wrap=True)
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


app = _Typer(
    name="p2v",
    cls=_Group,
    help="Edit a video from a text prompt with Pix2Video on Stable Diffusion 2 depth.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
out_console = Console()

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


def _progress() -> RichProgress | LogProgress:
    """Bars on a terminal, plain lines at an interval otherwise (so a log shows progress too)."""
    return progress_for(console)


def _on_sigterm(signum: int, frame: Any) -> None:
    from p2v_fast.errors import Terminated

    raise Terminated()


def _error(message: str, code: int) -> typer.Exit:
    console.print(f"[bold red]error:[/bold red] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


#: Commands whose interruption keeps finished inversion frames in the cache.
_INVERTING = ("edit", "demo", "invert", "ablate")


def _try(fn: Callable[..., Any], *hints: tuple[str, str]) -> str:
    """'; try A, B or C' from the (parameter, hint) pairs whose parameter ``fn`` (a command) has:
    a message names only options of the command that raised it."""
    import inspect

    params = inspect.signature(fn).parameters
    got = [text for name, text in hints if name in params]
    return f"; try {', '.join(got[:-1])} or {got[-1]}" if len(got) > 1 else f"; try {got[0]}" if got else ""


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn library errors (and Ctrl-C, SIGTERM) into one line and an exit code, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from p2v_fast.weights.hub import one_probe_per_repo

        try:
            with one_probe_per_repo():  # the early check's probe, not again as the model loads
                return fn(*args, **kwargs)
        except P2VError as exc:
            raise _error(str(exc), exc.exit_code) from None
        except KeyboardInterrupt as exc:
            from p2v_fast.errors import Terminated

            what, code = ("terminated (SIGTERM)", 143) if isinstance(exc, Terminated) else ("interrupted", 130)
            kept = ", finished inversion frames are kept in the cache" if fn.__name__ in _INVERTING else ""
            raise _error(f"{what}; no partial output was kept{kept}", code) from None
        except MemoryError:
            raise _error("out of memory" + _try(fn, ("size", "a smaller --size"), ("max_frames", "--max-frames"),
                                                ("frames", "fewer --frames")), 1) from None
        except RuntimeError as exc:  # torch.OutOfMemoryError is one
            from p2v_fast.nets.memory import is_out_of_memory

            if not is_out_of_memory(exc):
                raise
            where = " even at one frame per UNet call" if fn.__name__ in _INVERTING else ""
            raise _error(f"out of memory{where}" + _try(fn, ("size", "a smaller --size"), ("dtype", "--dtype fp16"),
                                                        ("latent_update", "--latent-update detached")), 1) from None

    return wrapper


def _edit_default(name: str) -> Any:
    """The default of EditConfig's field ``name``: an option's default is written once, there."""
    return EditConfig.__dataclass_fields__[name].default


def _bench_default(name: str) -> Any:
    """The default of BenchRequest's field ``name`` (`p2v bench`)."""
    return BenchRequest.__dataclass_fields__[name].default


def _export_default(name: str) -> Any:
    """The default of ExportOptions' field ``name``."""
    return ExportOptions.__dataclass_fields__[name].default


def _choices(option: str, choices: Sequence[str]) -> dict[str, Any]:
    """typer.Option keywords for a value that is one of ``choices``: --help shows them, and another
    value is one ``error:`` line (exit 2) worded as EditConfig words it."""
    options = tuple(choices)

    def parse(value: str) -> str:
        return check_choice(option, value, options)

    return {"parser": parse, "metavar": "[" + "|".join(options) + "]"}


# Options shared by the commands: one spelling, one help and one --help panel each -------------
Model = Annotated[str, typer.Option(
    help="Hub id, local diffusers folder, 'mini' (small, trained on rendered scenes, offline) or 'tiny' (random "
    "weights, for tests).", rich_help_panel=METHOD_PANEL)]
Size = Annotated[int, typer.Option(help="Short side of the working size (multiple of 64).",
                                   rich_help_panel=INPUT_PANEL)]
Start = Annotated[int, typer.Option(help="First source frame (0-based).", rich_help_panel=INPUT_PANEL)]
MaxFrames = Annotated[int | None, typer.Option("--max-frames", help="Edit at most this many frames.",
                                               rich_help_panel=INPUT_PANEL)]
Stride = Annotated[int, typer.Option(help="Take every N-th frame.", rich_help_panel=INPUT_PANEL)]
Steps = Annotated[int, typer.Option(help="DDIM steps (paper: 50).", rich_help_panel=METHOD_PANEL)]
TimestepGrid = Annotated[str, typer.Option(
    "--timestep-grid", **_choices("--timestep-grid", TIMESTEP_GRIDS),
    help="DDIM timesteps: the model's scheduler config (SD2: 981, 961, ..., 1) or the authors' code's "
    "(980, 960, ..., 0).", rich_help_panel=METHOD_PANEL)]
GuidanceScale = Annotated[float, typer.Option("--guidance-scale", help="Classifier-free guidance (1 to 100).",
                                              rich_help_panel=METHOD_PANEL)]
SourcePrompt = Annotated[str | None, typer.Option(
    "--source-prompt", help="Inversion prompt (default: a caption of the first frame, see --captioner).",
    rich_help_panel=METHOD_PANEL)]
Captioner = Annotated[str | None, typer.Option(
    "--captioner", help="What captions the first frame when --source-prompt is not given: a hub id or folder of a "
    "BLIP captioner, or 'none' (then --source-prompt is required). Default: the model folder's own (mini, tiny), "
    "else Salesforce/blip-image-captioning-base (990 MB; docs/models.md).", rich_help_panel=METHOD_PANEL)]
DepthNorm = Annotated[str, typer.Option("--depth-norm", **_choices("--depth-norm", DEPTH_NORMS),
                                        help="Depth min-max per frame (paper) or per clip.",
                                        rich_help_panel=METHOD_PANEL)]
LatentUpdate = Annotated[str, typer.Option("--latent-update", **_choices("--latent-update", LATENT_UPDATES),
                                           help="detached (the authors' code; the default: as good as autograd "
                                           "at 2/3 of its time, docs/method.md), autograd (paper eq. 1) or off.",
                                           rich_help_panel=METHOD_PANEL)]
UpdateWeight = Annotated[float, typer.Option("--update-weight", help="delta of eq. 1 at 512x512 (0 to 1e5).",
                                             rich_help_panel=METHOD_PANEL)]
Seed = Annotated[int, typer.Option(help="Random seed.", rich_help_panel=METHOD_PANEL)]
Device = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N.", rich_help_panel=SPEED_PANEL)]
Dtype = Annotated[str, typer.Option("--dtype", **_choices("--dtype", ("auto", *DTYPES)),
                                    help="Precision of the networks (auto: fp16 on CUDA, fp32 on CPU).",
                                    rich_help_panel=SPEED_PANEL)]
Backend = Annotated[str, typer.Option(
    "--backend", **_choices("--backend", BACKENDS),
    help="Runtime of the networks (auto: tensorrt if --engines holds engines usable here, else onnxruntime if it "
    "holds graphs, else torch).", rich_help_panel=SPEED_PANEL)]
Engines = Annotated[Path | None, typer.Option(
    help="Folder of exported engines (non-torch backends; default ./engines).", rich_help_panel=SPEED_PANEL)]
Schedule = Annotated[str, typer.Option("--schedule", **_choices("--schedule", SCHEDULES),
                                       help="wavefront (batched frames) or sequential (Algorithm 1); same result.",
                                       rich_help_panel=SPEED_PANEL)]
BatchFrames = Annotated[int | None, typer.Option(
    "--batch-frames", help="Wavefront: most frames in flight (default: up to 16, in calls that fit in memory).",
    rich_help_panel=SPEED_PANEL)]
InvertBatch = Annotated[int | None, typer.Option(
    "--invert-batch", help="Frames per UNet call during inversion (default: up to 16, as fit in memory).",
    rich_help_panel=SPEED_PANEL)]
MaxMemory = Annotated[str | None, typer.Option(
    "--max-memory", help="Memory budget, e.g. 12GB: UNet calls are split to stay under it (CUDA: tensor bytes; "
    "CPU: resident set). Default: what the device has.", rich_help_panel=SPEED_PANEL)]
Fps = Annotated[float | None, typer.Option(
    help="Frame rate of an image-folder input (default 24); a video keeps its own.", rich_help_panel=INPUT_PANEL)]
InvertDtype = Annotated[str, typer.Option(
    "--invert-dtype", **_choices("--invert-dtype", INVERT_DTYPES),
    help="Precision of the DDIM inversion: fp32 (default, whatever --dtype is; fp16 engines invert on PyTorch), "
    "tf32 (fp32 with TF32 tensor-core math, CUDA), fp16, bf16, or 'same' (the edit's --dtype and backend).",
    rich_help_panel=SPEED_PANEL)]
Resize = Annotated[str, typer.Option(
    "--resize", **_choices("--resize", RESIZES),
    help="Framing: crop (short side --size, aspect kept, centre-cropped), stretch (squashed to --size x --size, "
    "as the paper), pad (fitted in --size x --size, letterboxed; the output drops the bars).",
    rich_help_panel=INPUT_PANEL)]
OutputSize = Annotated[str, typer.Option(
    "--output-size", **_choices("--output-size", OUTPUT_SIZES),
    help="Size the edit (and its side-by-side and strip) is written at: input (the clip's own, resampled from the "
    "working size; crop: the cropped region at the clip's scale) or working (the working size, pad's bars cut).",
    rich_help_panel=OUTPUT_PANEL)]
Threads = Annotated[int | None, typer.Option(
    help="CPU threads for PyTorch (default: one per core; OpenMP threads wait passively, see docs/performance.md).",
    rich_help_panel=SPEED_PANEL)]
ClipModel = Annotated[str, typer.Option(
    "--clip-model", help="CLIP for the metrics: hub id, local folder, or 'tiny' (random, offline).")]
Flow = Annotated[str, typer.Option("--flow", **_choices("--flow", FLOW_METHODS),
                                   help="Optical flow for Pixel-MSE: dis (OpenCV, no weights) or raft (paper).")]


def _overwrite(what: str) -> Any:
    """``--overwrite`` (``--force`` its alias): replace ``what``."""
    return typer.Option("--overwrite", "--force", help=f"Replace {what}.", rich_help_panel=OUTPUT_PANEL)


def _json(what: str) -> Any:
    """``--json PATH``: also write ``what`` there (checked before the work)."""
    return typer.Option("--json", help=f"Also write {what} to this JSON file.", rich_help_panel=OUTPUT_PANEL)


def _write_json(path: Path | None, data: Any) -> None:
    """The --json file of a command whose library call does not write it (checked before the work)."""
    if path is not None:
        from p2v_fast.files import write_json_atomic

        write_json_atomic(path, data)


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    """PyTorch's CPU threads for a command that takes no EditConfig (whose ``threads`` the
    library applies itself): ``n``, or its default (one per physical core). Either way OpenMP's
    idle threads sleep rather than spin (p2v_fast.config.cpu_policy, applied before torch loads,
    unless the environment says otherwise)."""
    from p2v_fast.config import check_threads
    from p2v_fast.nets.runtime import torch_threads

    check_threads(n)

    with torch_threads(n):
        yield


def _uptime() -> float:
    """Seconds since this process started: what a user waits for, Python's start-up and imports too."""
    import time

    import psutil

    return time.time() - psutil.Process().create_time()


def _given(ctx: typer.Context) -> dict[str, Any]:
    """The parameters of ``ctx``'s command that the user gave (on the command line), not
    defaulted, with their values."""
    return {name: value for name, value in ctx.params.items()
            if getattr(ctx.get_parameter_source(name), "name", "DEFAULT") not in ("DEFAULT", "DEFAULT_MAP")}


def _bytes(text: str | None) -> int | None:
    """``--max-memory``'s value in bytes."""
    if text is None:
        return None
    from p2v_fast.errors import InputError
    from p2v_fast.text import parse_bytes

    try:
        return parse_bytes(text)
    except ValueError as e:
        raise InputError(f"--max-memory: {e}") from None


def _refuse_early(model: str | None = None, *inputs: Path) -> None:
    """Refuse what the options and the file system alone show wrong (a --model that names no
    folder nor hub id, a missing or unreadable input) before torch, diffusers and transformers
    load: a second, not several (issue 28 item 1). The library checks the same again."""
    from p2v_fast.media.reader import check_input
    from p2v_fast.weights.hub import check_model_source

    if model is not None:
        check_model_source(model)
    for path in inputs:
        check_input(path)


def _refuse_missing(model: str, captioner: str | None = None, source_prompt: str | None = None,
                    caption: bool = True) -> None:
    """Refuse, before torch loads, the weights a run needs that cannot be had (``model``, and with
    ``caption`` the captioner a missing ``source_prompt`` needs; not cached, and the hub offline or
    unreachable: one line naming each download and its size, in seconds), and a model folder whose
    scheduler does not predict noise (issue 26). The hub, when it answers, is asked once: the
    loaders find it answered (:func:`user_errors`)."""
    from p2v_fast.weights.downloads import check_downloads

    check_downloads(model, captioner, source_prompt, caption)


@app.command()
@user_errors
def edit(
    ctx: typer.Context,
    input: Annotated[Path, typer.Argument(help="Video (mp4, mov, webm, gif, ...) or folder of images.")],
    prompt: Annotated[str, typer.Argument(help="Target prompt, e.g. 'a crochet swan on the lake'.")],
    output: Annotated[Path | None, typer.Option(
        "-o", "--output", help="Output video: .mp4, .mov, .mkv or .webm (default: INPUT.p2v.mp4 beside the input; "
        "with --preview a .png).", rich_help_panel=OUTPUT_PANEL)] = None,
    overwrite: Annotated[bool, _overwrite("an existing output file")] = False,
    preview: Annotated[bool, typer.Option("--preview", help="Edit only the anchor frame and write a PNG.",
                                          rich_help_panel=OUTPUT_PANEL)] = False,
    side_by_side: Annotated[bool, typer.Option("--side-by-side", help="Also write input|output video.",
                                               rich_help_panel=OUTPUT_PANEL)] = False,
    model: Model = _edit_default("model"),
    size: Size = _edit_default("size"),
    resize: Resize = _edit_default("resize"),
    output_size: OutputSize = _edit_default("output_size"),
    start: Start = _edit_default("start"),
    max_frames: MaxFrames = None,
    stride: Stride = _edit_default("stride"),
    steps: Steps = _edit_default("steps"),
    timestep_grid: TimestepGrid = _edit_default("timestep_grid"),
    guidance_scale: GuidanceScale = _edit_default("guidance_scale"),
    negative_prompt: Annotated[str, typer.Option(
        "--negative-prompt", help="What to steer away from: replaces the empty prompt of classifier-free "
        "guidance (e.g. 'blurry, low quality').", rich_help_panel=METHOD_PANEL)] = _edit_default("negative_prompt"),
    source_prompt: SourcePrompt = None,
    captioner: Captioner = None,
    depth_norm: DepthNorm = _edit_default("depth_norm"),
    latent_update: LatentUpdate = _edit_default("latent_update"),
    update_steps: Annotated[
        int | None, typer.Option("--update-steps", help="Guided update on the first N steps (default: half).",
                                 rich_help_panel=METHOD_PANEL)
    ] = None,
    update_weight: UpdateWeight = _edit_default("update_weight"),
    refs: Annotated[str, typer.Option("--refs", **_choices("--refs", REFS),
                                      help="Attention references of the decoder's self-attention.",
                                      rich_help_panel=METHOD_PANEL)
                    ] = _edit_default("refs"),
    inject: Annotated[str, typer.Option("--inject", **_choices("--inject", INJECTIONS),
                                        help="Self-attention layers that attend to the references: the decoder's "
                                        "(the paper's choice) or all, encoder and bottleneck too (its Table 3; "
                                        "--backend torch).", rich_help_panel=METHOD_PANEL)] = _edit_default("inject"),
    seed: Seed = _edit_default("seed"),
    device: Device = _edit_default("device"),
    dtype: Dtype = _edit_default("dtype"),
    backend: Backend = _edit_default("backend"),
    engines: Engines = None,
    schedule: Schedule = _edit_default("schedule"),
    batch_frames: BatchFrames = None,
    invert_batch: InvertBatch = None,
    invert_dtype: InvertDtype = _edit_default("invert_dtype"),
    max_memory: MaxMemory = None,
    compile: Annotated[bool, typer.Option(
        "--compile", help="torch.compile the UNet's calls without gradients (CUDA graphs on GPU).",
        rich_help_panel=SPEED_PANEL)] = False,
    channels_last: Annotated[bool, typer.Option("--channels-last", help="Channels-last UNet memory format.",
                                                rich_help_panel=SPEED_PANEL)] = False,
    cuda_graph: Annotated[bool, typer.Option(
        "--cuda-graph", help="tensorrt: replay engines as CUDA graphs (export them with --static-batch).",
        rich_help_panel=SPEED_PANEL)] = False,
    fps: Fps = None,
    json_path: Annotated[Path | None, _json(
        "the result (paths, timings, UNet calls and the guided update's size per step and frame)")] = None,
    threads: Threads = None,
    paper: Annotated[bool, typer.Option(
        "--paper", help="The paper's configuration (its Table 2, as the authors' code runs it): --latent-update "
        "detached, --update-steps 26, --timestep-grid authors, --resize stretch, --size 512, --dtype fp32; options "
        "given beside it win (README, 'The paper's configuration').")] = False,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Print the settings, working size, frames, UNet calls and the GPU memory the edit is "
        "expected to need, without loading the model; then exit.")] = False,
) -> None:
    """Edit INPUT so that it matches PROMPT, consistently across frames.

    Example: p2v edit clip.mp4 "a crochet swan on the lake" -o swan.mp4
    """
    from p2v_fast.media.paths import EditPaths

    preset = paper_options(_given(ctx)) if paper else None
    cfg = EditConfig.from_options(locals(), max_memory=_bytes(max_memory), **(preset or {}))
    _refuse_early(cfg.model, input)
    if dry_run:  # before the output's checks: a dry run writes nothing
        from p2v_fast.method.estimate import plan_edit

        report.print_plan(out_console, plan_edit(cfg, input, preview=preview), preset, set(_given(ctx)) & set(PAPER))
        return
    EditPaths.of(input, output, preview=preview, side_by_side=side_by_side, json_path=json_path).check(input, overwrite)
    _refuse_missing(cfg.model, cfg.captioner, cfg.source_prompt)
    from p2v_fast.pipeline import edit_video

    with _progress() as progress:
        result = edit_video(cfg, input, output, overwrite=overwrite, preview=preview, side_by_side=side_by_side,
                            progress=progress, json_path=json_path)
    report.print_edit(out_console, result, cfg, _uptime())
    report.print_wrote(out_console, json_path)


@app.command()
@user_errors
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the scene clip and the edit.")] = Path("samples"),
    frames: Annotated[int, typer.Option(help="Frames in the scene clip.")] = 16,
    size: Size = 64,
    steps: Steps = _edit_default("steps"),
    model: Model = "mini",
    output_size: OutputSize = _edit_default("output_size"),
    json_path: Annotated[Path | None, _json("the edit's result (as p2v edit --json)")] = None,
    overwrite: Annotated[bool, _overwrite("an existing edit (scene.p2v.mp4, its side-by-side and strip) and --json "
                                          "file, as p2v edit does (the scene clip is kept)")] = False,
    threads: Threads = None,
) -> None:
    """Offline end-to-end run: render a scene clip and recolour its object with 'mini'.

    'mini' is this project's small SD2-depth-shaped model, trained on rendered scenes only
    (shipped in the package, no downloads): it edits such scenes, not real footage. Use a real
    --model with `p2v edit` for real clips.
    """
    _refuse_early(model)  # before the scene clip is rendered
    from p2v_fast.apps.demo import demo_config, run_demo

    # checked before the clip is made
    cfg = demo_config(size=size, steps=steps, threads=threads, model=model, output_size=output_size)
    with _progress() as progress:
        result = run_demo(out, cfg, frames, progress, json_path=json_path, overwrite=overwrite)
    report.print_demo(out_console, result, _uptime())
    report.print_wrote(out_console, json_path)


@app.command()
@user_errors
def ui(
    host: Annotated[str, typer.Option(help="Address to serve on (default: this machine only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to serve on.")] = 7860,
    auth: Annotated[str | None, typer.Option(help="USER:PASS the page asks for (other users see a command line: "
                                                  "prefer --auth-file or P2V_UI_AUTH).")] = None,
    auth_file: Annotated[Path | None, typer.Option("--auth-file", help="A file whose first line is USER:PASS.")
                         ] = None,
    share: Annotated[bool, typer.Option(help="Also a public link through Gradio's share server (needs internet).")
                     ] = False,
    out: Annotated[Path, typer.Option(help="Folder for uploads, outputs and their job records.")] = Path("p2v-ui"),
    model: Model = _edit_default("model"),
    device: Device = _edit_default("device"),
    dtype: Dtype = _edit_default("dtype"),
    engines: Annotated[Path, typer.Option(help="Folder whose engine folders the page offers.")
                       ] = _export_default("out"),
    max_upload_mb: Annotated[int, typer.Option("--max-upload-mb", help="Largest upload, in MB.")] = 200,
    output_size: OutputSize = _edit_default("output_size"),
    threads: Threads = None,
) -> None:
    """Open the web page to restyle a clip (Gradio; install the extra: pip install 'p2v-fast\\[ui]')."""
    import importlib.util

    from p2v_fast.config import check_threads
    from p2v_fast.errors import BackendUnavailableError, InputError

    if importlib.util.find_spec("gradio") is None:
        raise BackendUnavailableError("p2v ui needs Gradio: pip install 'p2v-fast[ui]'")
    from p2v_fast.apps.renders import UISettings
    from p2v_fast.apps.ui import launch, read_auth

    check_threads(threads)
    if not 1 <= port <= 65535:
        raise InputError(f"--port must be between 1 and 65535; got {port}")
    if max_upload_mb < 1:
        raise InputError(f"--max-upload-mb must be >= 1; got {max_upload_mb}")
    if out.exists() and not out.is_dir():
        raise InputError(f"--out '{out}' is a file, not a folder")
    login = read_auth(auth, auth_file)  # the options' own checks before the model's (a download's)
    EditConfig(model=model, device=device, dtype=dtype)  # a bad value is one line before anything loads
    _refuse_early(model)
    _refuse_missing(model, caption=False)  # its model; a captioner only when a clip comes without a source prompt
    settings = UISettings(out_dir=out, model=model, device=device, dtype=dtype, engines_root=engines,
                          threads=threads, max_upload_mb=max_upload_mb, output_size=output_size)
    launch(settings, host=host, port=port, auth=login, share=share,
           on_line=lambda m: console.print(m, markup=False, highlight=False, soft_wrap=True))


@app.command()
@user_errors
def invert(
    input: Annotated[Path, typer.Argument(help="Video or folder of images.")],
    model: Model = _edit_default("model"),
    size: Size = _edit_default("size"),
    resize: Resize = _edit_default("resize"),
    start: Start = _edit_default("start"),
    max_frames: MaxFrames = None,
    stride: Stride = _edit_default("stride"),
    steps: Steps = _edit_default("steps"),
    timestep_grid: TimestepGrid = _edit_default("timestep_grid"),
    source_prompt: SourcePrompt = None,
    captioner: Captioner = None,
    depth_norm: DepthNorm = _edit_default("depth_norm"),
    device: Device = _edit_default("device"),
    dtype: Dtype = _edit_default("dtype"),
    backend: Backend = _edit_default("backend"),
    engines: Engines = None,
    invert_batch: InvertBatch = None,
    invert_dtype: InvertDtype = _edit_default("invert_dtype"),
    fps: Fps = None,
    json_path: Annotated[Path | None, _json(
        "the result (frames, cache entry, runtime, seconds, reconstruction error)")] = None,
    overwrite: Annotated[bool, _overwrite("an existing --json file")] = False,
    threads: Threads = None,
) -> None:
    """DDIM-invert INPUT into the cache, so later edits of it skip inversion."""
    cfg = EditConfig.from_options(locals(), latent_update="off")
    _refuse_early(cfg.model, input)
    _refuse_missing(cfg.model, cfg.captioner, cfg.source_prompt)
    from p2v_fast.pipeline import invert_video

    with _progress() as progress:
        prep = invert_video(cfg, input, progress, json_path=json_path, overwrite=overwrite)
    report.print_invert(out_console, prep, cfg.model)
    report.print_wrote(out_console, json_path)


@app.command()
@user_errors
def batch(
    jobs: Annotated[Path, typer.Argument(help="Jobs file (YAML or JSON): 'defaults' and a list of 'jobs', each "
                                              "with `p2v edit` options under their long names with underscores.")],
    json_path: Annotated[Path | None, _json("the summary")] = None,
    overwrite: Annotated[bool, _overwrite("an existing --json file (a job's own files: overwrite: true in the jobs "
                                          "file)")] = False,
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
    from p2v_fast.apps.batch import BatchFileError
    from p2v_fast.apps.batch_ray import run_jobs_file

    try:
        result = run_jobs_file(jobs, json_path=json_path, overwrite=overwrite, ray=ray, ray_address=ray_address,
                               ray_cpus_per_worker=ray_cpus_per_worker, workers=workers,
                               display=lambda: batch_display(console))
    except BatchFileError as e:
        for line in e.lines:
            console.print(f"[bold red]error:[/bold red] {escape(line)}", highlight=False, soft_wrap=True)
        raise typer.Exit(e.exit_code) from None
    out_console.print(report.batch_table(result, jobs))
    report.print_wrote(out_console, json_path)
    if result.exit_code:
        raise typer.Exit(result.exit_code)


def _eval_inputs(input: Path, prompt: str | None, output: Path | None, source: Path | None,
                 prompt_option: str | None) -> tuple[Path, Path, str]:
    """(edited, source, prompt) from `p2v eval INPUT PROMPT [-o EDITED]` (as `p2v edit` takes
    them) or the older `p2v eval EDITED --source INPUT --prompt PROMPT`."""
    from p2v_fast.errors import InputError
    from p2v_fast.media.paths import default_output

    if prompt is not None and prompt_option is not None:
        raise InputError("give the prompt once: p2v eval INPUT PROMPT, or the older --prompt")
    text = prompt if prompt is not None else prompt_option
    if text is None:
        raise InputError("missing PROMPT: p2v eval INPUT PROMPT [-o EDITED], as p2v edit takes them")
    if source is None and not input.exists():
        raise InputError(f"input does not exist: '{input}'")
    if source is not None:  # the older form: the argument is the edited video
        if output is not None:
            raise InputError("-o names the edited video of p2v eval INPUT PROMPT -o EDITED; with --source INPUT, "
                             "the edited video is the argument")
        return input, source, text
    return (output if output is not None else default_output(input)), input, text


@app.command("eval")
@user_errors
def eval_(
    input: Annotated[Path, typer.Argument(help="The video (or folder of frames) the edit was made from, as given "
                                               "to p2v edit.")],
    prompt: Annotated[str | None, typer.Argument(help="The edit's target prompt, for CLIP-Text.")] = None,
    output: Annotated[Path | None, typer.Option(
        "-o", "--output", help="The edited video, as p2v edit's -o (default: INPUT.p2v.mp4 beside the input).")
    ] = None,
    source: Annotated[Path | None, typer.Option(
        "--source", hidden=True, help="Older form: p2v eval EDITED --source INPUT --prompt PROMPT.")] = None,
    prompt_option: Annotated[str | None, typer.Option(
        "--prompt", hidden=True, help="Older form: the target prompt.")] = None,
    json_path: Annotated[Path | None, _json("the scores")] = None,
    overwrite: Annotated[bool, _overwrite("an existing --json file")] = False,
    clip_model: ClipModel = DEFAULT_CLIP_MODEL,
    flow: Flow = FLOW_METHODS[0],
    size: Annotated[
        int | None, typer.Option(help="Compare at this short side (default: the edited video's size).")
    ] = None,
    start: Annotated[int, typer.Option(help="First source frame the edit was made from.")] = _edit_default("start"),
    max_frames: Annotated[int | None, typer.Option("--max-frames", help="--max-frames the edit used.")] = None,
    stride: Annotated[int, typer.Option(help="--stride the edit used.")] = _edit_default("stride"),
    resize: Annotated[str, typer.Option(
        "--resize", **_choices("--resize", RESIZES),
        help="--resize the edit used: how source frames map onto the edited frames (crop and pad: cover and "
        "centre-crop, pad's output having no bars; stretch: squashed).")] = _edit_default("resize"),
    threads: Threads = None,
) -> None:
    """Score an edit of INPUT with PROMPT against INPUT: CLIP-Text, CLIP-Image, Pixel-MSE (the
    paper's Table 2). Takes what `p2v edit` took: `p2v eval INPUT PROMPT [-o EDITED]`.

    The older form `p2v eval EDITED --source INPUT --prompt PROMPT` works too. A scene clip (p2v demo's)
    is also scored against its ground truth: edit accuracy, true-flow warp error, mask IoU, depth."""
    from p2v_fast.config import check_threads
    from p2v_fast.media.paths import check_report_path
    from p2v_fast.media.reader import check_input
    from p2v_fast.weights.downloads import check_eval_downloads

    edited, src, text = _eval_inputs(input, prompt, output, source, prompt_option)
    check_input(edited, "edited video")  # before the metrics' libraries load
    check_input(src, "source video")
    check_threads(threads)  # the options' own checks before the downloads'
    check_report_path(json_path, Path(edited), Path(src), what="video", overwrite=overwrite)
    check_eval_downloads(clip_model, flow)
    from p2v_fast.quality.evaluate import evaluate_video

    with _threads(threads), _progress() as progress:
        result = evaluate_video(edited, src, text, clip_model=clip_model, flow=flow, size=size, start=start,
                                max_frames=max_frames, stride=stride, resize=resize, progress=progress,
                                json_path=json_path, overwrite=overwrite)
    report.print_eval(out_console, result)
    report.print_wrote(out_console, json_path)


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
        typer.Option(help="Comma-separated subset of: ours, no-update, anchor, prev, per-frame, detached, all-layers "
                          "(default: the first five, the paper's)."),
    ] = None,
    overwrite: Annotated[bool, _overwrite("the outputs of an earlier ablation in --out")] = False,
    clip_model: ClipModel = DEFAULT_CLIP_MODEL,
    flow: Flow = FLOW_METHODS[0],
    sheet_frames: Annotated[int, typer.Option("--sheet-frames", help="Frames per contact-sheet row.")] = 4,
    model: Model = _edit_default("model"),
    size: Size = _edit_default("size"),
    resize: Resize = _edit_default("resize"),
    output_size: OutputSize = _edit_default("output_size"),
    start: Start = _edit_default("start"),
    max_frames: MaxFrames = None,
    stride: Stride = _edit_default("stride"),
    steps: Steps = _edit_default("steps"),
    guidance_scale: GuidanceScale = _edit_default("guidance_scale"),
    source_prompt: SourcePrompt = None,
    captioner: Captioner = None,
    depth_norm: DepthNorm = _edit_default("depth_norm"),
    update_weight: UpdateWeight = _edit_default("update_weight"),
    seed: Seed = _edit_default("seed"),
    device: Device = _edit_default("device"),
    dtype: Dtype = _edit_default("dtype"),
    backend: Backend = _edit_default("backend"),
    engines: Engines = None,
    invert_dtype: InvertDtype = _edit_default("invert_dtype"),
    fps: Fps = None,
    json_path: Annotated[Path | None, _json("the table (as --out's table.json)")] = None,
    threads: Threads = None,
) -> None:
    """Run the paper's ablations on INPUT and print one table like its Table 2."""
    from p2v_fast.media.paths import check_report_path
    from p2v_fast.weights.downloads import check_eval_downloads

    cfg = EditConfig.from_options(locals())
    _refuse_early(cfg.model, input)
    check_report_path(json_path, input, overwrite=overwrite, engines=engines)
    _refuse_missing(cfg.model, cfg.captioner, cfg.source_prompt)
    check_eval_downloads(clip_model, flow)
    from p2v_fast.apps.ablation import run_ablation

    with _threads(threads), _progress() as progress:  # the metrics too, not only the edits
        result = run_ablation(cfg, input, out, settings=settings, clip_model=clip_model, flow=flow,
                              overwrite=overwrite, sheet_frames=sheet_frames, progress=progress)
    _write_json(json_path, result.to_dict())
    report.print_ablation(out_console, result)
    report.print_wrote(out_console, json_path)


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
    steps: Annotated[int | None, typer.Option(
        help=f"DDIM steps (default {_edit_default('steps')}, the paper's).")] = None,
    frames: Annotated[int | None, typer.Option(
        help=f"Frames in the synthetic clip (1 anchor + propagated; default {DEFAULT_FRAMES}, "
        f"{PLAN_FRAMES} with --plan).")] = None,
    backend: Annotated[list[str] | None, typer.Option(
        "--backend", **_choices("--backend", BACKENDS), help="Repeatable (default: torch).")] = None,
    latent_update: Annotated[list[str] | None, typer.Option(
        "--latent-update", **_choices("--latent-update", LATENT_UPDATES),
        help=f"Repeatable (default: {', '.join(LATENT_UPDATES)}).")] = None,
    schedule: Annotated[list[str] | None, typer.Option(
        "--schedule", **_choices("--schedule", SCHEDULES), help=f"Repeatable (default: {', '.join(SCHEDULES)}).")
    ] = None,
    batch_frames: BatchFrames = None,
    invert_batch: InvertBatch = None,
    invert_dtype: InvertDtype = _bench_default("invert_dtype"),
    max_memory: MaxMemory = None,
    dtype: Dtype = _bench_default("dtype"),
    device: Device = _bench_default("device"),
    engines: Engines = None,
    repeats: Annotated[int, typer.Option(help="Timed runs per stage.")] = _bench_default("repeats"),
    warmup: Annotated[int, typer.Option(help="Untimed runs per stage first.")] = _bench_default("warmup"),
    threads: Threads = None,
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
    json_path: Annotated[Path | None, _json("the full report")] = None,
    overwrite: Annotated[bool, _overwrite("an existing --json file")] = False,
) -> None:
    """Time depth, inversion, anchor and propagated frames and VAE decode, in seconds per frame."""
    from benchmarks.command import render_bench, run_bench_command

    _refuse_early(model)
    with _progress() as progress:
        request = BenchRequest.from_options(locals(), max_memory=_bytes(max_memory))
        run = run_bench_command(request, progress, log=lambda m: console.print(f"[dim]{escape(m)}[/dim]"))
    render_bench(out_console, run)


@app.command("export")
@user_errors
def export_(
    model: Model = _export_default("model"),
    size: Annotated[int | None, typer.Option(help="Square size (height = width), the profile's opt size.")] = None,
    height: Annotated[int | None, typer.Option(
        help=f"Opt height in pixels (default: --size or {_export_default('height')}).")] = None,
    width: Annotated[int | None, typer.Option(
        help=f"Opt width in pixels (default: --size or {_export_default('width')}).")] = None,
    min_size: Annotated[int | None, typer.Option("--min-size", help="Smallest height/width accepted.")] = None,
    max_size: Annotated[int | None, typer.Option("--max-size", help=(
        "Largest height/width accepted (default: the long side of a 16:9 crop at the short side, 896 at 512; "
        "the size itself with --static-batch or --exporter dynamo)."))] = None,
    engines: Annotated[Path, typer.Option("--engines", "--out", help="Engine folder to write.")
                       ] = _export_default("out"),
    format: Annotated[str, typer.Option("--format", **_choices("--format", FORMATS),
                                        help="onnx (graphs only) or tensorrt (graphs + engines).")
                      ] = _export_default("format"),
    dtype: Annotated[str, typer.Option("--dtype", "--precision", **_choices("--dtype", PRECISIONS),
                                       help="Precision of the UNet and VAE (DPT stays fp32).")
                     ] = _export_default("precision"),
    workspace: Annotated[float | None, typer.Option(help="TensorRT builder workspace limit in GB.")] = None,
    max_batch: Annotated[int, typer.Option("--max-batch", help="Most samples per call (frames x 2 CFG).")
                         ] = _export_default("max_batch"),
    opt_batch: Annotated[int | None, typer.Option(
        "--opt-batch", help="Batch TensorRT tunes for (default: --max-batch, what the wavefront sends).")] = None,
    static_batch: Annotated[bool, typer.Option(
        "--static-batch", help="Engines for --max-batch only (smaller calls padded); needed by --cuda-graph.")] = False,
    opset: Annotated[int, typer.Option(help="ONNX opset.")] = _export_default("opset"),
    exporter: Annotated[str, typer.Option(
        "--exporter", **_choices("--exporter", EXPORTERS),
        help="torchscript (dynamic batch and size) or dynamo (torch.export; one fixed size).")
    ] = _export_default("exporter"),
    device: Device = _export_default("device"),
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", "--force", help="Redo every stage, even when its artifact is current, and replace an "
        "existing --json file.")] = False,
    json_path: Annotated[Path | None, _json("the summary (per network: file, size, seconds, status, error)")] = None,
    threads: Threads = None,
) -> None:
    """Export the networks to ONNX (validated against PyTorch) and build TensorRT engines."""
    from p2v_fast.media.paths import check_report_path

    _refuse_early(model)
    opt_h, opt_w = (_export_default("height"), _export_default("width")) if size is None else (size, size)
    options = ExportOptions(model=model, out=engines, format=format, precision=dtype, height=height or opt_h,
                            width=width or opt_w, min_size=min_size, max_size=max_size,
                            max_batch=max_batch, opt_batch=opt_batch, static_batch=static_batch, opset=opset,
                            exporter=exporter, workspace_gb=workspace, device=device, force=overwrite)
    check_report_path(json_path, overwrite=overwrite, engines=engines)
    _refuse_missing(model, caption=False)
    from export import export_engines

    with _threads(threads), _progress() as progress:
        export_report = export_engines(options, progress)
    _write_json(json_path, export_report.to_dict())
    report.print_export(out_console, export_report, options.profile().describe(), dtype)
    report.print_wrote(out_console, json_path)


def _download_help() -> str:
    from p2v_fast.weights.catalog import GROUPS, group_entries

    parts = [f"{g} ({', '.join(f'{e.name} {size_text(e.size)}' for e in group_entries(g))})" for g in GROUPS[:-1]]
    return "What to fetch: " + ", ".join(parts) + " or all (default). Repeatable."


@app.command()
@user_errors
def download(
    what: Annotated[list[str] | None, typer.Argument(help=_download_help(), show_default=False)] = None,
) -> None:
    """Fetch the model weights now (e.g. on a login node with internet, for GPU nodes without): only the files p2v
    loads, resumable, with progress. docs/models.md lists them."""
    from p2v_fast.weights.downloads import download as fetch

    done = fetch(what or ["all"], log=lambda m: console.print(m, markup=False, highlight=False, soft_wrap=True))
    report.print_downloads(out_console, done)


@app.command()
@user_errors
def info(
    engines: Annotated[Path | None, typer.Option(help="Engine folder to check (default: ./engines).")] = None,
    model: Annotated[str | None, typer.Option(
        help="Check --engines against this model (default: the one they were exported from).")] = None,
    json_path: Annotated[Path | None, _json("the rows (component, status)")] = None,
    overwrite: Annotated[bool, _overwrite("an existing --json file")] = False,
) -> None:
    """Versions, devices, which runtimes (CUDA, ONNX Runtime, TensorRT) are usable, whether the
    engines found match this machine and model, and which weights are downloaded (size, path)."""
    from p2v_fast.media.paths import check_report_path
    from p2v_fast.nets.graph_backend import engines_folder
    from p2v_fast.nets.system import engines_report, system_report
    from p2v_fast.weights.downloads import cache_rows

    check_report_path(json_path, overwrite=overwrite, engines=engines_folder(engines))
    rows = system_report() + engines_report(engines, model) + cache_rows()
    _write_json(json_path, [{"component": name, "status": status} for name, status in rows])
    report.print_info(out_console, rows)
    report.print_wrote(out_console, json_path)


@app.command("options-table", hidden=True)
def options_table() -> None:
    """Print docs/options.md: every command's options, generated from this app."""
    from p2v_fast.cli_docs import options_markdown

    typer.echo(options_markdown(typer.main.get_command(app)), nl=False)


def main() -> None:
    # the library's CPU thread policy, before torch loads (import p2v_fast applied it already; it
    # is named here because OpenMP reads it only then: docs/performance.md, "CPU threads")
    cpu_policy()
    signal.signal(signal.SIGTERM, _on_sigterm)  # clean up (partial files, locks) as on Ctrl-C
    app()


if __name__ == "__main__":
    main()
