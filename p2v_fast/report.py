"""Each command's result on a console: label/value lines and rich tables.

The library computes, these functions render; each takes the :class:`rich.console.Console` to
print on (the CLI passes stdout's) and a result object of the library. They print what the
result holds and compute nothing.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from p2v_fast.text import plural

if TYPE_CHECKING:
    from p2v_fast.apps.ablation import AblationResult
    from p2v_fast.apps.batch import BatchResult
    from p2v_fast.config import EditConfig
    from p2v_fast.method.estimate import EditPlan
    from p2v_fast.pipeline import EditResult, PreparedClip
    from p2v_fast.quality.evaluate import VideoEval

def line(console: Console, text: str) -> None:
    """``text`` as typed: no markup, no highlighting, never cut to the console's width."""
    console.print(text, markup=False, highlight=False, soft_wrap=True)


def print_rows(console: Console, rows: list[tuple[str, str]]) -> None:
    """Label / value lines, values whole (never cut to the terminal's width) and as typed."""
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        line(console, f"{key:<{width}}  {value}")


def print_plan(console: Console, plan: EditPlan, paper: dict[str, Any] | None = None,
               kept: Iterable[str] = ()) -> None:
    """`p2v edit --dry-run`: the plan's rows; with ``paper`` (the preset's settings that applied)
    first the line saying so, and the options given beside ``--paper`` that won (``kept``)."""
    if paper is not None:
        given = ", ".join(f"--{k.replace('_', '-')}" for k in sorted(kept))
        line(console, "--paper: " + ", ".join(f"{k.replace('_', '-')} {v}" for k, v in paper.items())
             + (f"; given beside it: {given}" if given else ""))
    print_rows(console, plan.rows())
    line(console, "dry run: nothing was loaded or written")


def print_wrote(console: Console, path: Path | str | None) -> None:
    """``wrote PATH`` after a ``--json`` file is written (nothing when ``path`` is None)."""
    if path is not None:
        line(console, f"wrote {path}")


def wide(console: Console) -> Console:
    """``console``, or, when it is not a terminal (a pipe, a log), one on the same file 200
    columns wide: rich's default 80 would squash a wide table."""
    if console.is_terminal:
        return console
    return Console(file=console.file, width=max(console.width, 200), color_system=None)


def print_edit(console: Console, result: EditResult, cfg: EditConfig, uptime: float | None = None) -> None:
    """`p2v edit`: the files written, the frames, the source prompt, and the time per stage
    (``uptime``: the process's age, for the time in all)."""
    from p2v_fast.media.reader import format_fps
    from p2v_fast.method.inversion import describe_reconstruction

    rows = [("output", str(result.output))]
    if result.side_by_side:
        rows.append(("side by side", str(result.side_by_side)))
    if result.strip:
        rows.append(("strip", str(result.strip)))
    rate = "variable frame rate (the source's timestamps)" if result.variable_rate else f"{format_fps(result.fps)} fps"
    (w, h), (ww, wh) = result.size, result.working_size
    edited_at = f" (edited at {ww}x{wh})" if (ww, wh) != (w, h) else ""
    rows.append(("frames", f"{plural(result.n_frames, 'frame')} at {w}x{h}{edited_at}, {rate}"))
    captioned = cfg.source_prompt is None
    caption = " (BLIP caption: random weights in the tiny model, so word salad)" if (
        captioned and cfg.model == "tiny") else " (BLIP caption)" if captioned else ""
    rows.append(("source prompt", repr(result.source_prompt) + caption))
    inv = "cache hit (no inversion work)" if result.inversion_cache_hit else f"{result.seconds_inversion:.1f} s"
    rows.append(("inversion", f"{inv}; {describe_reconstruction(result.reconstruction, cfg.model)}"))
    rows.append(("edit", f"{result.seconds_edit:.1f} s: {per_frame(result)}"))
    rows.append(("total", total_time(result, uptime)))
    print_rows(console, rows)


def per_frame(result: EditResult) -> str:
    """The per-frame figures and what they cover: the edit alone (the paper's yardstick) and with
    the inversion (unless the cache held it)."""
    text = f"{result.seconds_per_frame:.2f} s/frame editing"
    if result.inversion_cache_hit:
        return text + " (inversion cached)"
    return text + f", {result.seconds_per_frame_with_inversion:.2f} s/frame with inversion"


def total_time(result: EditResult, uptime: float | None) -> str:
    """The run's seconds from loading the models to the files written and, with ``uptime`` (the
    process's age), in all with start-up (Python, imports, rendering a clip)."""
    text = f"{result.seconds_total:.1f} s from loading the models to the files written"
    return text + (f"; {uptime:.0f} s in all with start-up" if uptime is not None else "")


def print_demo(console: Console, result: EditResult, uptime: float | None = None) -> None:
    """`p2v demo`: one line, what the time per frame covers, and its three files."""
    line(console, f"edited {plural(result.n_frames, 'frame')}: {per_frame(result)}; {total_time(result, uptime)}: "
                  f"{result.output}, {result.side_by_side}, {result.strip}")


def print_invert(console: Console, prep: PreparedClip, model: str | None = None) -> None:
    """`p2v invert`: what was inverted, on which runtime, and how well it reconstructs."""
    from p2v_fast.method.inversion import describe_reconstruction
    from p2v_fast.nets.runtime import describe_runtime

    inv, sel = prep.inverted, prep.selection
    state = "cache hit (nothing to do)" if inv.cache_hit else f"{prep.seconds:.1f} s"
    line(console, f"inverted {plural(sel.n_frames, 'frame')} at {sel.size[0]}x{sel.size[1]} ({sel.resize}) on "
                  f"{describe_runtime(inv.runtime)}: {state}; cache {inv.root}")
    line(console, f"reconstruction: {describe_reconstruction(inv.reconstruction, model)}")


def _short(path: str) -> str:
    try:
        return str(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return path


def batch_table(result: BatchResult, jobs_file: Path) -> Table:
    """`p2v batch`: one row per job (status, frames, seconds, output, why it failed)."""
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


def print_ablation(console: Console, result: AblationResult) -> None:
    """`p2v ablate`: the paper's Table 2 for this clip (best per metric in bold), and its files."""
    from p2v_fast.apps.ablation import METRICS, format_metric
    from p2v_fast.quality.metrics import paper_scores

    best = result.best()
    table = Table(title=escape(f"Pix2Video ablation: {plural(result.n_frames, 'frame')} at "
                               f"{result.size[0]}x{result.size[1]}, {plural(result.steps, 'step')}, {result.model}"))
    table.add_column("setting", no_wrap=True)
    for _, header, _ in METRICS:
        table.add_column(header, justify="right")
    for r in result.rows:
        cells = []
        for name, _, _ in METRICS:
            text = format_metric(getattr(r, name), name)
            cells.append(f"[bold]{text}[/bold]" if best.get(name) == r.key else text)
        table.add_row(r.label, *cells)
    ours, no_update = (" / ".join(paper_scores(s)) for s in ("ours", "no-update"))
    table.caption = (f"CLIP {escape(result.clip_model)}, flow {result.flow}; s/frame excludes inversion. "
                     f"Paper (DAVIS 512²): ours {ours}, w/o update {no_update}")
    console.print(table)
    line(console, f"table: {result.table_md}\njson: {result.table_json}\ncontact sheet: {result.contact_sheet}")


def print_eval(console: Console, result: VideoEval) -> None:
    """`p2v eval`: the three scores beside the paper's, and the occluded share of the pixels."""
    from p2v_fast.quality.metrics import paper_scores

    table = Table(title=f"{plural(result.n_frames, 'frame')} at {result.size[0]}x{result.size[1]}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("paper (ours, DAVIS 512²)", justify="right", style="dim")
    paper = paper_scores("ours")
    table.add_row("CLIP-Text ↑", f"{result.clip_text:.4f}", paper[0])
    table.add_row("CLIP-Image ↑", f"{result.clip_image:.4f}", paper[1])
    table.add_row("Pixel-MSE ↓ (0-255)", f"{result.pixel_mse:.2f}", paper[2])
    table.add_row("pixels masked (occluded)", f"{100 * result.masked_fraction:.1f} %", "")
    table.caption = escape(f"CLIP {result.clip_model}, flow {result.flow}")
    console.print(table)
    if result.ground_truth is not None:
        print_ground_truth(console, result.ground_truth)


def print_ground_truth(console: Console, truth: dict[str, Any]) -> None:
    """`p2v eval` on a scene clip: the scores its ground truth allows, and why any is missing."""
    rows = (("edit accuracy ↑ (frames with the target colour)", "edit_accuracy", "{:.0%}"),
            ("other objects keep their colour ↑", "others_kept", "{:.0%}"),
            ("source judged as its own colour (the judge's check)", "source_accuracy", "{:.0%}"),
            ("warp error, true flow ↓ (0-255 MSE)", "warp_error", "{:.2f}"),
            ("  the source's own (shading, edges)", "source_warp_error", "{:.2f}"),
            ("object mask IoU ↑", "object_iou", "{:.2f}"),
            ("depth error ↓ (mini DPT, aligned AbsRel)", "depth_error", "{:.3f}"),
            ("  on the source frames", "source_depth_error", "{:.3f}"))
    edit = (f"{truth['source_colour']} -> {truth['target_colour']} (object {truth['object_id']})"
            if truth.get("target_colour") else "no colour change read from the prompt")
    table = Table(title=escape(f"ground truth of the scene clip: {edit}"))
    table.add_column("metric")
    table.add_column("value", justify="right")
    for label, key, fmt in rows:
        value = truth.get(key)
        if isinstance(value, float) and value == value:  # not nan
            table.add_row(label, fmt.format(value))
    console.print(table)
    for note in truth.get("notes", []):
        console.print(f"not scored: {note}", markup=False, soft_wrap=True)


def print_export(console: Console, report: Any, profile: str, precision: str) -> None:
    """`p2v export`: one row per network artifact (file, size, seconds, status, validation error).

    ``report`` is an ``export.ExportReport`` (the library does not import export/)."""
    table = Table(title=escape(f"{report.folder} ({profile}, {precision})"))
    for col, justify in (("network", "left"), ("file", "left"), ("size", "right"), ("seconds", "right"),
                         ("status", "left"), ("max rel err", "left")):
        table.add_column(col, justify=justify, no_wrap=col != "max rel err")  # type: ignore[arg-type]
    for r in report.rows:
        table.add_row(r.network, escape(r.file.name), f"{r.bytes / 2**20:.1f} MB", f"{r.seconds:.1f}", r.status,
                      escape(r.detail))
    console.print(table)
    console.print(f"manifest: {report.manifest} ({report.seconds:.1f} s in all)", markup=False, soft_wrap=True)


def print_info(console: Console, rows: Iterable[tuple[str, str]]) -> None:
    """`p2v info`: component / status rows."""
    table = Table(title="p2v-fast", show_header=True)
    table.add_column("component")
    table.add_column("status")
    for name, status in rows:
        table.add_row(escape(name), escape(status))
    console.print(table)


def print_downloads(console: Console, done: Iterable[tuple[Any, Any]]) -> None:
    """`p2v download`: where each download is now."""
    for entry, where in done:
        console.print(f"{escape(entry.source)}: {escape(str(where))}", highlight=False, soft_wrap=True)
