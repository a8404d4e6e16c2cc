"""`p2v`: edit a video from a text prompt with Pix2Video (SD2-depth), fast.

The CLI only parses options, calls one library function and renders its result. Every
:class:`~p2v_fast.errors.P2VError` becomes one ``error:`` line and a non-zero exit.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

app = typer.Typer(
    name="p2v",
    help="Edit a video from a text prompt with Pix2Video on Stable Diffusion 2 depth.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
out_console = Console()


class RichProgress:
    """p2v_fast.progress.Progress rendered with rich bars (ETA included)."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress

    def stage(self, description: str, total: int | None) -> Callable[[int], None]:
        task = self.progress.add_task(description, total=total)
        return lambda n=1: self.progress.advance(task, n)

    def log(self, message: str) -> None:
        self.progress.console.print(f"[dim]{message}[/dim]")


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description:<16}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn library errors (and Ctrl-C) into one line and an exit code, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from p2v_fast.errors import P2VError

        try:
            return fn(*args, **kwargs)
        except P2VError as exc:
            console.print(f"[bold red]error:[/bold red] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            console.print("[bold red]interrupted[/bold red]: finished inversion frames are kept in the cache")
            raise typer.Exit(130) from None
        except MemoryError:
            console.print("[bold red]error:[/bold red] out of memory; try a smaller --size or --max-frames")
            raise typer.Exit(1) from None

    return wrapper


# Options shared by edit and invert ---------------------------------------------------------
Model = Annotated[str, typer.Option(help="Hub id, local diffusers folder, or 'tiny' (random weights, offline).")]
Size = Annotated[int, typer.Option(help="Short side of the working size (multiple of 64).")]
Start = Annotated[int, typer.Option(help="First source frame (0-based).")]
MaxFrames = Annotated[int | None, typer.Option("--max-frames", help="Edit at most this many frames.")]
Stride = Annotated[int, typer.Option(help="Take every N-th frame.")]
Steps = Annotated[int, typer.Option(help="DDIM steps (paper: 50).")]
SourcePrompt = Annotated[str | None, typer.Option("--source-prompt", help="Inversion prompt (default: BLIP caption).")]
DepthNorm = Annotated[str, typer.Option("--depth-norm", help="Depth min-max per 'frame' (paper) or per 'clip'.")]
Device = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N.")]
Dtype = Annotated[str, typer.Option(help="auto, fp32, fp16, bf16.")]
Backend = Annotated[str, typer.Option(help="torch, onnxruntime, tensorrt or auto.")]
Engines = Annotated[Path | None, typer.Option(help="Folder of exported engines (non-torch backends).")]


def _config(**kw: Any):
    from p2v_fast.config import EditConfig

    return EditConfig(**kw)


@app.command()
@user_errors
def edit(
    input: Annotated[Path, typer.Argument(help="Video (mp4, mov, webm, gif, ...) or folder of images.")],
    prompt: Annotated[str, typer.Argument(help="Target prompt, e.g. 'a crochet swan on the lake'.")],
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Output mp4 (default: beside the input).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output file.")] = False,
    preview: Annotated[bool, typer.Option(help="Edit only the anchor frame and write a PNG.")] = False,
    side_by_side: Annotated[bool, typer.Option("--side-by-side", help="Also write input|output video.")] = False,
    model: Model = "stabilityai/stable-diffusion-2-depth",
    size: Size = 512,
    start: Start = 0,
    max_frames: MaxFrames = None,
    stride: Stride = 1,
    steps: Steps = 50,
    guidance_scale: Annotated[float, typer.Option("--guidance-scale", help="Classifier-free guidance.")] = 7.5,
    negative_prompt: Annotated[str, typer.Option("--negative-prompt")] = "",
    source_prompt: SourcePrompt = None,
    depth_norm: DepthNorm = "frame",
    latent_update: Annotated[str, typer.Option("--latent-update", help="autograd (paper eq. 1), detached, off.")] = "autograd",
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
) -> None:
    """Edit INPUT so that it matches PROMPT, consistently across frames."""
    from p2v_fast.pipeline import edit_video

    cfg = _config(
        prompt=prompt, source_prompt=source_prompt, negative_prompt=negative_prompt, model=model, device=device,
        dtype=dtype, backend=backend, engines=engines, size=size, start=start, max_frames=max_frames, stride=stride,
        steps=steps, guidance_scale=guidance_scale, seed=seed, depth_norm=depth_norm, refs=refs,
        latent_update=latent_update, update_steps=update_steps, update_weight=update_weight,
    )
    with _progress() as bar:
        result = edit_video(cfg, input, output, overwrite=overwrite, preview=preview, side_by_side=side_by_side,
                            progress=RichProgress(bar))
    table = Table(show_header=False, box=None)
    table.add_row("output", str(result.output))
    if result.side_by_side:
        table.add_row("side by side", str(result.side_by_side))
    if result.strip:
        table.add_row("strip", str(result.strip))
    table.add_row("frames", f"{result.n_frames} at {result.size[0]}x{result.size[1]}, {result.fps:.3g} fps")
    table.add_row("source prompt", repr(result.source_prompt))
    inv = "cache hit (no inversion work)" if result.inversion_cache_hit else f"{result.seconds_inversion:.1f} s"
    table.add_row("inversion", inv)
    table.add_row("edit", f"{result.seconds_edit:.1f} s, {result.seconds_per_frame:.2f} s/frame")
    table.add_row("total", f"{result.seconds_total:.1f} s")
    out_console.print(table)


@app.command()
@user_errors
def invert(
    input: Annotated[Path, typer.Argument(help="Video or folder of images.")],
    model: Model = "stabilityai/stable-diffusion-2-depth",
    size: Size = 512,
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
) -> None:
    """DDIM-invert INPUT into the cache, so later edits of it skip inversion."""
    from p2v_fast.pipeline import invert_video

    cfg = _config(model=model, device=device, dtype=dtype, backend=backend, engines=engines, size=size, start=start,
                  max_frames=max_frames, stride=stride, steps=steps, source_prompt=source_prompt,
                  depth_norm=depth_norm, latent_update="off")
    with _progress() as bar:
        prep = invert_video(cfg, input, RichProgress(bar))
    state = "cache hit (nothing to do)" if prep.inverted.cache_hit else f"{prep.seconds:.1f} s"
    out_console.print(f"inverted {prep.selection.n_frames} frames: {state}; cache {prep.inverted.root}")


@app.command()
@user_errors
def info() -> None:
    """Versions, devices, and which runtimes (CUDA, ONNX Runtime, TensorRT) are usable."""
    from p2v_fast.system import system_report

    table = Table(title="p2v-fast", show_header=True)
    table.add_column("component")
    table.add_column("status")
    for name, status in system_report():
        table.add_row(name, status)
    out_console.print(table)


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()


if __name__ == "__main__":
    sys.exit(main())
